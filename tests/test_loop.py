"""The training loop as users launch it: module loading, the hot loop's syncs and memory, failures during
evaluation on one rank, what the step line shows, the trackers, the presets."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import struct
import subprocess
import sys
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_hellaswag import EXAMPLES as LONG_EXAMPLES  # one needs 65 positions
from test_train import HELLASWAG_FIXTURE, REPO, rank_log, run, tiny_args, write_shards

import gpt2
import train_gpt2 as tg
from support.checkpoints import model_entries, save_checkpoint
from support.distributed import Dist, resolve_device
from support.flags import field_help, flat_fields
from support.long_runs import StopSignal
from support.metrics import Metrics, duration
from support.recipes import PRESETS
from support.sampling import SampleConfig

SUPPORT_MODULES = {f"support.{p.stem}" for p in (REPO / "support").glob("*.py") if p.stem != "__init__"}
OUR_MODULES = {"gpt2", "train_gpt2", "hellaswag", "fineweb", "eval_suite", "support", *SUPPORT_MODULES}


@pytest.fixture
def gpt2_shards(tmp_path):
    """Shards of GPT-2 token ids (the tiny tests' motifs, shifted past 1000), for runs with HellaSwag and samples."""
    folder = tmp_path / "gpt2_shards"
    folder.mkdir()
    for f in write_shards(tmp_path / "shards").glob("*.npy"):
        np.save(folder / f.name, np.load(f) + 1000)
    return folder


@pytest.fixture
def hella_file(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in HELLASWAG_FIXTURE) + "\n")
    return path


def imported_modules(stderr: str) -> collections.Counter:
    """Module names from a PYTHONPROFILEIMPORTTIME=1 run's stderr, counted."""
    return collections.Counter(line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
                               if line.startswith("import time:") and "|" in line)


def script_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "WANDB_SERVICE")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


# -----------------------------------------------------------------------------
# one import direction: no module is loaded twice, whichever script runs


@pytest.mark.parametrize("command", [
    ["train_gpt2.py", "--help"], ["train_gpt2.py", "sample", "--help"], ["train_gpt2.py", "export", "--help"],
    ["train_gpt2.py", "plan", "--help"], ["hellaswag.py", "--help"], ["fineweb.py", "--help"],
    ["eval_suite.py", "--help"], ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_gpt2.py",
                                  "--help"]])
