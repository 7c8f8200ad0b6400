"""
Checkpoints, saved and restored side by side. A model file is the model's weights and shape (model_entries);
a training checkpoint adds what continues the run exactly: optimizer, step, data position, every rank's RNG,
the arguments. Rank 0 writes it as model_{step:05d}.pt in --log-dir, through a temporary file renamed into
place once all of it is on disk, and checks the bytes of every checkpoint before it is used (torch.load
reads none of the CRC-32s torch.save stores). Checkpoints hold plain data only (tensors, dicts, lists,
numbers, strings), so they load with torch.load(weights_only=True).

    save_run / restore_run      a training checkpoint, written and read back
    open_resume                 --resume: the checkpoint this run continues, checked before anything is built
    prune_checkpoints           --keep-last: rotation, once the newest checkpoint verifies
"""

from __future__ import annotations

import dataclasses
import errno
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2 import GPT, GPTConfig
from support.distributed import Dist, patient_collectives, rank_0_first
from support.errors import TrainError, one_line
from support.files import atomic_write, fsync_folder, remove_stale_temp_files
from support.flags import as_flag
from support.sharding import is_sharded, load_weights, shard_optimizer_state, whole_state


@dataclass
class CheckpointConfig:
    checkpoint_interval: int = 5000  # write a checkpoint every this many steps, and at the last step (0: last only)
    resume: str | None = None  # alone: the newest whole checkpoint in --log-dir; auto: that or a fresh start; a path
    keep_last: int = 0  # keep the newest N >= 2 checkpoints, deleting older ones once the new one is in place (0: all)

    def check(self) -> None:
        if self.keep_last and self.keep_last < 2:
            raise TrainError(f"--keep-last {self.keep_last}: keep 2 or more (the newest can be damaged; 0 keeps all)")


# -----------------------------------------------------------------------------
# Model files: what sample, export, HellaSwag and the evaluations read


def save_checkpoint(path, checkpoint: dict) -> None:
    """torch.save through a temporary file, renamed into place once all of it is on disk."""
    with atomic_write(path) as tmp:
        torch.save(checkpoint, tmp)


class CheckpointDamaged(ValueError):
    """A checkpoint whose bytes are not the ones written: a record fails its CRC-32, or the zip is broken."""


def check_checkpoint_bytes(path) -> None:
    """Every record of a checkpoint's zip (the pickle, each tensor's bytes) read and checked against the CRC-32
    torch.save stored for it, which torch.load never reads: a flipped bit in a tensor would load silently.
    CheckpointDamaged names the file and the record. One more sequential read of the file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                with z.open(info) as f:  # zipfile compares the CRC-32 once a record is read to its end
                    while f.read(1 << 24):
                        pass
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as e:
        raise CheckpointDamaged(f"checkpoint {path} is damaged ({type(e).__name__}: {e})") from None


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """A checkpoint, every byte verified first; mmap: its tensors are read from the file only where used (to read
    its arguments without the optimizer's state in memory)."""
    check_checkpoint_bytes(path)  # every byte verified before any is used
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path}: not a train_gpt2.py checkpoint (no 'model'/'config' entries)")
    return ckpt


def model_entries(model: GPT, state_dict: dict | None = None) -> dict:
    """The model's part of a checkpoint: its weights (no `_orig_mod.` prefix: pass the unwrapped model;
    or its state_dict, already gathered from shards) and its shape."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    return {"model": state_dict, "config": dataclasses.asdict(model.config)}


def model_from_checkpoint(ckpt: dict) -> GPT:
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model


def is_checkpoint(name_or_path: str) -> bool:
    """One of our .pt checkpoints, rather than a Hugging Face model name or folder."""
    path = Path(name_or_path)
    return path.suffix == ".pt" or path.is_file()


# -----------------------------------------------------------------------------
# Training checkpoints: the run's state beside the model's


RUN_STATE = ("optimizer", "step", "val_loss", "loader", "rng", "args", "world_size")  # beside model_entries'


def first_step(ckpt: dict | None) -> int:
    """The step a run starts with: after its checkpoint's, or 0 for a fresh run."""
    return ckpt["step"] + 1 if ckpt is not None else 0


