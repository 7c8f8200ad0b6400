"""
Fault injection, for the tests only (tests/test_faults.py, tests/test_spike.py): the environment variable
GPT2_FAULTS (never a flag) lists faults as KIND@STEP:RANK:ATTEMPT, comma-separated, where `*` or a field left
out matches any, ATTEMPT is torchrun's TORCHELASTIC_RESTART_COUNT; STEP `start` is before the process group,
`evalN` before step N's evaluation. Unset, install() does nothing and training runs untouched.

    kill: the rank SIGKILLs itself as the step begins     stop: it SIGSTOPs itself there (a hung rank)
    nan: the step's loss is multiplied by NaN             late: the rank sleeps 3 s first
    kill-in-save / enospc: rank 0 writes half of the step's checkpoint, then SIGKILLs itself / fails with ENOSPC

Each fires once per process; a relaunch (torchrun's restart) reads the variable afresh. The faults come from
outside the training code: injected() wraps the training script's train_step and evaluate, and the checkpoints'
writer, with functions that fire the faults asked for and otherwise call the originals. The tests run training
inside it (tests/faulty_train.py launches train_gpt2.py's main that way); train_gpt2.py itself knows nothing of it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import signal
import time
from pathlib import Path

import torch

from support import checkpoints
from support.distributed import torchrun_attempt
from support.files import atomic_write

FAULTS_ENV = "GPT2_FAULTS"


def fault(kind: str, step, rank: int) -> bool:
    """Whether GPT2_FAULTS asks for this fault here: at this step, on this rank, in this torchrun attempt. Each
    fires once in a process (it leaves this process's GPT2_FAULTS): a step that a rewind runs again is clean."""
    here = (str(step), str(rank), str(torchrun_attempt()[1]))
    specs = [spec for spec in os.environ.get(FAULTS_ENV, "").split(",") if spec]
    for spec in specs:
        what, _, where = spec.partition("@")
        if what == kind and all(w in ("*", h) for w, h in zip(where.split(":") if where else [], here)):
            os.environ[FAULTS_ENV] = ",".join(x for x in specs if x != spec)
            return True
    return False


def inject(step, rank: int) -> None:
    """kill, stop and late, where GPT2_FAULTS asks for them at this step on this rank."""
    if fault("kill", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
    if fault("stop", step, rank):
        os.kill(os.getpid(), signal.SIGSTOP)
    if fault("late", step, rank):
        time.sleep(3)


@contextlib.contextmanager
def injected(train_module):
    """For its duration, the faults GPT2_FAULTS asks for: those at `start` at once (before the process group), the
    others from train_module's train_step and evaluate and from checkpoints.save_checkpoint, wrapped here and
    restored after."""
    inject("start", int(os.environ.get("RANK", "0")))
    originals = train_module.train_step, train_module.evaluate, checkpoints.save_checkpoint
    train_module.train_step = _faulty_train_step(originals[0])
    train_module.evaluate = _faulty_evaluate(originals[1])
    checkpoints.save_checkpoint = _faulty_save(originals[2])
    try:
        yield
    finally:
        train_module.train_step, train_module.evaluate, checkpoints.save_checkpoint = originals


def _faulty_train_step(train_step):
    @functools.wraps(train_step)
    def wrapper(run, step, stop):
        inject(step, run.dist.rank)
        if not fault("nan", step, run.dist.rank):
            return train_step(run, step, stop)
        # the model's loss times NaN at every micro-step of this step: a loss and gradients that are not finite
        hook = run.model.register_forward_hook(lambda module, args, out: (out[0], out[1] * math.nan))
        try:
            return train_step(run, step, stop)
        finally:
            hook.remove()
    return wrapper


def _faulty_evaluate(evaluate):
    @functools.wraps(evaluate)
    def wrapper(run, step):
        inject(f"eval{step}", run.dist.rank)
        return evaluate(run, step)
    return wrapper


def _faulty_save(save_checkpoint):
    @functools.wraps(save_checkpoint)
    def wrapper(path, checkpoint: dict) -> None:
        step = checkpoints.checkpoint_step(Path(path))
        kind = next((k for k in ("kill-in-save", "enospc") if fault(k, step, 0)), None)  # rank 0 writes
        if kind is None:
            return save_checkpoint(path, checkpoint)
        with atomic_write(path) as tmp:  # half of the file on disk under its temporary name, then the fault
            torch.save(checkpoint, tmp)
            os.truncate(tmp, os.path.getsize(tmp) // 2)
            if kind == "kill-in-save":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, f"No space left on device (injected): {tmp}")
    return wrapper
