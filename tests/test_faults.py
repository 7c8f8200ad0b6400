"""Faults a long run meets, each through the real command line (`python train_gpt2.py ...`, or `torchrun
--standalone --max-restarts=N train_gpt2.py ... --resume auto` with 2 Gloo ranks): damaged checkpoints, ranks
killed (one while writing a checkpoint), a hung rank, preemption, a full disk, a crash loop, --keep-last and
--checkpoint-minutes. Faults are injected through the GPT2_FAULTS environment variable (fault).

torch.save's zip stores a CRC-32 of every record (the pickle, each tensor's bytes) that torch.load never reads, so
a flipped byte inside a tensor loaded silently; every checkpoint is now verified before it is used.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import REPO, assert_same_state, final_state, log_lines, tiny_args, write_shards

import support.checkpoints
import train_gpt2 as tg
from support import faults
from support.checkpoints import CheckpointDamaged, check_checkpoint_bytes, checkpoint_step, load_checkpoint
from support.distributed import torchrun_store
from support.faults import FAULTS_ENV
from support.long_runs import ATTEMPTS_FILE, NO_PROGRESS_EXIT


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
    assert [p.name for p in support.checkpoints.checkpoints(root / "stopped")] == ["model_00003.pt", "model_00005.pt"]
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
    check_checkpoint_bytes(path)
    flip_byte(path)
    torch.load(path, weights_only=True)  # still loads, silently, with one weight changed
    with pytest.raises(CheckpointDamaged, match=r"checkpoint .*model_00005\.pt is damaged \(BadZipFile: Bad CRC"):
        load_checkpoint(path)


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
    assert [p.name for p in support.checkpoints.checkpoints(folder)] == ["model_00006.pt", "model_00008.pt"]
    out = cli(args("keep1", "--keep-last", "1"), check=False)
    assert out.returncode != 0 and "--keep-last 1: keep 2 or more" in out.stderr.strip().splitlines()[-1]
    assert not (root / "keep1").exists() or not support.checkpoints.checkpoints(root / "keep1")


# -----------------------------------------------------------------------------
# Under torchrun: 2 Gloo ranks, faults injected through GPT2_FAULTS (support/faults.py), the documented long-run
# command `torchrun --standalone --max-restarts=N train_gpt2.py ... --resume auto`.


def torchrun_job(args: list[str], faults: str = "", restarts: int = 0, timeout: int = 240,
                 **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """train_gpt2.py under `torchrun --standalone --nproc_per_node=2 --max-restarts=restarts`, through
    tests/faulty_train.py where there are faults to inject; with popen arguments (stdout=...), the running
    torchrun process instead of its result."""
    script = "tests/faulty_train.py" if faults else "train_gpt2.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", FAULTS_ENV: faults}
    job = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, start_new_session=True,
                           **(popen or dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    if popen:
        return job
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hang: torchrun and its workers all go, none left running
        os.killpg(job.pid, signal.SIGKILL)
        stdout, stderr = job.communicate()
        pytest.fail(f"torchrun still running after {timeout} s: {stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, job.returncode, stdout, stderr)


def assert_same_as_uninterrupted(log_dir: Path, straight: Path) -> None:
    """Every train and val line (those a restart wrote again too) equals the uninterrupted run's at its step,
    every step is there, and the last checkpoint's weights and AdamW state are the same tensors."""
    for name in ("train", "val"):
        want = dict(log_lines(straight, name))
        got = log_lines(log_dir, name)
        assert {s for s, _ in got} == set(want) and all(v == want[s] for s, v in got), (name, got, want)
    assert_same_state(final_state(log_dir), final_state(straight))


def steps_logged(log_dir: Path) -> set[int]:
    """The steps log.txt has a train line for so far (it may be being written)."""
    path = log_dir / "log.txt"
    rows = [ln.split() for ln in path.read_text().splitlines()] if path.is_file() else []
    return {int(r[0]) for r in rows if len(r) == 3 and r[1] == "train"}


def restarts_logged(log_dir: Path) -> list[tuple[int, int]]:
    return [(s, int(v)) for s, v in log_lines(log_dir, "restart")]


@pytest.fixture(scope="module")
def ranks2(tmp_path_factory):
    """An uninterrupted 2-rank run (9 steps, checkpoints at 3, 6, 8, evaluations at 0, 3, 6, 8) to compare with."""
    root = tmp_path_factory.mktemp("ranks2")
    shards = write_shards(root / "shards")
    args = lambda d, *x: tiny_args(shards, root / d, "--checkpoint-interval", "3", *x, steps=9)
    out = torchrun_job(args("straight"))
    assert out.returncode == 0, out.stderr[-3000:]
    return root, args