def checkpoint_path(log_dir, step: int) -> Path:
    return Path(log_dir) / f"model_{step:05d}.pt"


def checkpoint_step(path: Path) -> int | None:
    """The step of a file named by checkpoint_path; None for any other file (temporary files included)."""
    m = re.fullmatch(r"model_(\d{5,})\.pt", path.name)
    return int(m.group(1)) if m else None


def checkpoints(log_dir) -> list[Path]:
    """The checkpoints in log_dir, oldest first: files renamed into place whole (a temporary file is none)."""
    log_dir = Path(log_dir)
    found = [(step, p) for p in log_dir.iterdir() if (step := checkpoint_step(p)) is not None] \
        if log_dir.is_dir() else []
    return [p for _, p in sorted(found)]


def latest_checkpoint(log_dir) -> Path | None:
    """The newest complete checkpoint in log_dir (its bytes are verified when it is loaded)."""
    found = checkpoints(log_dir)
    return found[-1] if found else None


def _gather_rng_states(dist: Dist) -> list[dict]:
    import torch.distributed as tdist

    state = {"torch": torch.get_rng_state()}
    if dist.device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dist.device)
    if not tdist.is_initialized() or dist.world_size == 1:
        return [state]
    states = [None] * dist.world_size
    tdist.all_gather_object(states, state)
    return states


def save_run(run, step: int) -> Path | None:
    """The checkpoint of `run` (a train_gpt2.Run) after `step`. Every rank calls this (it gathers the ranks' RNG
    states, and under fsdp the weights and AdamW state); rank 0 writes the checkpoint and returns its path. If the
    write fails (a full disk), every rank stops. Meanwhile the others wait for rank 0 under patient_collectives."""
    with patient_collectives(run.cfg.long_run.dist_timeout):  # every collective here may wait for rank 0's disk
        rng = _gather_rng_states(run.dist)
        path = checkpoint_path(run.cfg.log_dir, step)
        weights, optimizer, errors = run.raw_model.state_dict(), run.optimizer.state_dict(), []
        if is_sharded(run.raw_model):  # whole on rank 0: the same checkpoint as DDP's
            tied = run.raw_model.config.tie_embeddings
            if tied:  # tied to wte: gathered once, and saved once as torch.save does for DDP
                del weights["lm_head.weight"]
            master = run.dist.master
            weights, optimizer = whole_state(weights, master, errors), whole_state(optimizer, master, errors)
            if tied:
                weights["lm_head.weight"] = weights["transformer.wte.weight"]
        state = lambda: {**model_entries(run.raw_model, weights), "optimizer": optimizer, "step": step,
                         "val_loss": run.val_loss, "loader": run.train_loader.state_dict(), "rng": rng,
                         "args": run.cfg.args(), "world_size": run.dist.world_size,
                         "muon": run.muon.state_dict() if run.muon is not None else None, "train_time": run.train_time,
                         "scaler": run.scaler.state_dict() if run.scaler is not None else None,
                         "spike_guard": run.spike_guard.state_dict() if run.spike_guard is not None else None}

        def write():
            if errors:  # rank 0 could not hold the gathered state: every rank stops, here, together
                raise TrainError(f"rank 0 could not gather the checkpoint {path} in host memory: {one_line(errors[0])}")
            try:
                save_checkpoint(path, state())
            except OSError as e:  # a full disk: the temporary file is gone, the checkpoints before it untouched
                fix = "free some space (or pass --keep-last N)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix it"
                raise TrainError(f"could not write {path} ({one_line(e)}): {fix}, then continue with --resume") from e
            if run.cfg.checkpoint.keep_last:
                prune_checkpoints(path, run.cfg.checkpoint.keep_last)
        rank_0_first(write, run.dist, TrainError(f"rank 0 could not write {path} (see its error)"))
    if run.spike_guard is not None:  # every rank knows where a rewind goes
        run.spike_guard.checkpoint = path
    return path if run.dist.master else None


