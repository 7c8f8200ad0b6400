"""Faults a long run meets, through the real command line (`python train_gpt2.py ...`): damaged checkpoints.

torch.save's zip stores a CRC-32 of every record (the pickle, each tensor's bytes) that torch.load never reads, so
a flipped byte inside a tensor loaded silently; every checkpoint is now verified before it is used.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import REPO, tiny_args, write_shards

import gpt2
import train_gpt2 as tg


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after step 5 with checkpoints at steps 3 and 5 (each test damages a copy), and an
    uninterrupted run's final weights to compare resumes with."""
    root = tmp_path_factory.mktemp("faults")
    shards = write_shards(root / "shards")
    args = lambda d, *x: tiny_args(shards, root / d, "--checkpoint-interval", "3", "--eval-interval", "0", *x,
                                   steps=9)
    cli(args("straight"))
    cli(args("stopped", "--stop-after-step", "5"))
    assert [p.name for p in tg.checkpoints(root / "stopped")] == ["model_00003.pt", "model_00005.pt"]
    return root, args


def cli(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "train_gpt2.py", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def copy_run(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir()
    for p in (root / "stopped").iterdir():
        if p.is_file():
            (folder / p.name).write_bytes(p.read_bytes())
    return folder


def flip_byte(path: Path, at: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_tensor_is_found(stopped_run):
    root, _ = stopped_run
    path = copy_run(root, "flipped") / "model_00005.pt"
    assert torch.load(path, weights_only=True)["step"] == 5  # what torch.load alone says: nothing
    gpt2.check_checkpoint_bytes(path)
    flip_byte(path)
    torch.load(path, weights_only=True)  # still loads, silently, with one weight changed
    with pytest.raises(gpt2.CheckpointDamaged, match=r"checkpoint .*model_00005\.pt is damaged \(BadZipFile: Bad CRC"):
        gpt2.load_checkpoint(path)


def test_resume_falls_back_past_a_damaged_newest_checkpoint(stopped_run):
    root, args = stopped_run
    folder = copy_run(root, "fallback")
    flip_byte(folder / "model_00005.pt")
    out = cli(args("fallback", "--resume"))
    warnings = [ln for ln in out.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "model_00005.pt is damaged" in warnings[0], out.stderr[-2000:]
    assert "resuming from an older checkpoint" in warnings[0]
    assert f"resuming from {folder / 'model_00003.pt'} at step 4" in out.stdout
    a = torch.load(folder / "model_00008.pt", weights_only=True)  # steps 4..8 again: the uninterrupted run's
    b = torch.load(root / "straight" / "model_00008.pt", weights_only=True)
    for name, w in b["model"].items():
        assert torch.equal(a["model"][name], w), name


def test_an_explicit_damaged_checkpoint_is_an_error_naming_it(stopped_run):
    root, args = stopped_run
    folder = copy_run(root, "explicit")
    flip_byte(folder / "model_00005.pt")
    out = cli(args("explicit", "--resume", str(folder / "model_00005.pt")), check=False)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert str(folder / "model_00005.pt") in last and "is damaged" in last and "--resume alone" in last, last
    assert not (folder / "model_00008.pt").exists()
    # every checkpoint damaged: an error, not a fresh start over them
    flip_byte(folder / "model_00003.pt")
    out = cli(args("explicit", "--resume"), check=False)
    assert out.returncode != 0 and "every checkpoint in" in out.stderr.strip().splitlines()[-1]


def test_other_entry_points_refuse_a_damaged_checkpoint(stopped_run):
    root, _ = stopped_run
    path = copy_run(root, "sample") / "model_00005.pt"
    flip_byte(path)
    out = subprocess.run([sys.executable, "train_gpt2.py", "sample", "-m", str(path), "--max-new-tokens", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "is damaged" in out.stderr.strip().splitlines()[-1], out.stderr[-2000:]


def test_resume_auto_starts_afresh_then_continues_with_the_same_command(stopped_run):
    """The same command line for a job's first launch and its relaunches: --resume auto."""
    root, args = stopped_run
    first = cli(args("auto", "--resume", "auto", "--stop-after-step", "5"))
    assert "resuming from" not in first.stdout and (root / "auto" / "model_00005.pt").is_file()
    again = cli(args("auto", "--resume", "auto"))
    assert f"resuming from {root / 'auto' / 'model_00005.pt'} at step 6" in again.stdout
    a = torch.load(root / "auto" / "model_00008.pt", weights_only=True)
    b = torch.load(root / "straight" / "model_00008.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], w) for k, w in b["model"].items())
    log = lambda d: [ln for ln in (root / d / "log.txt").read_text().splitlines() if " train " in ln]
    assert log("auto") == log("straight")  # every step's loss


def test_keep_last_deletes_old_checkpoints_only_once_the_new_one_is_in_place(stopped_run):
    root, args = stopped_run
    folder = copy_run(root, "keep")  # checkpoints 3 and 5; the run then writes 6 and 8
    cli(args("keep", "--resume", "--keep-last", "2"))
    assert [p.name for p in tg.checkpoints(folder)] == ["model_00006.pt", "model_00008.pt"]
    out = cli(args("keep1", "--keep-last", "1"), check=False)
    assert out.returncode != 0 and "--keep-last 1: keep 2 or more" in out.stderr.strip().splitlines()[-1]
    assert not (root / "keep1").exists() or not tg.checkpoints(root / "keep1")
