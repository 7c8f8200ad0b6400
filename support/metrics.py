"""
Metrics: the one place a number goes to the console, log.txt, the history train() returns, and the
trackers (Weights & Biases, TensorBoard) when asked for. log.txt lines are `{step} {name} {value}`,
the reference's format, which play.ipynb reads.
Also what a step's throughput is measured against: the FLOPs per token (MFU) and the GPUs' peaks.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2 import GPTConfig
from support.distributed import Dist
from support.errors import TrainError, one_line


@dataclass
class TrackerConfig:
    wandb: str | None = None  # also log to this Weights & Biases project (pip install wandb; WANDB_MODE=offline)
    tensorboard: bool = False  # also write TensorBoard event files into --log-dir (pip install tensorboard)


def read_log(path) -> tuple[dict[str, dict[int, float]], int]:
    """log.txt read back: ({name: {step: value}} with steps sorted, the number of lines skipped). A step written
    twice (a rewind, a resumed run) keeps its last value; a line that is not `step name value` (half a line, where
    a run was killed mid-write) is skipped and counted. A missing file reads as nothing."""
    streams: dict[str, dict[int, float]] = {}
    skipped = 0
    path = Path(path)
    for line in (path.read_text(errors="replace").splitlines() if path.is_file() else []):
        parts = line.split()
        try:
            if len(parts) != 3:
                raise ValueError(line)
            step, name, value = int(parts[0]), parts[1], float(parts[2])
        except ValueError:
            skipped += bool(parts)
            continue
        streams.setdefault(name, {})[step] = value
    return {name: dict(sorted(values.items())) for name, values in streams.items()}, skipped


def duration(seconds: float) -> str:
    seconds = round(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class WandbTracker:
    """Weights & Biases: one run per --log-dir, continued by --resume (its id is kept in the folder), plotted
    against our step. Offline (WANDB_MODE=offline) it writes the run under LOG_DIR/wandb/ for `wandb sync`."""

    def __init__(self, cfg, start_step: int):
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # wandb's crash telemetry calls home, even offline
        try:
            import wandb
        except ImportError:
            raise TrainError("--wandb needs the wandb package: pip install wandb") from None
        id_file = Path(cfg.log_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if start_step > 0 and id_file.is_file() else None  # None: a new run
        try:
            self.run = wandb.init(project=cfg.trackers.wandb, id=run_id, resume="allow" if run_id else None,
                                  dir=cfg.log_dir, config=cfg.args(),
                                  settings=wandb.Settings(console="off"))
        except Exception as e:  # no account, no network, ...
            raise TrainError(f"--wandb {cfg.trackers.wandb}: no run started ({one_line(e)}); "
                             "WANDB_MODE=offline needs neither") from None
        # x axis: our step, not W&B's own counter, which refuses the steps a run resumed after a crash repeats
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        id_file.write_text(self.run.id + "\n")

    def log(self, step: int, values: dict) -> None:
        self.run.log({"step": step, **values})

    def close(self, failed: bool) -> None:
        import wandb

        self.run.finish(exit_code=1 if failed else 0)
        wandb.teardown()  # finish() returns before wandb's service has written the run; this waits for it


class TensorBoardTracker:
    """TensorBoard event files in --log-dir: `tensorboard --logdir LOG_DIR`."""

    def __init__(self, log_dir: str, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrainError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir, purge_step=start_step)  # drops what a crashed run wrote past it

    def log(self, step: int, values: dict) -> None:
        for name, v in values.items():
            self.writer.add_scalar(name, v, step, new_style=True, double_precision=True)  # the value as logged

    def close(self, failed: bool) -> None:
        self.writer.close()


class Metrics:
    """log(step, name=value, ...) records a step's numbers everywhere they go; print() is the console (rank 0)."""

    # name: (its format in log.txt, None for the console only; its console text)
    FORMATS = {
        "val": (".4f", "val loss {:.4f}"),
        "hella": (".4f", "HellaSwag acc_norm {:.4f}"),
        "train": (".6f", "loss {:.6f}"),
        "lr": (".6e", "lr {:.4e}"),
        "momentum": (".4f", "momentum {:.4f}"),  # Muon's (--optimizer muon only)
        "norm": (".4f", "norm {:.4f}"),
        "dt": (None, "dt {:.2f}ms"),  # seconds, shown in milliseconds
        "tokens_per_sec": (".1f", "tok/sec {:,.0f}"),
        "mfu": (".4f", "mfu {:.1%}"),
        "skipped": ("g", "gradients overflowed float16: step skipped, loss scale now {:g}"),  # the new scale
        "spike": (".6f", "loss {:.6f} is a spike"),  # --spike-guard: the loss of a step it undid
        "restart": ("d", "torchrun attempt {:d} (TORCHELASTIC_RESTART_COUNT) starts here"),  # under --max-restarts
        # --target-val-loss, at the evaluation that reached it: the tokens trained and the seconds spent in training
        # steps (Run.train_time) to get there, the speedrun's metric
        "target_tokens": ("d", "target reached after {:,} tokens"),
        "target_time": (".3f", "{:.1f} s of training"),
    }

    def __init__(self, cfg, dist: Dist, start_step: int):
        self.master, self.max_steps = dist.master, cfg.max_steps
        self.history = {name: {} for name in self.FORMATS}
        self.path = Path(cfg.log_dir) / "log.txt"
        self.trackers = []
        self.clock = None  # (step, time) of the first step this process ran: the ETA's start
        if not self.master:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            self.path.write_text("")  # a fresh run starts a fresh log; a resumed one appends
        try:
            if cfg.trackers.tensorboard:
                self.trackers.append(TensorBoardTracker(cfg.log_dir, start_step))
            if cfg.trackers.wandb:
                self.trackers.append(WandbTracker(cfg, start_step))
        except BaseException:
            self.close(failed=True)  # the ones already started
            raise

    def print(self, text: str) -> None:
        if self.master:
            print(text, flush=True)

    def log(self, step: int, note: str = "", **values) -> None:
        values = {k: v for k, v in values.items() if v is not None}
        for name, v in values.items():
            self.history[name][step] = v
        if not self.master:
            return
        with open(self.path, "a") as f:
            f.writelines(f"{step} {k} {v:{self.FORMATS[k][0]}}\n" for k, v in values.items() if self.FORMATS[k][0])
        for tracker in self.trackers:
            tracker.log(step, values)
        text = [self.FORMATS[k][1].format(1000 * v if k == "dt" else v) for k, v in values.items()]
        if "train" in values and self.clock is None:  # this process's first step: it compiled and warmed up
            note = " ".join(filter(None, [note, "(first step: dt, tok/sec and mfu include compilation, warm-up)"]))
        eta = [self.eta(step)] if "train" in values else []
        self.print(" | ".join([self.progress(step), *text, *([note] if note else []), *eta]))

    def progress(self, step: int) -> str:
        return f"step {step:,}/{self.max_steps:,} ({step / self.max_steps:.1%})"

    def eta(self, step: int) -> str:
        """Time left at the pace since this process's first step (evaluations and checkpoints included)."""
        now = time.perf_counter()
        if self.clock is None or self.clock[0] == step:
            self.clock = self.clock or (step, now)
            return "eta -"
        first, t0 = self.clock
        return f"eta {duration((now - t0) / (step - first) * (self.max_steps - 1 - step))}"

    def close(self, failed: bool = False) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(failed)