def restore_run(run, ckpt: dict, weights: bool = False) -> None:
    """save_run's counterpart. On resume the model was built from the checkpoint (and checked by open_resume);
    a rewind of --spike-guard (weights) copies the checkpoint's weights into the running model."""
    if weights:
        load_weights(run.raw_model, ckpt["model"])
    optimizer = ckpt["optimizer"]
    if is_sharded(run.raw_model):
        optimizer = shard_optimizer_state(optimizer, run.optimizer)
    load_optimizer_state(run.optimizer, optimizer)
    if run.muon is not None:  # open_resume checked that the checkpoint's run had Muon too
        load_optimizer_state(run.muon, ckpt["muon"])
    if not weights:  # a rewind keeps counting the time of the steps it undoes: they were spent
        run.train_time = ckpt.get("train_time", 0.0)
    if run.scaler is not None and ckpt.get("scaler"):  # the loss scale a float16 run had reached
        run.scaler.load_state_dict(ckpt["scaler"])
    run.train_loader.load_state_dict(ckpt["loader"])
    run.start_step, run.val_loss = first_step(ckpt), ckpt["val_loss"]
    rng = ckpt["rng"][run.dist.rank]  # one state per rank: the world size was checked
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and run.dist.device_type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], run.dist.device)
    if run.spike_guard is not None:  # a checkpoint of an unguarded run: the guard's history starts empty
        run.spike_guard.load_state_dict(ckpt.get("spike_guard") or {"losses": [], "rewinds": 0})


def _differences(saved: dict, current: dict) -> str:
    return ", ".join(f"{k}: checkpoint {saved.get(k)} vs this run {current.get(k)}"
                     for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k))


def prune_checkpoints(newest: Path, keep: int) -> None:
    """--keep-last: once `newest` is renamed into place and its bytes verify, delete the oldest checkpoints before it
    until `keep` remain, itself included; checkpoints of later steps (a run that had gone further) stay."""
    older = [p for p in checkpoints(newest.parent) if checkpoint_step(p) < checkpoint_step(newest)]
    if len(older) < keep:
        return
    try:
        check_checkpoint_bytes(newest)  # never delete what a damaged newest checkpoint would fall back to
    except CheckpointDamaged as e:
        raise TrainError(f"{e}: it was just written and does not read back (a failing disk?): stopping with no "
                         "older checkpoint deleted") from None
    for path in older[:len(older) - (keep - 1)]:
        path.unlink()
    fsync_folder(newest.parent)


def newest_whole_checkpoint(log_dir: Path) -> tuple[dict, Path]:
    """--resume alone: the newest checkpoint in log_dir whose bytes verify; each damaged one newer than it is named
    in a one-line warning and passed over (every rank reads the same files, so every rank picks the same one)."""
    found = checkpoints(log_dir)
    if not found:
        raise TrainError(f"--resume: no checkpoint (model_*.pt) in {log_dir} to resume from")
    for path in reversed(found):
        try:
            return load_checkpoint(path), path
        except CheckpointDamaged as e:
            print(f"warning: {e}: resuming from an older checkpoint", file=sys.stderr, flush=True)
    raise TrainError(f"--resume: every checkpoint in {log_dir} is damaged ({len(found)}, warnings above): restore "
                     "one from a copy, or start afresh in another --log-dir")


def open_resume(cfg, dist: Dist) -> tuple[dict | None, Path | None]:
    """The checkpoint --resume names (None for a fresh run), whole and checked against this run (cfg, a
    TrainConfig) before anything is built. Rank 0 first deletes the temporary files a killed writer left in
    --log-dir (kill -9 mid-save)."""
    if dist.master and Path(cfg.log_dir).is_dir():  # a log dir is one run's: no other process writes there now
        remove_stale_temp_files(cfg.log_dir)  # (under torchrun, it stopped every earlier attempt's workers first)
    ckpt, path = find_resume(cfg)
    if ckpt is not None:
        check_resumable(cfg, ckpt, path, dist.world_size)
    return ckpt, path


