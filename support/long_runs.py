"""
Long runs: what keeps a run of days going, and stops it cleanly when it cannot go on.

    StopSignal     SIGTERM / SIGINT (preemption, Ctrl-C): finish the step, checkpoint, exit; --checkpoint-minutes
    SpikeGuard     --spike-guard: a loss far above its recent ones is undone (rewind) and its batches skipped
    start_attempt  the checkpoint a (re)started attempt resumes from; a torchrun crash loop is stopped (NoProgress)
    end_torchrun   a crash loop ends torchrun itself with NO_PROGRESS_EXIT, so that a scheduler does not requeue it

Hung ranks: collectives wait --dist-timeout seconds from the first step on (support/distributed.py's
set_collective_timeout), so a rank that hangs ends the job, and torchrun --max-restarts restarts it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from support.checkpoints import first_step, load_checkpoint, open_resume, restore_run
from support.distributed import Dist, on_every_rank, patient_collectives, torchrun_attempt
from support.errors import TrainError, TrainingDiverged

NO_PROGRESS_EXIT = 140  # a crash loop under torchrun ends the job with this status (128 + SIGUSR2 on Linux)
ATTEMPTS_FILE = "restarts.txt"  # in --log-dir: each torchrun attempt's run id, restart count and first step


@dataclass
class LongRunConfig:
    checkpoint_minutes: float = 0  # also checkpoint when this many minutes passed since the last one (spot machines)
    stop_after_step: int | None = None  # checkpoint and exit after this step, as if preempted (fixed-length jobs)
    dist_timeout: float = 120  # seconds a collective waits for a hung rank from the first step on (before it: 30 min)
    spike_guard: bool = False  # a loss far above its recent ones: rewind to the newest checkpoint, skip its batches
    spike_threshold: float = 8.0  # a spike: loss > median + this x robust std (MAD x 1.4826) of --spike-window losses
    spike_window: int = 100  # the recent losses a step is compared with; no check until there are this many
    max_rewinds: int = 3  # --spike-guard stops the run at the spike after this many rewinds

    def check(self, checkpoint_interval: int) -> None:
        """The flags, before step 0 (the spike guard's only when it is on: they mean nothing otherwise)."""
        if self.spike_guard:
            if checkpoint_interval <= 0:
                raise TrainError("--spike-guard rewinds to the newest checkpoint: give a --checkpoint-interval N > 0 "
                                 "(the steps a rewind redoes, at most N)")
            if not self.spike_threshold > 0:
                raise TrainError(f"--spike-threshold {self.spike_threshold}: give a number of deviations > 0 (e.g. 8)")
            if self.spike_window < 3:
                raise TrainError(f"--spike-window {self.spike_window}: the median and its deviation need 3 losses "
                                 "or more")
            if self.max_rewinds < 0:
                raise TrainError(f"--max-rewinds {self.max_rewinds}: give 0 (stop at the first spike) or more")
        if self.checkpoint_minutes < 0:
            raise TrainError(f"--checkpoint-minutes {self.checkpoint_minutes}: give minutes > 0, or 0 for none")
        if not self.dist_timeout > 0:
            raise TrainError(f"--dist-timeout {self.dist_timeout}: give seconds > 0, longer than any step, evaluation "
                             "or checkpoint takes")


# -----------------------------------------------------------------------------
# Signals and --checkpoint-minutes: what asks the loop to checkpoint from outside the step


class StopSignal:
    """What asks the loop to checkpoint from outside the step: SIGTERM / SIGINT (preemption, Ctrl-C), which also
    stop the run after that step's checkpoint, and --checkpoint-minutes' clock (checkpoint_due).

    A second signal stops at once, but not under torchrun: a signal sent to the whole process group (Ctrl-C,
    Slurm's scancel) reaches each worker twice there, directly and forwarded by torchrun, which SIGKILLs any
    worker still alive 30 s later anyway.
    """

    def __init__(self, checkpoint_minutes: float = 0):
        self.requested = False
        self.second_stops = torchrun_attempt()[0] is None  # not a torchrun worker
        self.checkpoint_seconds, self.last_checkpoint = 60 * checkpoint_minutes, time.monotonic()
        self._previous = {}

    @property
    def checkpoint_due(self) -> bool:
        return 0 < self.checkpoint_seconds <= time.monotonic() - self.last_checkpoint

    def _handle(self, signum, frame):
        if self.requested:
            if self.second_stops:
                raise KeyboardInterrupt
            return
        self.requested = True
        print(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint", flush=True)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# -----------------------------------------------------------------------------
# Spike guard (--spike-guard): a step whose loss jumps far above its recent ones is undone. Every rank goes back
# to the newest checkpoint, then on with the data that follows the spiked step: the batches since the checkpoint,
# the culprits among them, are never trained on again, and the schedule rewinds with the step. Long runs spike
# (llm.c's GPT-2 1.5B did); the reference run has no guard, so it is off unless asked for.


class SpikeGuard:
    """The recent losses and the rewinds so far: plain data in every checkpoint, so that a resumed run decides
    as the uninterrupted one would have (and counts its rewinds towards --max-rewinds).

    A spike is a loss above median + threshold x 1.4826 x MAD of the last `window` losses (MAD: the median
    absolute deviation; x 1.4826 it is the standard deviation of normal noise). Median and MAD, not mean and
    standard deviation, which the steep fall of the first steps, or a spike, would inflate. A falling loss stays
    below its window's median, and nothing is checked until the window is full, so the first steps never trigger
    it. The scale is at least 1% of the median: on a plateau whose losses differ by 1e-4 a harmless wobble would
    otherwise count as many deviations.
    """

    def __init__(self, threshold: float, window: int, checkpoint: Path | None = None):
        self.threshold, self.losses, self.rewinds = threshold, deque(maxlen=window), 0
        self.checkpoint = checkpoint  # where a rewind goes: the newest checkpoint this run wrote or resumed from

    def check(self, loss: float, diverged: str | None = None) -> str | None:
        """None for a normal loss, which joins the history; for a spike, why it is one (and it does not join).
        A non-finite loss or gradient norm (diverged: which) is always one, however few losses came before."""
        if diverged is not None:
            return f"{diverged}: not finite"
        if len(self.losses) == self.losses.maxlen:
            median = statistics.median(self.losses)
            mad = statistics.median(abs(x - median) for x in self.losses)
            limit = median + self.threshold * max(1.4826 * mad, 0.01 * abs(median))
            if loss > limit:
                return f"above {limit:.4f} (median {median:.4f} of the last {len(self.losses)} losses)"
        self.losses.append(loss)
        return None

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "rewinds": self.rewinds}

    def load_state_dict(self, state: dict) -> None:
        self.losses.clear()
        self.losses.extend(state["losses"])  # the newest --spike-window of them, if it changed
        self.rewinds = state["rewinds"]


def rewind(run, step: int, loss: float, why: str) -> int:
    """Undo the steps since the newest checkpoint c, the spiked `step` the last of them: every rank loads c
    (weights, optimizer, loss scale, RNG, the guard's losses), then moves the data to where it was after `step`.
    Returns the step to go on from, c + 1. The ranks decide alike: they all see the same all-reduced loss."""
    guard, metrics, max_rewinds = run.spike_guard, run.metrics, run.cfg.long_run.max_rewinds
    metrics.log(step, spike=loss, note=why)
    path = guard.checkpoint
    if path is None:
        raise TrainingDiverged(f"loss {loss:.4f} at step {step} is a spike, {why}, and there is no checkpoint to "
                               "rewind to yet: stopping (a smaller --checkpoint-interval writes the first one sooner)")
    if guard.rewinds >= max_rewinds:
        raise TrainingDiverged(f"loss {loss:.4f} at step {step} is a spike after {guard.rewinds} rewind(s) "
                               f"(--max-rewinds {max_rewinds}): stopping; its last checkpoint {path} is untouched")
    data_after, rewinds = run.train_loader.state_dict(), guard.rewinds + 1
    with patient_collectives(run.cfg.long_run.dist_timeout):  # every rank reads all of it
        ckpt = on_every_rank(lambda: load_checkpoint(path), run.dist,
                             TrainError(f"another rank could not read {path} to rewind to (see its error)"))
    restore_run(run, ckpt, weights=True)
    del ckpt
    run.train_loader.load_state_dict(data_after)  # the batches of steps c+1..step: skipped
    guard.rewinds = rewinds
    c = run.start_step - 1
    metrics.print(f"rewind {rewinds} of at most {max_rewinds}: back to {path} (step {c}), the batches of steps "
                  f"{c + 1}..{step} skipped ({(step - c) * run.grad_accum} micro-batches per rank)")
    return run.start_step


# -----------------------------------------------------------------------------
# torchrun's restarts: where each attempt starts, and the end of a crash loop


class NoProgress(TrainError):
    """A torchrun restart that would start where the attempt before it started: that one wrote no checkpoint."""


def start_attempt(cfg, dist: Dist) -> tuple[dict | None, Path | None]:
    """The checkpoint this process starts from and its path (checkpoints.open_resume; None, None for a fresh run),
    the same on every rank. Under torchrun --max-restarts, a restart that would repeat the one before it stops
    (check_progress), and where this attempt starts is recorded once every rank has read the record."""
    def resume():
        ckpt, path = open_resume(cfg, dist)
        check_progress(cfg, first_step(ckpt), path)
        return ckpt, path

    ckpt, path = on_every_rank(resume, dist, TrainError("another rank could not read the checkpoint (see its error)"))
    on_every_rank(lambda: record_attempt(cfg, dist, first_step(ckpt)), dist,
                  TrainError("another rank could not write its restarts.txt (see its error)"))
    return ckpt, path


def check_progress(cfg, start_step: int, path: Path | None) -> None:
    """torchrun --max-restarts restarts failed workers whatever their exit code. A restart that would start where
    the restart before it started (restarts.txt, see record_attempt) would retry from the same checkpoint a second
    time: the first retry failed before writing a newer one, so the fault is likely deterministic (a NaN at a
    step, a bad batch) and would fail this one alike. NoProgress ends the crash loop. One retry from each
    checkpoint stays: a single kill -9 before the first checkpoint costs one restart, not the job. Every rank
    reads the file before rank 0 adds this attempt's line, so every rank decides alike."""
    this_job, restart, _ = torchrun_attempt()
    attempts = Path(cfg.log_dir) / ATTEMPTS_FILE
    if restart < 2 or not attempts.is_file():
        return
    starts = [int(row[2]) for row in map(str.split, attempts.read_text().splitlines())
              if len(row) == 3 and row[0] == this_job and int(row[1]) >= 1]  # restarts, not the first launch
    if starts and starts[-1] == start_step:
        origin = f"from {path}" if path is not None else "afresh"
        raise NoProgress(f"torchrun restart {restart} would start {origin} (step {start_step}) as the restart "
                         f"before it did, which failed without writing a newer checkpoint: stopping this crash "
                         f"loop (exit {NO_PROGRESS_EXIT}: do not requeue; the attempts' own errors are above)")


def record_attempt(cfg, dist: Dist, start_step: int) -> None:
    """Under torchrun --max-restarts, rank 0 appends where this attempt starts to restarts.txt (never truncated,
    unlike log.txt) once every rank has read it: before the model and the data, so that an attempt failing in
    their set-up counts too."""
    job, restart, max_restarts = torchrun_attempt()
    if dist.master and max_restarts > 0:
        Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(cfg.log_dir) / ATTEMPTS_FILE, "a") as f:
            f.write(f"{job} {restart} {start_step}\n")


def end_torchrun(agent: int) -> None:
    """Under torchrun, end it with the status NO_PROGRESS_EXIT, so that a scheduler does not requeue the job.
    torchrun restarts a failed worker whatever its exit code and exits 1 itself after any failure: only a signal
    it does not handle carries a status of ours, SIGUSR2, which kills it (128 + 12 = 140 on Linux, a shell's $?).
    Every rank sends it before exiting, so torchrun dies before it sees a worker exit and restarts one; once it
    is gone (our parent, `agent` at start-up, is no longer), the others send nothing."""
    if torchrun_attempt()[0] is not None and os.getppid() == agent:  # a torchrun worker whose agent still lives
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(agent, signal.SIGUSR2)
