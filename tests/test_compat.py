"""What users hold keeps working across changes of the code's layout: checkpoints written by earlier code resume with
the losses that code logged, export to the same files, and every flag and subcommand is still accepted.

The fixtures in tests/fixtures/ were written by the code before support/ existed (commit 2d0b47b): for each recipe,
a run of 6 steps stopped after step 2 (its checkpoint, {recipe}_model_00002.pt) and the same run uninterrupted
(its log.txt without the timings, {recipe}_log.txt); shapes and flags are FIXTURE_ARGS, data test_train's shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import REPO, write_shards

import gpt2
import train_gpt2 as tg

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE_ARGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--vocab-size", "64",
                "--seq-len", "8", "--micro-batch-size", "2", "--total-batch-size", "32", "--max-steps", "6",
                "--warmup-steps", "2", "--eval-interval", "3", "--val-steps", "2", "--no-hellaswag", "--num-samples",
                "0", "--device", "cpu", "--no-compile", "--max-lr", "1e-2", "--checkpoint-interval", "100"]
TIMINGS = ("tokens_per_sec", "mfu")  # log.txt's lines that depend on the machine's speed
# the recipe the fixtures' modern runs had (record 10's), as flags: --recipe modern has since become nanochat's
RECIPE_FLAGS = {
    "gpt2": ["--recipe", "gpt2"],
    "modern": ["--recipe", "modern", "--logit-softcap", "30", "--rope-base", "10000", "--qk-gain", "1",
               "--no-value-embeds", "--no-layer-scalars", "--no-smear", "--no-backout", "--init", "gpt2",
               "--muon-variant", "keller", "--adamw-groups", "shared", "--no-lr-width-scale", "--muon-lr", "0.02",
               "--muon-momentum", "0.95", "--muon-momentum-end", "0.95", "--muon-momentum-warmup", "500",
               "--muon-weight-decay", "0", "--muon-weight-decay-schedule", "constant", "--embed-lr", "0.3",
               "--head-lr", "0.002", "--scalar-lr", "0.02", "--cooldown-frac", "0.3", "--min-lr-ratio", "0"],
}

# sha256 of the files `train_gpt2.py export` wrote from each fixture with the earlier code
EXPORTS = {
    "gpt2": {"config.json": "14d16d4d51cbeed851dcf2498e61019910b8e3e891c3f64a9b9a50c8e39926ad",
             "model.safetensors": "9343c77519b2dfb95e243f943e3252bd9e48053407999f8ebc609ae3fcd54da2"},
    "modern": {"config.json": "482669da8d1edeac7fc66e16bf0c5b29cb544b7af8ffc64030bd2f2b25bce02f",
               "model.safetensors": "9a603b435b760ae04bec9de11eba58cafa22a6ab5a2aadf0f42660fcb01cd860"},
}

# every flag train_gpt2.py took before (its parser's option strings), and its subcommands
FLAGS = [
    "--activation-checkpointing", "--beta1", "--beta2", "--bias", "--block-size", "--checkpoint-interval",
    "--checkpoint-minutes", "--compile", "--cooldown-frac", "--data", "--device", "--dist-timeout", "--dtype",
    "--embed-lr", "--eps", "--eval-interval", "--grad-clip", "--head-lr", "--hellaswag", "--hellaswag-file",
    "--init-from", "--keep-last", "--log-dir", "--logit-softcap", "--loss-chunk", "--max-lr", "--max-new-tokens",
    "--max-rewinds", "--max-steps", "--micro-batch-size", "--min-lr-ratio", "--mlp", "--muon-lr", "--muon-momentum",
    "--muon-momentum-start", "--muon-momentum-warmup", "--muon-weight-decay", "--n-embd", "--n-head", "--n-layer",
    "--no-activation-checkpointing", "--no-bias", "--no-compile", "--no-hellaswag", "--no-qk-norm",
    "--no-reduce-every-micro-step", "--no-shuffle", "--no-spike-guard", "--no-split-qkv", "--no-tensorboard",
    "--no-tie-embeddings", "--no-zero-init-proj", "--norm", "--num-return-sequences", "--num-samples", "--optimizer",
    "--pos-emb", "--preset", "--prompt", "--qk-norm", "--recipe", "--reduce-every-micro-step", "--resume",
    "--rope-base", "--sample-tokens", "--scalar-lr", "--schedule", "--seed", "--seq-len", "--shard", "--shuffle",
    "--spike-guard", "--spike-threshold", "--spike-window", "--split-qkv", "--stop-after-step", "--target-val-loss",
    "--temperature", "--tensorboard", "--tie-embeddings", "--top-k", "--total-batch-size", "--val-fraction",
    "--val-steps", "--vocab-size", "--wandb", "--warmup-steps", "--weight-decay", "--zero-init-proj",
]


def log_lines(path: Path, first_step: int = 0) -> list[str]:
    return [line for line in path.read_text().splitlines()
            if line.split()[1] not in TIMINGS and int(line.split()[0]) >= first_step]


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_a_checkpoint_of_the_earlier_code_resumes_with_the_losses_it_logged(tmp_path, recipe):
    """Through the command line: the earlier code's checkpoint after step 2, resumed to step 5 by this code, logs
    what the earlier code's uninterrupted run logged for steps 3..5, to the last digit, and what this code's own
    uninterrupted run logs."""
    shards = write_shards(tmp_path / "shards")
    args = lambda log_dir, *extra: [sys.executable, str(REPO / "train_gpt2.py"), "--data", str(shards), "--log-dir",
                                    str(log_dir), *FIXTURE_ARGS, *RECIPE_FLAGS[recipe], *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    resumed = subprocess.run(args(tmp_path / "resumed", "--resume", str(FIXTURES / f"{recipe}_model_00002.pt")),
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {FIXTURES / f'{recipe}_model_00002.pt'} at step 3" in resumed.stdout
    want = log_lines(FIXTURES / f"{recipe}_log.txt", first_step=3)
    assert want and log_lines(tmp_path / "resumed" / "log.txt") == want
    # and the checkpoint it writes has the same entries, its arguments under the same names (and new flags' beside)
    old = torch.load(FIXTURES / f"{recipe}_model_00002.pt", weights_only=True)
    new = torch.load(tmp_path / "resumed" / "model_00005.pt", weights_only=True)
    assert new.keys() == old.keys() and new["args"].keys() >= old["args"].keys()
    defaults = dataclasses.asdict(gpt2.GPTConfig())  # options added since: at GPT-2's values, as the old model ran
    assert {k: new["config"][k] for k in old["config"]} == old["config"]
    assert all(new["config"][k] == defaults[k] for k in new["config"].keys() - old["config"].keys())
    straight = subprocess.run(args(tmp_path / "straight"), capture_output=True, text=True, env=env, cwd=REPO,
                              timeout=120)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert log_lines(tmp_path / "straight" / "log.txt") == log_lines(FIXTURES / f"{recipe}_log.txt")


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_an_earlier_checkpoint_exports_to_the_same_files(tmp_path, recipe):
    out = subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), "export",
                          str(FIXTURES / f"{recipe}_model_00002.pt"), str(tmp_path / "hf")],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    written = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "hf").iterdir()}
    assert written == EXPORTS[recipe]


def test_every_flag_is_still_accepted():
    options = {o for action in tg.build_train_parser()._actions for o in action.option_strings}
    assert set(FLAGS) <= options, sorted(set(FLAGS) - options)
    for subcommand in ("sample", "export", "plan"):
        out = subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), subcommand, "--help"],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 0 and f"train_gpt2.py {subcommand}" in out.stdout, out.stderr[-2000:]
