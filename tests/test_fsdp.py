"""The memory levers, as users launch them: --shard fsdp (FSDP2 under a 2-process Gloo torchrun),
--activation-checkpointing and --dtype float16 with loss scaling. Everything on the CPU in fp32 except
the float16 tests."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import (
    HELLASWAG_FIXTURE,
    REPO,
    assert_same_run,
    final_state,
    rank_log,
    run,
    tiny_args,
    torchrun,
    write_shards,
)

import gpt2
import train_gpt2 as tg
from support import metrics
from support.distributed import auto_dtype, setup_precision

# -----------------------------------------------------------------------------
# --shard fsdp: one set of 2-rank runs that the tests below compare (each torchrun costs seconds)


def read_log(log_dir: Path) -> dict:
    """log.txt -> {name: {step: value}}."""
    return metrics.read_log(log_dir / "log.txt")[0]


def assert_close_losses(got: Path, want: Path, steps=None) -> None:
    """Same training, up to fp32 rounding (the ranks' reductions add in another order): train and val losses
    within 1e-5 relative, HellaSwag equal."""
    a, b = read_log(got), read_log(want)
    for name in ("train", "val", "hella"):
        want_values = {s: v for s, v in b[name].items() if steps is None or s in steps}
        assert {s: a[name][s] for s in want_values} == pytest.approx(want_values, rel=1e-5 if name != "hella" else 0)


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """ddp and fsdp runs of the same tiny GPT-2-vocabulary model with in-loop validation, HellaSwag (5 examples:
    the ranks score 3 and 2, so their forwards are uneven) and samples, 2 micro-batches of accumulation per
    rank, checkpoints at steps 2 and 4; then each one's step-2 checkpoint resumed both ways."""
    tmp = tmp_path_factory.mktemp("fsdp")
    data = tmp / "gpt2_shards"
    data.mkdir()
    for f in write_shards(tmp / "shards").glob("*.npy"):
        np.save(data / f.name, np.load(f) + 1000)  # GPT-2 token ids, for HellaSwag and samples
    hella = tmp / "hellaswag_val.jsonl"
    hella.write_text("\n".join(json.dumps(e) for e in HELLASWAG_FIXTURE[:5]) + "\n")
    args = lambda name, *x: tiny_args(data, tmp / name, "--vocab-size", "50304", "--block-size", "64", "--hellaswag",
                                      "--hellaswag-file", str(hella), "--num-samples", "1", "--max-new-tokens", "4",
                                      "--prompt", "Hi", "--checkpoint-interval", "2", *x, B=2, total=128, steps=6)
    logs = {"ddp": torchrun(args("ddp", "--shard", "ddp")).stdout}
    torchrun(args("fsdp", "--shard", "fsdp"), rank_logs=tmp / "fsdp_ranks")  # each rank's output in its own file
    logs.update({f"fsdp rank {r}": rank_log(tmp / "fsdp_ranks", r, "stdout") for r in (0, 1)})
    torchrun(args("fsdp_reduce", "--shard", "fsdp", "--reduce-every-micro-step"))  # sharded gradients throughout
    from_fsdp, from_ddp = str(tmp / "fsdp" / "model_00002.pt"), str(tmp / "ddp" / "model_00002.pt")
    # resumed: under fsdp with activation checkpointing; under ddp from fsdp's checkpoint, with activation
    # checkpointing too; under fsdp from ddp's, compiled
    torchrun(args("fsdp_resumed", "--shard", "fsdp", "--resume", from_fsdp, "--activation-checkpointing"))
    torchrun(args("fsdp_to_ddp", "--shard", "ddp", "--resume", from_fsdp, "--activation-checkpointing"))
    logs["ddp_to_fsdp"] = torchrun(args("ddp_to_fsdp", "--shard", "fsdp", "--resume", from_ddp, "--compile")).stdout
    return tmp, logs


def test_fsdp_trains_like_ddp(sharded_runs):
    tmp, logs = sharded_runs
    assert "| fsdp |" in logs["fsdp rank 0"] and "| ddp |" in logs["ddp"]
    # every loss within 1e-5 (measured: 3e-7 at most). The gradient norm differs more (1.6e-4 at step 2):
    # Adam divides by sqrt(v), so the rounding noise of near-zero gradients (the padded vocabulary rows, the
    # key bias) becomes full-size steps of those weights, which the loss hardly sees but the norm does
    assert_close_losses(tmp / "fsdp", tmp / "ddp")
    assert_close_losses(tmp / "fsdp_reduce", tmp / "ddp")  # reduce-scattered every micro-step, then added up
    assert len(re.findall(r"HellaSwag acc_norm [\d.]+ \| \d/5 right", logs["fsdp rank 0"])) == 3  # all 5, each time
    for r in (0, 1):  # each rank sampled at each evaluation, on its own
        assert len(re.findall(rf"^rank {r} sample 0: Hi", logs[f"fsdp rank {r}"], re.M)) == 3


def test_fsdp_checkpoint_is_ddps_format(sharded_runs):
    tmp, _ = sharded_runs
    ddp, fsdp = (torch.load(tmp / d / "model_00004.pt", weights_only=True) for d in ("ddp", "fsdp"))
    assert ddp.keys() == fsdp.keys() and ddp["model"].keys() == fsdp["model"].keys()
    for name, t in ddp["model"].items():
        assert type(fsdp["model"][name]) is torch.Tensor and fsdp["model"][name].shape == t.shape, name
    m = fsdp["model"]  # the tied matrix is one tensor, written once
    assert m["lm_head.weight"].data_ptr() == m["transformer.wte.weight"].data_ptr()
    assert ddp["optimizer"]["param_groups"] == fsdp["optimizer"]["param_groups"]
    for i, state in ddp["optimizer"]["state"].items():
        assert {k: v.shape for k, v in fsdp["optimizer"]["state"][i].items()} == {k: v.shape for k, v in state.items()}
    assert fsdp["scaler"] is None and fsdp["world_size"] == 2
    sizes = [(tmp / d / "model_00004.pt").stat().st_size for d in ("ddp", "fsdp")]
    assert abs(sizes[0] - sizes[1]) < 0.01 * sizes[0], sizes


def test_fsdp_resume_equals_uninterrupted_bitwise(sharded_runs):
    tmp, _ = sharded_runs
    # activation checkpointing on after the resume: recomputing the blocks changes no bit either
    straight, resumed = final_state(tmp / "fsdp"), final_state(tmp / "fsdp_resumed")
    assert straight["step"] == resumed["step"] == 5
    for name, w in straight["model"].items():
        assert torch.equal(resumed["model"][name], w), name
    for i, state in straight["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(resumed["optimizer"]["state"][i][k], v), (i, k)
    after = lambda log: {n: {s: v for s, v in steps.items() if s > 2} for n, steps in log.items()
                         if n != "tokens_per_sec"}
    assert after(read_log(tmp / "fsdp_resumed")) == after(read_log(tmp / "fsdp"))  # log.txt: losses, norms, HellaSwag


def test_checkpoints_cross_between_ddp_and_fsdp(sharded_runs):
    tmp, logs = sharded_runs
    assert_close_losses(tmp / "fsdp_to_ddp", tmp / "ddp", steps=range(3, 6))  # fsdp's checkpoint, under ddp
    assert_close_losses(tmp / "ddp_to_fsdp", tmp / "fsdp", steps=range(3, 6))  # ddp's, under fsdp, compiled
    assert "compile True" in logs["ddp_to_fsdp"]


def launch(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """train_gpt2.py under a 2-rank torchrun, with extra environment variables."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "train_gpt2.py"), *args], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_fsdp_in_bf16_keeps_ddps_precision_and_compiles_its_blocks(shards, tmp_path):
    # the residual stream and LayerNorms stay fp32 under fsdp as under DDP's autocast: same losses up to the
    # ranks' reduction order (gathering weights in bf16 and casting block inputs differed by 2e-3 at step 5)
    args = lambda d, *x: tiny_args(shards, d, "--dtype", "bfloat16", "--n-layer", "3", *x, B=2, total=128, steps=6)
    launch(args(tmp_path / "ddp", "--shard", "ddp"))
    launch(args(tmp_path / "fsdp", "--shard", "fsdp"))
    a, b = read_log(tmp_path / "fsdp"), read_log(tmp_path / "ddp")
    assert a["train"] == pytest.approx(b["train"], rel=1e-4) and a["val"] == pytest.approx(b["val"], rel=1e-4)
    # compiled under fsdp: each block's forward is one graph (the three blocks share it), FSDP's hooks around it
    out = launch(args(tmp_path / "compiled", "--shard", "fsdp", "--compile", "--eval-interval", "0",
                      "--dtype", "float32"), TORCH_LOGS="graph_code,graph_breaks")
    assert out.stderr.count("TRACED GRAPH") == 2 and "Graph break" not in out.stderr  # one per rank


HOST_OOM = """
import os, torch
original = torch.Tensor.cpu


def cpu(self, *args, **kwargs):  # rank 0 runs out of host memory copying the gathered (64, 32) embedding
    if os.environ.get("RANK") == "0" and tuple(self.shape) == (64, 32):
        raise MemoryError("host memory exhausted (injected)")
    return original(self, *args, **kwargs)


torch.Tensor.cpu = cpu
"""


def test_fsdp_checkpoint_that_rank_0_cannot_hold_stops_every_rank(shards, tmp_path):
    # rank 0 fails mid-gather; it still takes part in the remaining gathers, then every rank stops together
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(HOST_OOM)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--log-dir",
           str(tmp_path / "ranks"), "--redirects", "3", str(REPO / "train_gpt2.py"),
           *tiny_args(shards, tmp_path / "r", "--shard", "fsdp", "--checkpoint-interval", "2", "--eval-interval", "0",
                      B=2, total=64)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, env=env)  # no hang
    assert out.returncode != 0
    assert "rank 0 could not gather the checkpoint" in rank_log(tmp_path / "ranks", 0) and "(injected)" in \
        rank_log(tmp_path / "ranks", 0)
    assert "rank 0 could not write" in rank_log(tmp_path / "ranks", 1)
    assert not (tmp_path / "r" / "model_00002.pt").exists()


def test_fsdp_lowers_peak_memory_per_rank(tmp_path):
    """Measured: each rank's peak resident memory, a 51M-parameter model (16 bytes a parameter under ddp:
    weights, gradients, AdamW's two moments; about half of that per rank under fsdp on 2 ranks)."""
    data = write_shards(tmp_path / "shards")
    peaks = {}
    for shard in ("ddp", "fsdp"):
        args = ["--data", str(data), "--log-dir", str(tmp_path / shard), "--n-layer", "8", "--n-head", "8",
                "--n-embd", "512", "--block-size", "32", "--vocab-size", "50304", "--seq-len", "32",
                "--micro-batch-size", "1", "--total-batch-size", "64", "--max-steps", "2", "--eval-interval", "0",
                "--no-hellaswag", "--num-samples", "0", "--device", "cpu", "--no-compile", "--shard", shard]
        # glibc's sliding mmap threshold would keep freed tensors' memory in the heap, so the resident set would
        # measure its cache rather than what is allocated: a fixed threshold returns large blocks at once
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(REPO / "train_gpt2.py"), *args], capture_output=True, text=True, env=env,
                             cwd=REPO, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        m = re.search(r"^peak memory per rank ([\d.]+), ([\d.]+) GiB \(resident\)$", out.stdout, re.M)
        peaks[shard] = float(m[1]), float(m[2])
    # rank 1 (rank 0 also gathers the whole checkpoint at the end). Measured here: 1.27 GiB under ddp (its gradients
    # views into its all-reduce buckets: 1.46 with a copy of them beside), 1.05 under fsdp. fsdp holds half of the
    # 16 bytes a parameter here, less what it gathers: at least a quarter of them saved, 51M x 16 / 4 B = 0.19 GiB
    assert peaks["fsdp"][1] < peaks["ddp"][1] - 0.19, peaks


COUNT_REDUCE_SCATTERS = """
import atexit, os
import torch.distributed as d

calls, original = [0], d.reduce_scatter_single


def counted(*args, **kwargs):  # FSDP2 reduce-scatters each unit's gradients through this
    calls[0] += 1
    return original(*args, **kwargs)


d.reduce_scatter_single = counted
atexit.register(lambda: open(os.environ["COUNT_FILE"] + "." + os.environ["RANK"], "w").write(str(calls[0])))
"""


def test_reduce_every_micro_step_reduce_scatters_every_micro_step(shards, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(COUNT_REDUCE_SCATTERS)
    counts = {}
    for flag in ("--no-reduce-every-micro-step", "--reduce-every-micro-step"):  # 1 step of 2 micro-steps a rank
        launch(tiny_args(shards, tmp_path / flag, "--shard", "fsdp", "--eval-interval", "0", flag, B=2, total=128,
                         steps=1), PYTHONPATH=str(tmp_path / "site"), COUNT_FILE=str(tmp_path / flag))
        counts[flag] = int((tmp_path / f"{flag}.0").read_text())
    # 3 units (2 blocks and the root): once at the last micro-step, or after each of the 2
    assert counts == {"--no-reduce-every-micro-step": 3, "--reduce-every-micro-step": 6}


def test_reduce_every_micro_step_needs_fsdp(shards, tmp_path):
    with pytest.raises(tg.TrainError, match="--reduce-every-micro-step keeps fsdp's gradients sharded"):
        run(tiny_args(shards, tmp_path / "r", "--reduce-every-micro-step"))


def test_fsdp_needs_several_ranks(shards, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), *tiny_args(shards, tmp_path / "r"),
                          "--shard", "fsdp"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "--shard fsdp splits the model over ranks: launch with torchrun" in out.stderr
    assert not (tmp_path / "r").exists()


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "shards")


# -----------------------------------------------------------------------------
# --activation-checkpointing


def backward_with_saved_count(model, x, y) -> tuple[dict, int]:
    """The gradients of one forward/backward, and how many elements autograd kept for the backward."""
    model.zero_grad()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = model(x, y)[1]
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = gpt2.GPT(gpt2.GPTConfig(block_size=16, vocab_size=64, n_layer=3, n_head=2, n_embd=32))
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    plain, plain_saved = backward_with_saved_count(model, x, y)
    model.activation_checkpointing = True
    ac, ac_saved = backward_with_saved_count(model, x, y)
    for name, g in plain.items():
        assert torch.equal(ac[name], g), name
    assert ac_saved < plain_saved / 2, (ac_saved, plain_saved)  # what autograd keeps for backward: the point of it


def test_activation_checkpointing_only_where_there_is_a_backward(monkeypatch):
    model = gpt2.GPT(gpt2.GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    model.activation_checkpointing = True
    monkeypatch.setattr(gpt2, "checkpoint", lambda *a, **k: pytest.fail("checkpointed without a backward"))
    with torch.no_grad():  # evaluation
        model(torch.randint(0, 64, (2, 16)))
    model.generate(torch.zeros(1, 1, dtype=torch.long), max_new_tokens=3)  # the KV cache path


def test_activation_checkpointing_trains_identically(shards, tmp_path):
    plain = run(tiny_args(shards, tmp_path / "plain"))
    ac = run(tiny_args(shards, tmp_path / "ac", "--activation-checkpointing"))
    assert ac["train"] == plain["train"] and ac["val"] == plain["val"]  # bitwise on the CPU


# -----------------------------------------------------------------------------
# --dtype float16: autocast with a gradient scaler


def overflow_at(step: int, seen: list):
    """An on_step callback that makes the gradients of the given step overflow (an inf in one gradient), and
    records the weights after every step."""
    def on_step(s, stats):
        seen.append({k: v.clone() for k, v in stats["model"].state_dict().items()})
        if s == step - 1:
            w = stats["model"].transformer.h[0].mlp.c_fc.weight
            handle = w.register_hook(lambda g: (handle.remove(), g * math.inf)[1])
    return on_step


def test_float16_overflow_is_skipped_and_logged(shards, tmp_path):
    seen = []
    history = run(tiny_args(shards, tmp_path / "r", "--dtype", "float16"), on_step=overflow_at(1, seen))
    assert history["skipped"] == {1: 32768.0}  # GradScaler starts at 2**16, halves on an overflow
    for name, w in seen[0].items():
        assert torch.equal(seen[1][name], w), f"{name} changed in the skipped step"
    assert not torch.equal(seen[2]["lm_head.weight"], seen[1]["lm_head.weight"])  # the next one is applied
    assert all(math.isfinite(v) for v in history["train"].values()) and max(history["train"]) == 5
    assert "1 skipped 32768\n" in (tmp_path / "r" / "log.txt").read_text()


def test_float16_resume_is_exact_with_the_loss_scale(shards, tmp_path):
    args = lambda d, *x: tiny_args(shards, d, "--dtype", "float16", "--checkpoint-interval", "100", *x, steps=6)
    run(args(tmp_path / "straight"), on_step=overflow_at(1, []))
    run(args(tmp_path / "split", "--stop-after-step", "2"), on_step=overflow_at(1, []))
    assert final_state(tmp_path / "split")["scaler"]["scale"] == 32768.0
    run(args(tmp_path / "split", "--resume"))
    assert_same_run(tmp_path / "straight", tmp_path / "split")
    assert final_state(tmp_path / "split")["scaler"] == final_state(tmp_path / "straight")["scaler"]


def test_float16_that_overflows_even_unscaled_stops(shards, tmp_path):
    def on_step(step, stats):  # from step 0 on, every gradient overflows: the scale halves below 1, then stop
        stats["model"].transformer.h[0].mlp.c_fc.weight.register_hook(lambda g: g * math.inf)
    with pytest.raises(tg.TrainingDiverged, match=r"gradient norm is (nan|inf) at step 17"):
        run(tiny_args(shards, tmp_path / "r", "--dtype", "float16", steps=40), on_step=on_step)


def test_auto_dtype(monkeypatch):
    assert auto_dtype("cpu") == "float32" and setup_precision("auto", "cpu") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # V100, T4, RTX 20xx
    assert auto_dtype("cuda") == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert auto_dtype("cuda") == "bfloat16"
    assert setup_precision("float16", "cpu") is torch.float16