def test_every_entry_point_loads_each_module_once(command):
    out = subprocess.run([sys.executable, *command], cwd=REPO, env=script_env(PYTHONPROFILEIMPORTTIME="1"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = imported_modules(out.stderr)
    script = next(c for c in command if c.endswith(".py")).removesuffix(".py")
    assert counts[script] == 0, f"{script} (run as __main__) was imported again as a module"
    ours = {m: n for m, n in counts.items() if m in OUR_MODULES}
    assert ours and all(n <= (2 if "torch.distributed.run" in command else 1) for n in ours.values()), ours
    evaluation_only = {"support.core", "support.report"}  # CORE and the report card: eval_suite.py's
    if script == "train_gpt2":  # every supporting module but fault injection (only the tests load it) and those
        assert SUPPORT_MODULES - {"support.faults"} - evaluation_only <= set(ours), SUPPORT_MODULES - set(ours)
        assert "support.faults" not in ours
    if script == "eval_suite":
        assert evaluation_only <= set(ours), evaluation_only - set(ours)


SITECUSTOMIZE = """
import atexit, json, os
import hellaswag  # the module train_gpt2.py (as __main__) imports: the same one, unless something loads it twice

calls = []
original = hellaswag._logits


def recording(model, tokens, autocast_dtype, logits_at=None):
    calls.append(logits_at is not None)
    return original(model, tokens, autocast_dtype, logits_at)


hellaswag._logits = recording
atexit.register(lambda: open(os.environ["SCORED_LOG"], "w").write(json.dumps(calls)))
"""


def test_in_loop_hellaswag_takes_the_scored_path_when_run_as_a_script(gpt2_shards, hella_file, tmp_path):
    # a sitecustomize (run by Python before the script) records every HellaSwag forward of the real command line
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "scored.json"
    args = tiny_args(gpt2_shards, tmp_path / "r", "--vocab-size", "50304", "--hellaswag", "--hellaswag-file",
                     str(hella_file), steps=4)
    env = script_env(PYTHONPATH=f"{site}{os.pathsep}{REPO}", SCORED_LOG=str(log), PYTHONPROFILEIMPORTTIME="1")
    out = subprocess.run([sys.executable, "train_gpt2.py", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    calls = json.loads(log.read_text())
    assert calls and all(calls), f"HellaSwag forwards with logits at the scored positions only: {calls}"
    assert "step 3/4 (75.0%) | HellaSwag acc_norm" in out.stdout
    counts = imported_modules(out.stderr)
    assert counts["train_gpt2"] == 0 and counts["hellaswag"] == 1 and counts["gpt2"] == 1, counts


# -----------------------------------------------------------------------------
# the hot loop: no logits kept, one host sync per step


def tiny_run(tmp_path, shards, *extra: str) -> tg.Run:
    cfg = tg.parse_train_args(tiny_args(shards, tmp_path / "r", "--eval-interval", "0", *extra, B=2, total=64))
    return tg.setup(cfg, Dist())


@pytest.mark.parametrize("loss_chunk", ["0", "16"])
def test_training_holds_no_logits_during_backward(tmp_path, loss_chunk):
    run = tiny_run(tmp_path, write_shards(tmp_path / "shards"), "--loss-chunk", loss_chunk)
    refs, alive = [], []
    run.raw_model.lm_head.register_forward_hook(lambda m, args, out: refs.append(weakref.ref(out)))
    for p in run.raw_model.parameters():  # the hooks fire during backward, as each gradient is computed
        p.register_hook(lambda g: alive.append(any(r() is not None for r in refs)))
    tg.train_step(run, 0, StopSignal())
    if loss_chunk == "0":  # the chunked loss never calls lm_head
        assert len(refs) == run.grad_accum
    assert alive and not any(alive), "the (B, T, vocab) logits were alive during backward"
    run.metrics.close()


def test_one_host_sync_per_step(tmp_path, monkeypatch):
    run = tiny_run(tmp_path, write_shards(tmp_path / "shards"))
    assert run.grad_accum == 2
    reads = []
    ours = {str(REPO / "train_gpt2.py"), str(REPO / "gpt2.py"), *(str(p) for p in (REPO / "support").glob("*.py"))}
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller in ours:
                reads.append((_name, sys._getframe(1).f_code.co_name))
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for step in range(3):
        tg.train_step(run, step, StopSignal())
    assert reads == [("tolist", "train_step")] * 3
    run.metrics.close()


def test_a_stop_asked_for_during_a_step_stops_after_that_step(tmp_path):
    run = tiny_run(tmp_path, write_shards(tmp_path / "shards"))
    stop = StopSignal()
    run.raw_model.lm_head.weight.register_hook(lambda g: setattr(stop, "requested", True))  # SIGTERM in backward
    assert tg.train_step(run, 0, stop)["stop"]
    run.metrics.close()


def test_a_non_finite_gradient_norm_stops_before_any_checkpoint(tmp_path):
    run = tiny_run(tmp_path, write_shards(tmp_path / "shards"))
    run.raw_model.transformer.h[0].mlp.c_fc.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(tg.TrainingDiverged, match="gradient norm is (nan|inf) at step 0"):
        tg.train_step(run, 0, StopSignal())
    run.metrics.close()


# -----------------------------------------------------------------------------
# failures on one rank stop every rank


FLAKY_EVAL = """
import os, sys
import hellaswag
import train_gpt2

real = hellaswag.count_correct
evaluations = []


def flaky(*args, **kwargs):
    evaluations.append(1)
    if os.environ["RANK"] == "1" and len(evaluations) == 2:
        raise RuntimeError("CUDA out of memory (simulated, rank 1)")
    return real(*args, **kwargs)


hellaswag.count_correct = flaky
train_gpt2.main(sys.argv[1:])
"""


def test_a_rank_failing_in_evaluation_stops_every_rank(gpt2_shards, hella_file, tmp_path):
    script = tmp_path / "flaky_eval.py"
    script.write_text(FLAKY_EVAL)
    args = tiny_args(gpt2_shards, tmp_path / "r", "--vocab-size", "50304", "--hellaswag", "--hellaswag-file",
                     str(hella_file), "--eval-interval", "2", steps=6)
    logs = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--log-dir",
           str(logs), "--redirects", "3", str(script), *args]
    out = subprocess.run(cmd, cwd=REPO, env=script_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                         timeout=240)
    assert out.returncode != 0
    err0, err1 = rank_log(logs, 0), rank_log(logs, 1)
    assert err0.strip().splitlines()[-1] == \
        "train_gpt2.py: error: step 2: another rank failed in evaluation (see its error)", err0[-2000:]
    assert "RuntimeError: CUDA out of memory (simulated, rank 1)" in err1, err1[-2000:]
    steps = [int(line.split()[0]) for line in (tmp_path / "r" / "log.txt").read_text().splitlines()
             if " train " in line]
    assert steps == [0, 1]  # it failed mid-run, in the evaluation before step 2


def test_a_hellaswag_row_longer_than_the_model_is_an_error_before_step_0(gpt2_shards, tmp_path, capsys):
    long_file = tmp_path / "long.jsonl"
    long_file.write_text("\n".join(json.dumps(e) for e in LONG_EXAMPLES) + "\n")
    args = tiny_args(gpt2_shards, tmp_path / "r", "--vocab-size", "50304", "--hellaswag", "--hellaswag-file",
                     str(long_file))  # a block size of 32
    with pytest.raises(SystemExit) as e:
        tg.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"train_gpt2.py: error: HellaSwag example ind=\d+: a row of \d+ tokens is longer than the "
                        r"model's block_size=32: train a longer --block-size, or pass --no-hellaswag", err), err
    assert not (tmp_path / "r").exists()  # nothing written


# -----------------------------------------------------------------------------
# what a user sees


def test_step_line_shows_progress_and_time_left(tmp_path, capsys):
    run(tiny_args(write_shards(tmp_path / "shards"), tmp_path / "r", steps=4))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " | loss " in ln]
    assert len(lines) == 4
    assert lines[0].startswith("step 0/4 (0.0%) | loss ") and lines[0].endswith(" | eta -")
    assert re.fullmatch(r"step 2/4 \(50\.0%\) \| loss \d+\.\d{6} \| lr \d\.\d{4}e-\d\d \| norm \d+\.\d{4} \| "
                        r"dt \d+\.\d\dms \| tok/sec [\d,]+ \| eta \d+s", lines[2]), lines[2]
    assert duration(3725) == "1h02m" and duration(65) == "1m05s" and duration(4.4) == "4s"


def test_old_flag_names_still_work(tmp_path):
    cfg = tg.parse_train_args(["--sample-tokens", "7", "--num-samples", "3", "--prompt", "ROMEO:"])
    assert cfg.sample == SampleConfig(prompt="ROMEO:", num_samples=3, max_new_tokens=7)
    assert tg.parse_train_args(["--max-new-tokens", "9"]).sample.max_new_tokens == 9
    assert tg.parse_train_args(["--preset", "shakespeare", "--num-samples", "1"]).sample.num_samples == 1


# -----------------------------------------------------------------------------
# trackers: Weights & Biases (offline) and TensorBoard, read back from the files they wrote


def read_wandb_records(path: Path):
    """The records of a .wandb file: LevelDB's log format (32 KiB blocks of chunks, each with a 7-byte header
    <crc32, length, type>) behind a 7-byte file header, each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), f"{path}: not a .wandb file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # a block's padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pos += 7 + length
        pending += chunk  # kinds: 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_wandb_run(run_dir: Path) -> tuple[dict, dict]:
    """{metric: {step: value}} and the config of the one offline run under run_dir."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history, config = collections.defaultdict(dict), {}
    key = lambda item: item.key or ".".join(item.nested_key)
    for record in read_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {key(it): json.loads(it.value_json) for it in record.history.item}
            for k, v in items.items():
                if not k.startswith("_") and k != "step":
                    history[k][items["step"]] = v  # our step, the run's x axis
        elif kind in ("run", "config"):
            cfg = record.run.config if kind == "run" else record.config
            config.update({key(it): json.loads(it.value_json) for it in cfg.update})
    return dict(history), config


def read_tensorboard(log_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    scalars = collections.defaultdict(dict)
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value if event.HasField("summary") else []:
                scalars[v.tag][event.step] = float(tensor_util.make_ndarray(v.tensor))
    return dict(scalars)


def test_wandb_offline_and_tensorboard_get_every_metric(tmp_path):
    log_dir = tmp_path / "r"
    args = tiny_args(write_shards(tmp_path / "shards"), log_dir, "--wandb", "gpt2-test", "--tensorboard", steps=4)
    env = script_env(WANDB_MODE="offline", WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"),
                     WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"), WANDB_SILENT="true")
    out = subprocess.run([sys.executable, "train_gpt2.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    ours = r"step \d|saved |[\d,]+ parameters|peak memory|recipe |optimizer |schedule "
    assert all(re.match(ours, line) for line in lines), lines  # ours
    logged = collections.defaultdict(dict)  # log.txt's text
    for line in (log_dir / "log.txt").read_text().splitlines():
        step, name, value = line.split()
        logged[name][int(step)] = value
    history, config = read_wandb_run(log_dir)
    scalars = read_tensorboard(log_dir)
    assert set(logged) == {"train", "val", "lr", "norm", "tokens_per_sec"}
    for name, by_step in logged.items():
        assert history[name].keys() == by_step.keys() == scalars[name].keys(), name
        for step, value in by_step.items():
            assert history[name][step] == scalars[name][step]  # both trackers keep the exact value
            assert f"{history[name][step]:{Metrics.FORMATS[name][0]}}" == value, (name, step)  # log.txt's number
    assert history["dt"].keys() == scalars["dt"].keys() == {0, 1, 2, 3}  # the console's dt goes to trackers
    assert config["max_steps"] == 4 and config["wandb"] == "gpt2-test" and config["sample"]["num_samples"] == 0


# -----------------------------------------------------------------------------
# presets


def test_shakespeare_gpt2_preset_fine_tunes_gpt2_exactly(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128)).eval()  # a local "gpt2"
    hf.save_pretrained(tmp_path / "gpt2")
    text = tmp_path / "input.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 200)
    args = ["--preset", "shakespeare-gpt2", "--init-from", str(tmp_path / "gpt2"), "--data", str(text),
            "--log-dir", str(tmp_path / "r"), "--seq-len", "64", "--micro-batch-size", "2", "--total-batch-size",
            "256", "--max-steps", "3", "--eval-interval", "2", "--val-steps", "1", "--max-new-tokens", "8",
            "--device", "cpu"]
    cfg = tg.parse_train_args(args)
    assert (cfg.init_from, cfg.vocab_size, cfg.sample.prompt) == (str(tmp_path / "gpt2"), 50257, "ROMEO:")
    history = tg.train(cfg)
    # step 0's validation loss is GPT-2's own (through transformers) on the first val batch
    tokens = np.load(next(tmp_path.glob("input.txt.*.gpt2.npy")))
    val = torch.from_numpy(tokens[len(tokens) - int(len(tokens) * 0.1):][:2 * 64 + 1].astype(np.int64))
    with torch.no_grad():
        logits = hf(val[:-1].view(2, 64)).logits
    expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)), val[1:]).item()
    assert history["val"][0] == pytest.approx(expected, rel=1e-5)
    assert sorted(history["train"]) == [0, 1, 2] and history["checkpoints"] == [str(tmp_path / "r" / "model_00002.pt")]


def test_every_preset_value_reaches_the_config():
    for name, values in PRESETS.items():
        flat = flat_fields(tg.parse_train_args(["--preset", name]))
        assert {k: flat[k] for k in values} == values, name



@dataclasses.dataclass
class Spacing:
    tight: int = 1 # one space before the comment
    wide: str = "a  # not a comment"      # many spaces, and a '#' inside the string
    multi: tuple = (1,
                    2)  # a field over two lines
    bare: float = 0.5


def test_help_text_is_each_fields_comment_however_it_is_spaced():
    assert field_help(Spacing) == {"tight": "one space before the comment",
                                         "wide": "many spaces, and a '#' inside the string",
                                         "multi": "a field over two lines"}


def test_resuming_a_model_without_run_state_is_an_error(tmp_path, capsys):
    shards = write_shards(tmp_path / "shards")
    model = gpt2.GPT(tg.parse_train_args(tiny_args(shards, tmp_path / "r")).model_config())
    save_checkpoint(tmp_path / "model_00007.pt", model_entries(model))  # what --init-from takes
    with pytest.raises(SystemExit) as e:
        tg.main(tiny_args(shards, tmp_path / "r", "--resume", str(tmp_path / "model_00007.pt")))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (f"train_gpt2.py: error: --resume {tmp_path / 'model_00007.pt'}: a "
                                               f"model without a run's state: start from it with --init-from "
                                               f"{tmp_path / 'model_00007.pt'}")


def test_samples_longer_than_the_model_are_an_error_before_step_0(gpt2_shards, tmp_path, capsys):
    args = tiny_args(gpt2_shards, tmp_path / "r", "--vocab-size", "50304", "--num-samples", "1", "--prompt",
                     "ROMEO:", "--max-new-tokens", "40")  # block size 32
    with pytest.raises(SystemExit):
        tg.main(args)
    err = capsys.readouterr().err.strip()
    assert err == ("train_gpt2.py: error: --prompt (3 tokens) + --max-new-tokens 40 exceed the model's block size "
                   "32: shorten one"), err
    assert not (tmp_path / "r").exists()


def test_device_auto_is_decided_in_one_place(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == "mps"
    assert resolve_device("auto", world_size=2) == "cpu"  # Gloo cannot reduce MPS tensors
    assert resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", world_size=8) == "cuda"


def test_a_log_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "r").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        tg.main(tiny_args(write_shards(tmp_path / "shards"), tmp_path / "r"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_gpt2.py: error: ") and "\n" not in err and str(tmp_path / "r") in err, err