def test_killed_ranks_restart_and_finish_as_if_never_killed(ranks2):
    """kill -9 of rank 0 while it writes checkpoint 3 (before any checkpoint exists), then of rank 1 at step 5 of
    the restart; each restarted rank 1 (then rank 0) reaches the process group 3 s late, so that its peer reads
    the group's keys first: in torchrun's shared store those were the killed attempt's, and Gloo connected to a
    dead address and hung (fixed by torchrun_store). --max-restarts=2 --resume auto: exit 0, the same run."""
    root, args = ranks2
    faults = "kill-in-save@3:0:0,kill@5:1:1,late@start:1:1,late@start:0:2"
    out = torchrun_job(args("killed", "--resume", "auto"), faults, restarts=2)  # a hang: fails at 240 s
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # the survivors of each kill exited within torchrun's SIGTERM grace: none had to be SIGKILLed
    assert "Sending process" in out.stderr and "forcefully exiting" not in out.stderr, out.stderr[-3000:]
    log_dir = root / "killed"
    assert restarts_logged(log_dir) == [(0, 1), (4, 2)]  # restart 1 afresh (no checkpoint yet), 2 from step 3
    assert not list(log_dir.glob(".*.tmp*"))  # the half-written checkpoint 3 of attempt 0 was cleared away
    assert_same_as_uninterrupted(log_dir, root / "straight")