# dense bf16 tensor-core peaks per GPU from NVIDIA's data sheets, by a pattern of torch.cuda.get_device_name's
# words (whole words: "A100" is not "RTX A1000"), the most specific first: the first match wins. TF32 is half
PEAK_BF16_FLOPS = [
    (r"\bGB200\b", 2.5e15),  # a GB200's Blackwell GPU (1,200 W)
    (r"\bB200\b", 2.25e15),  # HGX B200 (1,000 W)
    (r"\bGH200\b", 989e12),
    (r"\bH[12]00\b.*\bNVL\b", 835e12),
    (r"\bH100\b.*\bPCIe\b", 756e12),
    (r"\bH[12]00\b", 989e12),  # SXM
    (r"\bA100\b", 312e12),
    (r"\bV100\b", 125e12),  # fp16: V100 and T4 have no bf16, nor TF32
    (r"\bT4\b", 65e12),
]


def peak_for_name(name: str, bf16: bool = True) -> float | None:
    """Peak matmul FLOP/s of a GPU by its name: bf16 (fp16) tensor cores, or TF32 for fp32 matmuls (half of
    that; None before Ampere, which has no TF32). None when unknown."""
    peak = next((v for pattern, v in PEAK_BF16_FLOPS if re.search(pattern, name, re.IGNORECASE)), None)
    if peak is None or bf16:
        return peak
    return None if re.search(r"\b(V100|T4)\b", name) else peak / 2


def peak_flops(device: str, bf16: bool = True) -> float | None:
    """Peak matmul FLOP/s of the GPU that MFU is measured against; None when unknown (or not a GPU)."""
    return peak_for_name(torch.cuda.get_device_name(device), bf16) if device.startswith("cuda") else None


def peak_memory_gib(device: str) -> float:
    """This process's peak memory: allocated on the GPU, or its peak resident set elsewhere."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)


def peak_memory(dist: Dist) -> str:
    """The run's peak memory, per rank when there are several (every rank calls this: it gathers them)."""
    import torch.distributed as tdist

    what = "peak GPU memory" if dist.device_type == "cuda" else "peak memory"
    unit = "GiB" if dist.device_type == "cuda" else "GiB (resident)"
    peaks = [peak_memory_gib(dist.device)]
    if dist.world_size == 1:
        return f"{what} {peaks[0]:.2f} {unit}"
    peaks = peaks * dist.world_size
    tdist.all_gather_object(peaks, peaks[0])
    return f"{what} per rank {', '.join(f'{g:.2f}' for g in peaks)} {unit}"


def flops_per_token(config: GPTConfig, T: int) -> int:
    """Training FLOPs per token, this project's MFU definition: 6N for the matmuls with the parameters
    (forward + backward; N all parameters, the tied embedding once, padded vocab included) + 6*L*C*T for
    attention's two T-long matmuls per layer, half of them skipped by the causal mask. (nanoGPT and the
    PaLM paper count 12*L*C*T without the discount and leave wpe out: about 6% more at T=1024.) An untied wte
    and --value-embeds' tables are lookups, not matmuls: left out of N (the head's matrix stays). A learned wpe,
    a lookup too, stays in N as it always was (0.6% of GPT-2 124M's), so that GPT-2's MFU keeps its meaning."""
    return 6 * (config.num_parameters() - config.lookup_parameters()) + 6 * config.n_layer * config.n_embd * T