def find_resume(cfg) -> tuple[dict | None, Path | None]:
    log_dir, resume = Path(cfg.log_dir), cfg.checkpoint.resume
    if resume == "auto" and latest_checkpoint(log_dir) is None:
        return None, None  # the first launch of a job that will relaunch itself with the same command line
    if not resume:
        if latest_checkpoint(log_dir) is not None:
            raise TrainError(f"--log-dir {log_dir} holds checkpoints of an earlier run: add --resume to continue "
                             "it, or use another --log-dir")
        return None, None
    if resume in ("latest", "auto"):
        ckpt, path = newest_whole_checkpoint(log_dir)
    else:
        path = Path(resume)
        if not path.is_file():
            raise TrainError(f"--resume {path}: no such checkpoint")
        try:
            ckpt = load_checkpoint(path)
        except CheckpointDamaged as e:
            raise TrainError(f"--resume: {e}: resume from another one (--resume alone takes the newest whole "
                             "checkpoint)") from None
    return ckpt, path


def check_resumable(cfg, ckpt: dict, path: Path, world_size: int) -> None:
    """A checkpoint this run can continue: a run's state, the same optimizer and model, the same number of ranks."""
    if any(k not in ckpt for k in RUN_STATE):
        raise TrainError(f"--resume {path}: a model without a run's state: start from it with --init-from {path}")
    if ckpt["args"].get("optimizer", "adamw") != cfg.optimizer:  # before the architecture options: muon sets one
        raise TrainError(f"--resume: the checkpoint's run had --optimizer {ckpt['args'].get('optimizer', 'adamw')}, "
                         f"this run {cfg.optimizer}: pass the flags (or --recipe) of the run that wrote it")
    # under muon, what the optimizers' state holds (Muon's buffers; AdamW's groups, their betas, decays and lr
    # scales, which load_optimizer_state restores from the checkpoint): the checkpoint's, or an error
    earlier = dict(muon_variant="keller", adamw_groups="shared", lr_width_scale=False)  # before these flags
    for name, before in earlier.items() if cfg.optimizer == "muon" else ():
        had = ckpt["args"].get(name, before)
        if had != getattr(cfg, name):
            raise TrainError(f"--resume: the checkpoint's run had {as_flag(name, had)}, this run "
                             f"{as_flag(name, getattr(cfg, name))}: pass the flags (or --recipe) of the run that "
                             "wrote it")
    if cfg.init_from == "scratch":  # a checkpoint older than the architecture options has GPT-2's: filled in
        diff = _differences(dataclasses.asdict(GPTConfig(**ckpt["config"])), dataclasses.asdict(cfg.model_config()))
        if diff:
            raise TrainError(f"--resume: the checkpoint is another model shape ({diff}): "
                             "pass the flags (or --preset) of the run that wrote it")
    elif ckpt["args"].get("init_from") != cfg.init_from:
        raise TrainError(f"--resume: the checkpoint's run had --init-from {ckpt['args'].get('init_from')}, "
                         f"this run {cfg.init_from}")
    if ckpt["world_size"] != world_size:
        raise TrainError(f"--resume: the checkpoint was written by {ckpt['world_size']} rank(s), this run has "
                         f"{world_size}: resume with the same number of processes (the data position and RNG "
                         "are per rank; --shard may change)")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict, keeping this optimizer's implementation (fused / foreach / capturable).

    A state dict carries its param groups' flags, and load_state_dict would take them: a checkpoint
    written on a CPU would silently turn off fused AdamW for the rest of a GPU run.
    """
    keep = ("fused", "foreach", "capturable")
    groups = [{**saved, **{k: now[k] for k in keep if k in now}}
              for saved, now in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})