def test_a_hung_rank_ends_the_job_within_the_timeout_and_the_restart_finishes(ranks2):
    """SIGSTOP of rank 1 just before step 6's evaluation under --shard fsdp: rank 0 waits in gathered()'s
    all-gather for at most --dist-timeout (twice: the all-gather, then the evaluation's error collective), then
    fails; torchrun stops the hung rank (SIGTERM, then SIGKILL after its 30 s grace) and restarts both."""
    root, args = ranks2
    straight = torchrun_job(args("fsdp", "--shard", "fsdp"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    t0 = time.monotonic()
    out = torchrun_job(args("hung", "--shard", "fsdp", "--resume", "auto", "--dist-timeout", "4"), "stop@eval6:1:0",
                       restarts=1)
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert took < 2 * 4 + 30 + 120, took  # the timeouts, torchrun's grace, two attempts' start-up and steps
    assert "forcefully exiting via 9" in out.stderr  # the stopped rank: SIGTERM, 30 s of grace, then SIGKILL (9)
    gloo_timeouts = ("Application timeout caused pair closure", "Timed out waiting 4000ms")  # Gloo's own words
    assert any(m in out.stderr for m in gloo_timeouts), out.stderr[-3000:]
    assert restarts_logged(root / "hung") == [(0, 0), (4, 1)]  # from checkpoint 3
    assert_same_as_uninterrupted(root / "hung", root / "fsdp")


def test_sigterm_to_torchrun_checkpoints_at_once_then_resumes_bitwise(ranks2):
    """Preemption: SIGTERM to torchrun during step 5 (which sleeps 3 s there on both ranks). torchrun passes it to
    the workers: they finish step 5, write its checkpoint and exit within torchrun's 30 s grace."""
    root, args = ranks2
    log_dir = root / "preempted"
    job = torchrun_job(args("preempted", "--resume", "auto"), "late@5", restarts=0,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while 4 not in steps_logged(log_dir):  # step 4 done: step 5 is sleeping
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        stdout, stderr = job.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # what is left of the job, if anything
            os.killpg(job.pid, signal.SIGKILL)
    assert time.monotonic() - t0 < 30, stderr[-3000:]
    stopped = [p for p in support.checkpoints.checkpoints(log_dir) if checkpoint_step(p) != 3]  # 5, or later (load)
    assert len(stopped) == 1 and f"stopped after step {checkpoint_step(stopped[0])}" in stdout, stdout + stderr
    assert 5 <= checkpoint_step(stopped[0]) < 8
    out = torchrun_job(args("preempted", "--resume", "auto"))  # the same command line again
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_as_uninterrupted(log_dir, root / "straight")


def test_a_full_disk_stops_every_rank_and_the_previous_checkpoint_resumes(ranks2):
    root, args = ranks2
    log_dir = root / "full"
    out = torchrun_job(args("full"), "enospc@6")
    assert out.returncode != 0
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("train_gpt2.py: error:")]
    assert len(errors) == 2, out.stderr[-3000:]  # both ranks, one line each
    assert any(f"could not write {log_dir / 'model_00006.pt'}" in e and "No space left on device" in e
               for e in errors), errors
    assert [p.name for p in support.checkpoints.checkpoints(log_dir)] == ["model_00003.pt"]
    assert not list(log_dir.glob(".*.tmp*"))
    out = torchrun_job(args("full", "--resume"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_as_uninterrupted(log_dir, root / "straight")


def test_a_deterministic_crash_ends_the_restart_loop_with_its_own_exit_code(ranks2):
    """A NaN at step 5 on every launch (no --spike-guard: the run stops there): restart 1 resumes from checkpoint
    3, restart 2 would again, so it ends the job: torchrun killed by SIGUSR2, status 140 in a shell."""
    root, args = ranks2
    out = torchrun_job(args("loop", "--resume", "auto"), "nan@5", restarts=5)
    assert out.returncode == -signal.SIGUSR2, (out.returncode, out.stderr[-3000:])  # a shell's $? is 140
    assert restarts_logged(root / "loop") == [(0, 0), (4, 1)]  # attempt 2 stopped before it logged a start
    assert [ln.split()[1:] for ln in (root / "loop" / ATTEMPTS_FILE).read_text().splitlines()] == [
        ["0", "0"], ["1", "4"]]
    reasons = [ln for ln in out.stderr.splitlines() if "stopping this crash loop" in ln]
    assert reasons and "torchrun restart 2 would start from" in reasons[0] and "model_00003.pt" in reasons[0]
    assert out.stderr.count("loss is nan at step 5") >= 2
    assert 128 + signal.SIGUSR2 == NO_PROGRESS_EXIT == 140


def test_checkpoint_minutes_also_checkpoints_when_the_time_has_passed(tmp_path, monkeypatch):
    """--checkpoint-minutes 0.02 (1.2 s), no periodic checkpoints: step 4 sleeps 3 s, so its checkpoint is due."""
    shards = write_shards(tmp_path / "shards")
    monkeypatch.setenv(FAULTS_ENV, "late@4")
    args = tiny_args(shards, tmp_path / "r", "--checkpoint-interval", "0", "--checkpoint-minutes", "0.02", steps=9)
    with faults.injected(tg):
        history = tg.train(tg.parse_train_args(args))
    steps = [checkpoint_step(Path(p)) for p in history["checkpoints"]]
    assert 4 in steps and steps[-1] == 8, steps  # (under load, 0..3 may take 1.2 s too: one more)


@pytest.mark.parametrize("flags, message", [
    (["--dist-timeout", "0"], "--dist-timeout 0.0: give seconds > 0"),
    (["--checkpoint-minutes", "-1"], "--checkpoint-minutes -1.0: give minutes > 0"),
])
def test_bad_fault_flags_are_errors_before_step_0(tmp_path, flags, message):
    out = cli(tiny_args(write_shards(tmp_path / "shards"), tmp_path / "r", *flags), check=False)
    assert out.returncode == 2 and message in out.stderr.strip().splitlines()[-1], out.stderr[-2000:]
    assert not (tmp_path / "r" / "log.txt").exists()


def test_restarts_over_several_nodes_need_a_fresh_store_per_attempt(monkeypatch):
    """Each node counts its own restarts, so keys by the restart count could mix attempts across nodes."""
    for k, v in dict(TORCHELASTIC_USE_AGENT_STORE="True", GROUP_WORLD_SIZE="2", TORCHELASTIC_MAX_RESTARTS="3").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        torchrun_store(4, None)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what that variable makes torchrun say
    assert torchrun_store(4, None) is None


def test_error_lines_from_ranks_sharing_stderr_never_run_together():
    """Under torchrun every rank writes to the same stderr. print() writes a line's text and its newline apart, so
    two ranks failing together could print one garbled line; report_error writes each line whole."""
    code = ("import sys; from support.errors import report_error\n"
            "for _ in range(3000): report_error('train_gpt2.py', sys.argv[1] * 200)")
    r, w = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", code, c], cwd=REPO, stderr=w) for c in "ab"]
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        lines = pipe.read().decode().splitlines()
    assert [p.wait() for p in procs] == [0, 0]
    assert len(lines) == 6000
    assert all(ln in (f"train_gpt2.py: error: {'a' * 200}", f"train_gpt2.py: error: {'b' * 200}") for ln in lines)
