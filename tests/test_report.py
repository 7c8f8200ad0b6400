"""The report card (eval_suite.py -m CKPT --report) of a real quick-start run: every section there, and its numbers
those of the separate commands (the run's own evaluation of the same weights, hellaswag.py, eval_suite.py --tasks
core); play.ipynb shows it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_notebook import execute_notebook, shakespeare_args
from test_train import HELLASWAG_FIXTURE

import eval_suite as es
import hellaswag
import train_gpt2 as tg
from bench.bench_core import write_bundle
from support.checkpoints import load_checkpoint
from support.data import text_splits
from support.distributed import Dist
from support.hf import load_model
from support.metrics import read_log
from support.report import nearest_gpt2, render_markdown, validation_loss, validation_windows

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    """The quick start for 8 steps (evaluations at 0, 4 and 7 with HellaSwag on a local file; checkpoints after
    steps 3, 6 and 7), then the card of the checkpoint after step 3, whose weights step 4's evaluation measured."""
    root = tmp_path_factory.mktemp("report")
    hella = root / "hellaswag_val.jsonl"
    hella.write_text("".join(json.dumps(e) + "\n" for e in HELLASWAG_FIXTURE))
    bundle = write_bundle(root / "eval_bundle", n=12)
    run = root / "run"
    args = ["--preset", "shakespeare", "--max-steps", "8", "--eval-interval", "4", "--checkpoint-interval", "3",
            "--hellaswag", "--hellaswag-file", str(hella), "--log-dir", str(run), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "train_gpt2.py", *args, *shakespeare_args(root)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = run / "model_00003.pt"
    out = subprocess.run([sys.executable, "eval_suite.py", "-m", str(ckpt), "--report", "--hellaswag-file", str(hella),
                          "--core-bundle", str(bundle), "--device", "cpu"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, run, ckpt, hella, bundle, out.stdout


def test_every_section_is_there(card):
    _, run, _, _, _, stdout = card
    md = (run / "report.md").read_text()
    assert md == stdout.rstrip("\n") + "\n"  # what it printed
    for section in (f"# Report card: {run / 'model_00003.pt'}", "| validation loss |", "| HellaSwag acc_norm |",
                    "| CORE |", "![loss and HellaSwag curves](report.png)", "## CORE, task by task", "## Samples"):
        assert section in md, section
    assert (run / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((run / "report.json").read_text())
    assert data["model"]["steps"] == 4 and data["model"]["tokens"] == 4 * 1024 and data["model"]["recipe"] == "gpt2"
    assert data["nearest_gpt2"] == nearest_gpt2(data["model"]["parameters"]) == "gpt2 (124M)"
    assert len(data["samples"]) == 3 and all(s.startswith("Hello, I'm a language model,") for s in data["samples"])
    assert [r["metric"] for r in data["comparison"]] == ["validation loss", "HellaSwag acc_norm", "CORE"]
    assert [r["gpt2"] for r in data["comparison"]] == [3.2924, 0.2955, 0.1139]


def test_its_numbers_are_the_separate_commands(card, tmp_path, capsys):
    root, run, ckpt, hella, bundle, _ = card
    data = json.loads((run / "report.json").read_text())
    log, _ = read_log(run / "log.txt")
    # the run's own evaluation at step 4 measured these weights: the same validation windows, the same examples
    assert f"{data['validation']['value']:.4f}" == f"{log['val'][4]:.4f}"
    assert f"{data['hellaswag']['acc_norm']:.4f}" == f"{log['hella'][4]:.4f}"
    assert hellaswag.main(["-m", str(ckpt), "--data-file", str(hella), "-d", "cpu"]) == 0
    assert f"acc_norm {data['hellaswag']['acc_norm']:.4f}" in capsys.readouterr().out
    out = tmp_path / "core.json"
    assert es.main(["-m", str(ckpt), "--tasks", "core", "--core-bundle", str(bundle), "--output", str(out),
                    "--device", "cpu"]) == 0
    core = json.loads(out.read_text())
    assert data["core"]["results"] == core["results"] and data["core"]["core_metric"] == core["core_metric"]


def test_the_notebook_shows_the_card(card, tmp_path, monkeypatch):
    _, run, _, _, _, _ = card
    text = execute_notebook(run, tmp_path, monkeypatch)
    assert "Report card: " in text and re.search(r"\| CORE \| -?[\d.]+ ± [\d.]+ \| 0\.1139 \|", text), text[-3000:]


def test_report_needs_one_of_our_checkpoints(capsys):
    assert es.main(["-m", "gpt2", "--report", "--device", "cpu"]) == 2
    assert "--report -m gpt2: give one of our checkpoints" in capsys.readouterr().err


def test_the_validation_windows_are_the_runs_even_past_the_end_of_the_split(tmp_path):
    """As training's DataLoader: each rank's share of whole groups, shard after shard, starting over at the end."""
    text = tmp_path / "small.txt"
    text.write_text("To be, or not to be, that is the question. " * 300)
    val = text_splits(text, 0.1, Dist())["val"]
    for B, T, world in ((2, 16, 1), (1, 32, 2), (4, 8, 3)):
        for rank in range(world):
            loader = tg.DataLoader(val, B, T, rank, world)
            want = [torch.cat([x.view(-1), y.view(-1)[-1:]]) for x, y in (loader.next_batch() for _ in range(40))]
            got = [w for _, w in zip(range(40), validation_windows(val, B, T, rank, world))]
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (B, T, world, rank)


def test_a_run_without_validation_gets_a_card_that_says_why(card, tmp_path):
    _, _, ckpt, _, _, _ = card
    model = load_model(str(ckpt))
    args = load_checkpoint(ckpt)["args"]
    why = lambda **change: validation_loss(model, {"args": {**args, **change}, "world_size": 1}, "cpu")["why"]
    assert "no validation windows: --val-steps 0" in why(val_steps=0)
    assert "no validation windows" in why(micro_batch_size=10**6)
    assert "is not here" in why(data=str(tmp_path / "gone"))
    (tmp_path / "shards").mkdir()
    assert "no val shards" in why(data=str(tmp_path / "shards"))
    assert "does not hold the run's data" in validation_loss(model, {}, "cpu")["why"]
    windows = (len(text_splits(Path(args["data"]), args["val_fraction"], Dist())["val"][0]) - 1) // (8 * 128)
    long = validation_loss(model, {"args": {**args, "val_steps": windows + 3}, "world_size": 1}, "cpu")
    assert long["value"] > 0 and long["tokens"] == (windows + 3) * 8 * 128  # past the split's end: from its start


def test_a_card_without_a_step_or_a_world_size_renders(card):
    _, run, _, _, _, _ = card
    data = json.loads((run / "report.json").read_text())
    data["model"].update(steps=None, tokens=None, world_size=None)
    data["core_max_per_task"] = 5
    md = render_markdown(data)
    assert "? steps, ? tokens" in md and "on ? rank(s)" in md and "the first 5 examples of each of" in md


FAIL_ON_RANK_1 = """
import os, sys
sys.path.insert(0, {repo!r})
import eval_suite as es
original = es.GPTLM.core_correct
def core_correct(self, task):
    if os.environ["RANK"] == "1" and task.label == "schema_zeroshot":
        raise ValueError("rank 1 broke on " + task.label)
    return original(self, task)
es.GPTLM.core_correct = core_correct
sys.exit(es.main(sys.argv[1:]))
"""


def test_a_failure_on_one_rank_stops_both_and_is_printed(card, tmp_path):
    """--report under torchrun: rank 1 fails in CORE; it prints its error, rank 0 says another rank failed, both
    exit (no rank waits in a collective for one that has stopped)."""
    _, _, ckpt, hella, bundle, _ = card
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1.format(repo=str(REPO)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "-m", str(ckpt), "--report", "--hellaswag-file", str(hella), "--core-bundle", str(bundle), "--device", "cpu"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert "eval_suite.py: error: rank 1 broke on schema_zeroshot" in out.stderr, out.stderr[-3000:]
    assert "another rank failed" in out.stderr
