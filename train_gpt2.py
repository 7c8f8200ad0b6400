"""
Train GPT-2 (124M) from scratch, as in the lecture: FineWeb-Edu shards (or any .txt file) in, checkpoints out.

    python train_gpt2.py --preset shakespeare                      # a small GPT on a laptop CPU
    torchrun --standalone --nproc_per_node=8 train_gpt2.py         # GPT-2 124M on FineWeb-Edu
    python train_gpt2.py sample -m log/model_19072.pt --prompt "Hello, I'm a language model,"
    python train_gpt2.py export log/model_19072.pt hf_out/         # a folder transformers loads
    python train_gpt2.py plan --preset gpt2-xl --gpus 8            # memory per GPU and cost, before renting

The lecture's steps in its order: configuration, the data loader, AdamW and the learning-rate schedule, the
set-up (gradient accumulation, TF32 and autocast, torch.compile, DDP), evaluation, the training step, the loop.
The model is gpt2.py. The machinery is in support/, one module a concern, called from a few places here:
checkpoints and resuming, long runs (signals, the spike guard, torchrun's restarts), FSDP, metrics, presets and
recipes, the modern recipe's optimizer, the planner.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import hellaswag
from gpt2 import GPT, GPT2_VOCAB_SIZE, MODEL_CHOICES, GPTConfig, ModelOptions
from support import checkpoints, long_runs, recipes, sharding
from support.checkpoints import CheckpointConfig
from support.data import DATA_DIR, open_splits, shard_tokens
from support.distributed import (
    Dist,
    all_reduce_or_raise,
    all_reduce_sum,
    barrier,
    deterministic_kernels,
    on_every_rank,
    resolve_dtype,
    set_collective_timeout,
    setup_distributed,
    teardown_distributed,
    torchrun_attempt,
    use_tf32,
)
from support.errors import TrainError, TrainingDiverged, one_line, report_error
from support.flags import add_dataclass_flags
from support.hf import export_main, read_model
from support.long_runs import LongRunConfig, SpikeGuard, StopSignal
from support.metrics import Metrics, TrackerConfig, duration, flops_per_token, peak_flops, peak_memory
from support.modern_optim import (
    ADAMW_GROUPS,
    MUON_VARIANTS,
    WEIGHT_DECAY_SCHEDULES,
    base_lr,
    configure_muon,
    cooldown_steps,
    get_wsd_lr,
    optimizer_lines,
    set_muon_step,
)
from support.planner import GPU_MEMORY_GIB, PlanConfig, logits_warning, plan_report, usable_gib
from support.sampling import SAMPLE_FLAG_ALIASES, SampleConfig, sample_main, sample_text
from support.sharding import MemoryConfig
from support.tokenizer import TokenizerError, get_tokenizer

# -----------------------------------------------------------------------------
# Configuration: every field is a --kebab-case flag, its comment the --help text. The recipe's fields come
# first; the machinery's options are groups of their own (checkpoint, long_run, memory, trackers), each defined
# in the module that implements them, whose fields are flags all the same (--keep-last, --spike-guard, --shard).


@dataclass
class TrainConfig:
    # data and output
    data: str = str(DATA_DIR)  # fineweb.py's shard folder (edu_fineweb10B/ beside the scripts), or a .txt file
    val_fraction: float = 0.1  # .txt data only: the last fraction of its tokens is the validation split
    log_dir: str = "log"  # log.txt and the checkpoints model_{step:05d}.pt
    preset: str | None = None  # named defaults that other flags override (listed below)
    recipe: str = "gpt2"  # gpt2: GPT-2's architecture, AdamW, cosine; modern: the speedrun's (values listed below)
    # model
    init_from: str = "scratch"  # scratch, an HF name or folder (gpt2, gpt2-xl, path/), or one of our .pt checkpoints
    n_layer: int = 12  # transformer blocks (scratch only)
    n_head: int = 12  # attention heads (scratch only)
    n_embd: int = 768  # embedding width (scratch only)
    block_size: int = 1024  # the model's context length (scratch only)
    vocab_size: int = 50304  # 50257 padded to a multiple of 128 for fast matmuls; padded rows learn to be unlikely
    model: ModelOptions = field(default_factory=ModelOptions)  # the architecture's options (scratch only)
    # batch: total = micro-batch x seq-len x GPUs x gradient-accumulation steps (computed)
    total_batch_size: int = 524288  # tokens per optimizer step: 2**19, ~0.5M as GPT-3 small
    micro_batch_size: int = 64  # sequences per forward pass per GPU; lower it if out of memory, the total stays
    seq_len: int = 1024  # tokens per sequence (<= the model's block size)
    # optimizer and schedule: GPT-3 small's
    optimizer: str = "adamw"  # adamw: AdamW on every parameter; muon: Muon on the blocks' matrices, AdamW on the rest
    max_lr: float = 6e-4  # peak learning rate (AdamW's; under muon, of the AdamW groups without an lr of their own)
    schedule: str = "cosine"  # cosine: warmup, cosine to min-lr; wsd: warmup, constant, linear cooldown to min-lr
    min_lr_ratio: float = 0.1  # the schedule ends at this fraction of each group's peak lr
    warmup_steps: int = 715  # linear warmup: 375M tokens
    cooldown_frac: float = 0.3  # wsd: the last fraction of --max-steps, in which the lr falls linearly to min-lr
    max_steps: int = 19073  # 10B tokens / 2**19 tokens per step: one epoch of FineWeb-Edu sample-10BT
    weight_decay: float = 0.1  # AdamW's, on matrices and embeddings only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    # --optimizer muon (the modern recipe; support/modern_optim.py)
    muon_lr: float = 0.02  # muon: the blocks' matrices' peak lr (Keller Jordan's; torch's Muon default 1e-3 is not)
    muon_momentum: float = 0.95  # muon: Nesterov momentum, reached after --muon-momentum-warmup steps
    muon_momentum_start: float = 0.85  # muon: the momentum at step 0, linear to --muon-momentum over the warmup
    muon_momentum_warmup: int = 300  # muon: steps of the momentum warmup (0: --muon-momentum from the start)
    muon_weight_decay: float = 0.0  # muon: decoupled, lr x this a step (torch.optim.Muon's default 0.1 is not)
    embed_lr: float | None = None  # muon: AdamW's peak lr for the embeddings (wte, wpe; tied, the head); default max-lr
    head_lr: float | None = None  # muon: AdamW's peak lr for an untied lm_head (default: --max-lr)
    scalar_lr: float | None = None  # muon: AdamW's peak lr for every vector: biases, norms' weights (default: --max-lr)
    # --optimizer muon, nanochat's rules (support/modern_optim.py; value embeddings at half --embed-lr, resid_lambdas
    # at --scalar-lr / 100, x0_lambdas at --scalar-lr, as nanochat)
    muon_variant: str = "keller"  # muon: keller: torch.optim.Muon (Newton-Schulz); nanochat: Polar Express, NorMuon
    muon_momentum_end: float | None = None  # muon: the momentum at the last step, down over the last --cooldown-frac
    muon_weight_decay_schedule: str = "constant"  # muon: constant, or cosine to 0 at --max-steps (nanochat's)
    adamw_groups: str = "shared"  # muon: shared: --beta1/--beta2 for all; nanochat: its betas and decays per group
    lr_width_scale: bool = False  # muon: the embeddings' and head's lrs x sqrt(768 / n_embd) (nanochat's rule)
    gate_lr: float = 0.2  # muon: AdamW's peak lr for --smear's and --backout's gates and scalars (nanochat's)
    # evaluation and samples
    eval_interval: int = 250  # validation, HellaSwag and samples every this many steps and at the last; 0: none
    target_val_loss: float = 0.0  # >0: stop at the first validation <= this, logging its tokens and training time
    val_steps: int = 20  # validation batches per evaluation, the same tokens every time
    hellaswag: bool = True  # HellaSwag acc_norm at each evaluation (downloads the val set, or --hellaswag-file)
    hellaswag_file: str | None = None  # a local hellaswag_val.jsonl, for offline machines
    sample: SampleConfig = field(default_factory=SampleConfig)  # the samples printed at each evaluation, per rank
    # system
    device: str = "auto"  # auto (cuda:LOCAL_RANK, mps or cpu), or cpu, cuda, mps, cuda:1 (one process only)
    dtype: str = "auto"  # autocast: bfloat16, float16 (scaled loss), float32; auto: bf16 on CUDA (or fp16), else fp32
    compile: bool | None = None  # torch.compile the training step (default: on CUDA only)
    deterministic: bool = False  # deterministic kernels only: a resumed GPU run bitwise the same (slower); CPU: always
    seed: int = 1337  # model init and --shuffle
    shuffle: bool = False  # permute shards and windows each epoch (default: in order, as the reference)
    # the machinery's options
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # checkpoints: support/checkpoints.py
    long_run: LongRunConfig = field(default_factory=LongRunConfig)  # signals, spike guard: support/long_runs.py
    memory: MemoryConfig = field(default_factory=MemoryConfig)  # fsdp, checkpointing, loss chunks: support/sharding.py
    trackers: TrackerConfig = field(default_factory=TrackerConfig)  # W&B, TensorBoard: support/metrics.py

    def model_config(self) -> GPTConfig:
        """The model a scratch run builds (--init-from scratch)."""
        return GPTConfig(self.block_size, self.vocab_size, self.n_layer, self.n_head, self.n_embd,
                         **dataclasses.asdict(self.model))

    MACHINERY = ("checkpoint", "long_run", "memory", "trackers")  # the groups below that are the machinery's

    def args(self) -> dict:
        """The arguments as checkpoints (their "args") and W&B record them: the machinery's fields at the top level,
        by their flags' names; the model's options and the samples' settings nested, under model and sample."""
        args = dataclasses.asdict(self)
        for group in self.MACHINERY:
            args |= args.pop(group)
        return args


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_gpt2.py",
        description="Train GPT-2. Subcommands: `train_gpt2.py sample --help`, `train_gpt2.py export --help`, "
                    "`train_gpt2.py plan --help`.",
        epilog="Presets: " + "; ".join(f"{k}: {v}" for k, v in recipes.PRESETS.items()) + ". " + recipes.recipe_help()
               + ".")
    # flags not given stay unset, so a preset's (and a recipe's) values apply and explicit flags override them
    add_dataclass_flags(p, TrainConfig, unset_is_absent=True, extra={
        "resume": dict(nargs="?", const="latest", metavar="CHECKPOINT"),
        "preset": dict(choices=sorted(recipes.PRESETS)),
        "recipe": dict(choices=sorted(recipes.RECIPES)),
        "shard": dict(choices=recipes.SHARDS),
        "optimizer": dict(choices=recipes.OPTIMIZERS),
        "schedule": dict(choices=recipes.SCHEDULES),
        "muon_variant": dict(choices=MUON_VARIANTS),
        "adamw_groups": dict(choices=ADAMW_GROUPS),
        "muon_weight_decay_schedule": dict(choices=WEIGHT_DECAY_SCHEDULES),
        **{name: dict(choices=choices) for name, choices in MODEL_CHOICES.items()},
        **SAMPLE_FLAG_ALIASES,
    })
    return p


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    return train_config(vars(build_train_parser().parse_args(argv)))


def train_config(args: dict) -> TrainConfig:
    """The flags given over their recipe's values for the preset, over the preset's, over the defaults
    (support/recipes.py), each group's fields gathered into its own settings (TrainConfig.model, .checkpoint...)."""
    values = recipes.layered_values(args)
    groups = {}
    for f in dataclasses.fields(TrainConfig):
        if dataclasses.is_dataclass(f.default_factory):
            fields = dataclasses.fields(f.default_factory)
            groups[f.name] = f.default_factory(**{g.name: values.pop(g.name) for g in fields if g.name in values})
    return TrainConfig(**values, **groups)


# -----------------------------------------------------------------------------
# Data loader: uint16 token shards (fineweb.py's format, and build-nanogpt's) or one .txt file (support/data.py).
# A shard is read as consecutive windows of B*T+1 tokens (inputs and the next-token targets);
# rank r takes window r of every group of world_size windows, so ranks never overlap and all
# of them move to the next shard at the same step.


class DataLoader:
    """Windows of B*T+1 tokens over a list of shards (paths or in-memory arrays), DDP-aware.

    Its position (epoch, shard, window group) is plain data: state_dict / load_state_dict.
    --shuffle permutes the shard order per epoch and the window groups within each shard,
    from the seed alone, so every rank computes the same plan and a checkpoint restores it.
    """

    def __init__(self, shards: list, B: int, T: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = False, seed: int = 0, names: list[str] | None = None):
        self.shards, self.B, self.T = shards, B, T
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.names = names or [f"shard {i}" for i in range(len(shards))]
        # full groups of world_size windows per shard
        self.groups = [(len(shard_tokens(s)) - 1) // (B * T) // world_size for s in shards]
        if not any(self.groups):
            need = B * T * world_size + 1
            raise TrainError(f"{self.names[0]}{' ...' if len(shards) > 1 else ''}: every shard is shorter than "
                             f"one step's {need} tokens (B={B} x T={T} x {world_size} ranks + 1): "
                             "use a smaller --micro-batch-size / --seq-len")
        self.reset()

    def reset(self) -> None:
        self.epoch, self.shard_pos, self.group_pos = 0, 0, 0
        self._plan()

    def _plan(self) -> None:
        n = len(self.shards)
        self.order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        self._load_shard()

    def _load_shard(self) -> None:
        i = int(self.order[self.shard_pos])
        self.tokens = shard_tokens(self.shards[i])
        g = self.groups[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        self.group_order = rng.permutation(g) if self.shuffle else np.arange(g)

    def _advance_shard(self) -> None:
        self.group_pos = 0
        self.shard_pos += 1
        if self.shard_pos == len(self.shards):
            self.shard_pos, self.epoch = 0, self.epoch + 1
            self._plan()
        else:
            self._load_shard()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        while self.group_pos >= len(self.group_order):  # skips shards too short for a single group
            self._advance_shard()
        BT = self.B * self.T
        window = int(self.group_order[self.group_pos]) * self.world_size + self.rank
        buf = torch.from_numpy(self.tokens[window * BT: window * BT + BT + 1].astype(np.int64))
        self.group_pos += 1
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)  # inputs, targets (B, T)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "group_pos": self.group_pos,
                "num_shards": len(self.shards), "B": self.B, "T": self.T, "shuffle": self.shuffle, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for k in ("num_shards", "B", "T", "shuffle", "seed"):  # the world size is the run's: checked on resume
            if state[k] != mine[k]:
                raise TrainError(f"checkpoint's data loader had {k}={state[k]}, this run has {mine[k]}: "
                                 "resume with the same data, batch shape and --shuffle/--seed")
        self.epoch, self.shard_pos = state["epoch"], state["shard_pos"]
        self._plan()  # the epoch's shard order, then the shard at shard_pos with its window order
        self.group_pos = state["group_pos"]


def to_device(x: torch.Tensor, device: str) -> torch.Tensor:
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True)  # the copy overlaps the previous step's work
    return x.to(device)


def open_data(cfg: TrainConfig, dist: Dist, need_val: bool, vocab_size: int):
    """Train and val loaders over the data's splits (support/data.py: shards or a .txt file, checked before step 0)."""
    splits, names = open_splits(Path(cfg.data), cfg.val_fraction, need_val, vocab_size, dist)
    B, T, kw = cfg.micro_batch_size, cfg.seq_len, dict(rank=dist.rank, world_size=dist.world_size, seed=cfg.seed)
    train_loader = DataLoader(splits["train"], B, T, shuffle=cfg.shuffle, names=names["train"], **kw)
    val_loader = DataLoader(splits["val"], B, T, names=names["val"], **kw) if need_val else None
    return train_loader, val_loader


# -----------------------------------------------------------------------------
# Optimizer and learning-rate schedule: GPT-3 small's AdamW, warmup and cosine. The modern recipe's Muon and
# WSD schedule are support/modern_optim.py's.


def configure_optimizer(model: nn.Module, weight_decay: float, lr: float, betas: tuple[float, float],
                        eps: float, device_type: str) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings (dim >= 2) only, never on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device_type == "cuda")


def get_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to max_lr, then cosine decay to min_lr at max_steps, then min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step > max_steps:
        return min_lr
    decay_ratio = (step - warmup_steps) / (max_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


def configure_optimizers(model: nn.Module, cfg: TrainConfig, device_type: str):
    """(AdamW, Muon or None): GPT-2's AdamW alone (configure_optimizer), or --optimizer muon's pair."""
    if cfg.optimizer == "muon":
        return configure_muon(model, cfg, device_type)
    betas = (cfg.beta1, cfg.beta2)
    return configure_optimizer(model, cfg.weight_decay, cfg.max_lr, betas, cfg.eps, device_type), None


def set_schedule(run: Run, step: int) -> tuple[float, float | None]:
    """Every group's lr at this step (its peak lr through --schedule), Muon's momentum; returns the lr logged
    (the matrices' group: AdamW's under adamw, Muon's under muon) and the momentum (None without Muon)."""
    cfg = run.cfg
    for optimizer in run.optimizers:
        for group in optimizer.param_groups:
            peak = base_lr(cfg, group)
            if cfg.schedule == "wsd":
                lr = get_wsd_lr(step, peak, peak * cfg.min_lr_ratio, cfg.warmup_steps, cfg.max_steps,
                                cooldown_steps(cfg.max_steps, cfg.cooldown_frac))
            else:  # as GPT-2's recipe always computed it: the same floats
                lr = get_lr(step, peak, peak * cfg.min_lr_ratio, cfg.warmup_steps, cfg.max_steps)
            group["lr"] = lr
    if run.muon is None:
        return run.optimizer.param_groups[0]["lr"], None
    momentum = set_muon_step(run.muon, cfg, step)  # its momentum (and weight decay) schedule
    return run.muon.param_groups[0]["lr"], momentum


# -----------------------------------------------------------------------------
# The run: one plain record of everything the loop works with, made by setup()

UNTIMED_STEPS = 10  # --target-val-loss's clock starts after each process's first steps (compilation, warm-up)


@dataclass
class Run:
    cfg: TrainConfig
    dist: Dist
    raw_model: GPT  # the weights, eager (sharded in place under fsdp): HellaSwag and samples, checkpoints
    compiled: nn.Module  # raw_model, compiled with --compile: validation (training's shapes, no recompiles)
    model: nn.Module  # compiled, wrapped in DDP when there are several ranks (not under fsdp): what training calls
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # float16's loss scaling; None otherwise
    train_loader: DataLoader
    val_loader: DataLoader | None
    hella_examples: list[dict] | None
    autocast_dtype: torch.dtype | None  # None: fp32
    grad_accum: int  # micro-batches per optimizer step
    flops_per_token: int
    peak_flops: float | None
    metrics: Metrics | None = None
    spike_guard: SpikeGuard | None = None  # --spike-guard's
    start_step: int = 0
    val_loss: float | None = None
    muon: torch.optim.Muon | None = None  # --optimizer muon's, beside `optimizer` (then AdamW on the rest)
    train_time: float = 0.0  # seconds in timed training steps, across resumes (--target-val-loss reports it)
    timed_from: int = UNTIMED_STEPS  # the first step train_time counts: this process's first + UNTIMED_STEPS

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer] + ([self.muon] if self.muon is not None else [])

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.dist.device_type, dtype=self.autocast_dtype)


# -----------------------------------------------------------------------------
# Set-up: every check before step 0, then the run. What each rank reads for itself (the checkpoint, the
# model, HellaSwag, rank 0's log and trackers) goes through on_every_rank: a failure on one stops them all.


def check_batch(cfg: TrainConfig, world_size: int) -> None:
    """The batch's shape, and the flags that split the model and its work over the ranks."""
    B, T = cfg.micro_batch_size, cfg.seq_len
    if cfg.total_batch_size % (B * T * world_size):
        raise TrainError(f"--total-batch-size {cfg.total_batch_size} is not divisible by micro-batch {B} x "
                         f"seq-len {T} x {world_size} ranks = {B * T * world_size}: change one of them")
    cfg.memory.check(world_size)


def build_model(cfg: TrainConfig, ckpt: dict | None) -> GPT:
    if ckpt is not None:
        model = checkpoints.model_from_checkpoint(ckpt)
    elif cfg.init_from == "scratch":
        model = GPT(cfg.model_config())
    else:
        try:
            model = read_model(cfg.init_from, vocab_size=cfg.vocab_size)
        except OSError as e:  # transformers' word for a name it cannot find or download
            raise TrainError(f"--init-from {cfg.init_from}: {one_line(e)}") from None
    c, sample = model.config, cfg.sample
    if cfg.optimizer == "muon" and not c.split_qkv:
        raise TrainError(f"--optimizer muon orthogonalises q, k and v one by one: --init-from {cfg.init_from} has "
                         "GPT-2's joint c_attn matrix (fine-tune it with --optimizer adamw)")
    if cfg.seq_len > c.block_size:
        raise TrainError(f"--seq-len {cfg.seq_len} exceeds the model's block size {c.block_size}")
    if cfg.eval_interval <= 0 or not (cfg.hellaswag or sample.num_samples > 0):
        return model
    if c.vocab_size < GPT2_VOCAB_SIZE:
        raise TrainError(f"vocab size {c.vocab_size} < GPT-2's {GPT2_VOCAB_SIZE}: HellaSwag and "
                         "samples need GPT-2 tokens; pass --no-hellaswag --num-samples 0")
    prompt = len(get_tokenizer().encode(sample.prompt, allowed_special={"<|endoftext|>"}))
    if sample.num_samples > 0 and prompt + sample.max_new_tokens > c.block_size:
        raise TrainError(f"--prompt ({prompt} tokens) + --max-new-tokens {sample.max_new_tokens} exceed the "
                         f"model's block size {c.block_size}: shorten one")
    return model


def load_hellaswag(cfg: TrainConfig, dist: Dist, block_size: int) -> list[dict]:
    """The validation examples, every one checked to fit the model (each rank checks them all, alike)."""
    try:
        examples = hellaswag.load_examples("val", data_file=cfg.hellaswag_file, dist=dist)
    except (hellaswag.HellaSwagError, OSError) as e:
        raise TrainError(f"HellaSwag data not obtainable ({e}): pass --hellaswag-file or --no-hellaswag") from e
    try:
        hellaswag.check_fits(examples, block_size)
    except hellaswag.HellaSwagError as e:
        raise TrainError(f"HellaSwag {e}: train a longer --block-size, or pass --no-hellaswag") from None
    return examples


def wrap_model(raw_model: GPT, cfg: TrainConfig, dist: Dist) -> tuple[nn.Module, nn.Module, bool]:
    """(compiled, model): raw_model (sharded in place under fsdp) compiled with --compile (default: on
    CUDA), then wrapped in DDP for several ranks under ddp; and whether it was compiled."""
    raw_model.activation_checkpointing = cfg.memory.activation_checkpointing
    use_compile = cfg.compile if cfg.compile is not None else dist.device_type == "cuda"
    if cfg.memory.shard == "fsdp":  # cut on the CPU: only this rank's shards go to the device; blocks compiled inside
        sharding.shard_model(raw_model, dist, use_compile)
        return raw_model, raw_model, use_compile
    raw_model.to(dist.device)
    compiled = torch.compile(raw_model) if use_compile else raw_model
    if dist.world_size == 1:
        return compiled, compiled, use_compile
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [torch.device(dist.device).index] if dist.device_type == "cuda" else None
    # no buffer broadcast before every forward: the only buffers are RoPE's cos/sin tables, the same on every rank;
    # the gradients are views into DDP's all-reduce buckets, not a second copy of them (4 bytes a parameter)
    ddp = DDP(compiled, device_ids=device_ids, broadcast_buffers=False, gradient_as_bucket_view=True)
    return compiled, ddp, use_compile


def loss_scaler(autocast_dtype: torch.dtype | None, cfg: TrainConfig, dist: Dist) -> torch.amp.GradScaler | None:
    """float16's gradient scaler: the loss is multiplied by a large power of two before backward, so that small
    gradients do not underflow fp16; a step whose gradients overflow is skipped and the scale halved."""
    if autocast_dtype != torch.float16:
        return None
    if cfg.memory.shard == "fsdp":
        return sharding.grad_scaler(dist.device_type)
    return torch.amp.GradScaler(dist.device_type)


def setup(cfg: TrainConfig, dist: Dist) -> Run:
    """Check everything, build everything, resume if asked: the run, ready for its first step."""
    torch.manual_seed(cfg.seed)
    check_batch(cfg, dist.world_size)
    # gradient accumulation: micro-batches of B x T tokens on each rank add up to total_batch_size per step
    grad_accum = cfg.total_batch_size // (cfg.micro_batch_size * cfg.seq_len * dist.world_size)
    cfg.checkpoint.check()
    cfg.long_run.check(cfg.checkpoint.checkpoint_interval)
    recipes.check_recipe(cfg)
    use_tf32(dist.device_type)  # CUDA: fp32 matmuls on TF32 tensor cores
    autocast_dtype = resolve_dtype(cfg.dtype, dist.device_type)  # bf16 on GPUs that have it, fp16 else; CPU: fp32
    ckpt, ckpt_path = long_runs.start_attempt(cfg, dist)  # --resume's checkpoint (None: a fresh run)
    others = lambda what: TrainError(f"another rank could not {what} (see its error)")
    raw_model = on_every_rank(lambda: build_model(cfg, ckpt), dist, others("build the model"))
    need_eval = cfg.eval_interval > 0
    train_loader, val_loader = open_data(cfg, dist, need_eval, raw_model.config.vocab_size)
    hella = on_every_rank(lambda: load_hellaswag(cfg, dist, raw_model.config.block_size),
                          dist, others("load HellaSwag")) if need_eval and cfg.hellaswag else None
    compiled, model, use_compile = wrap_model(raw_model, cfg, dist)
    optimizer, muon = configure_optimizers(raw_model, cfg, dist.device_type)  # after sharding: the sharded params
    run = Run(cfg, dist, raw_model, compiled, model, optimizer, loss_scaler(autocast_dtype, cfg, dist), train_loader,
              val_loader, hella, autocast_dtype, grad_accum, flops_per_token(raw_model.config, cfg.seq_len),
              peak_flops(dist.device, bf16=autocast_dtype is not None), muon=muon)  # fp32 matmuls: TF32
    guard = cfg.long_run
    run.spike_guard = SpikeGuard(guard.spike_threshold, guard.spike_window, ckpt_path) if guard.spike_guard else None
    if ckpt is not None:
        checkpoints.restore_run(run, ckpt)
        del ckpt  # every rank holds it in host memory: model + Adam state, 1.5 GB at 124M, 18 GB for gpt2-xl
    run.timed_from = run.start_step + UNTIMED_STEPS
    run.metrics = on_every_rank(lambda: Metrics(cfg, dist, run.start_step), dist, others("open its log"))
    _, restart, max_restarts = torchrun_attempt()
    if max_restarts > 0:  # where each attempt starts (also in restarts.txt)
        run.metrics.log(run.start_step, restart=restart)
    if ckpt_path is not None:
        run.metrics.print(f"resuming from {ckpt_path} at step {run.start_step}")
    print_setup(run, use_compile)
    return run


def print_setup(run: Run, use_compile: bool) -> None:
    """The run's first lines: the model, the ranks and the batch, the recipe and the optimizer's groups."""
    cfg, dist, autocast_dtype = run.cfg, run.dist, run.autocast_dtype
    run.metrics.print(f"{run.raw_model.num_parameters():,} parameters | {dist.world_size} rank(s) on {dist.device} | "
                      f"{cfg.memory.shard} | grad accumulation {run.grad_accum} | {cfg.total_batch_size:,} tokens/step "
                      f"| compile {use_compile} | autocast {autocast_dtype or 'off'}"
                      f"{' with loss scaling' if run.scaler else ''}"
                      f"{' | activation checkpointing' if cfg.memory.activation_checkpointing else ''}"
                      f"{' | deterministic kernels' if cfg.deterministic else ''}")
    for line in recipes.recipe_lines(cfg) + optimizer_lines(cfg, run.optimizer, run.muon):
        run.metrics.print(line)
    if cfg.dtype == "auto" and autocast_dtype == torch.float16:
        run.metrics.print("--dtype auto: this GPU has no bfloat16, so float16 autocast with loss scaling")
    if cfg.memory.shard == "fsdp" and cfg.memory.loss_chunk == 0 and dist.device_type == "cuda":
        memory = torch.cuda.get_device_properties(dist.device).total_memory
        tokens, dtype_bytes = cfg.micro_batch_size * cfg.seq_len, 4 if autocast_dtype is None else 2
        warning = logits_warning(run.raw_model.config, tokens, dtype_bytes, memory)
        if warning:
            run.metrics.print(warning)


# -----------------------------------------------------------------------------
# Evaluation: validation loss, HellaSwag and samples, every eval_interval steps and at the last


@torch.no_grad()
def validation_loss(run: Run) -> torch.Tensor:
    """This rank's mean loss over the same val_steps batches every time (on the device: no sync)."""
    loader, device = run.val_loader, run.dist.device
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(run.cfg.val_steps):
        x, y = loader.next_batch()
        with run.autocast():
            _, loss = run.compiled(to_device(x, device), to_device(y, device), loss_chunk=run.cfg.memory.loss_chunk)
        total += loss.detach().float() / run.cfg.val_steps
    return total


def hellaswag_counts(run: Run) -> torch.Tensor:
    """This rank's share of HellaSwag: (correct, correct by acc_norm, total); zeros without HellaSwag."""
    if run.hella_examples is None:
        return torch.zeros(3, device=run.dist.device)
    return hellaswag.count_correct(run.raw_model, run.hella_examples, run.dist.device, rank=run.dist.rank,
                                   world_size=run.dist.world_size, autocast_dtype=run.autocast_dtype)


def evaluate(run: Run, step: int) -> None:
    """Each rank does its share, then one collective sums the results with whether any rank failed: a
    failure on one rank (out of memory in a HellaSwag batch, ...) stops every rank, none waits for it."""
    cfg, dist = run.cfg, run.dist
    local, texts, error = torch.zeros(4, device=dist.device), [], None  # val loss, HellaSwag counts (3)
    try:
        with sharding.gathered(run.raw_model):  # under fsdp: each rank's forwards are its own, no collective inside
            local[0] = validation_loss(run)
            # HellaSwag and samples, whose shapes vary, run eagerly (under fsdp the blocks are compiled in place)
            with torch.compiler.set_stance("force_eager"):
                local[1:] = hellaswag_counts(run)
                texts = sample_text(run.raw_model, cfg.sample, seed=42 + dist.rank, device=dist.device) \
                    if cfg.sample.num_samples > 0 else []
    except Exception as e:  # every rank must hear of it, or the others would wait in the collective below
        error = e
    total = all_reduce_or_raise(local, error, dist, TrainError(f"step {step}: another rank failed in evaluation "
                                                               "(see its error)"))
    run.val_loss = total[0].item() / dist.world_size  # Gloo has no AVG
    run.metrics.log(step, val=run.val_loss)
    if run.hella_examples is not None:
        res = hellaswag.results(total[1:])
        run.metrics.log(step, hella=res["acc_norm"], note=f"{res['num_correct_norm']}/{res['num_total']} right")
    for i, text in enumerate(texts):
        print(f"rank {dist.rank} sample {i}: {text}", flush=True)


# -----------------------------------------------------------------------------
# The training step


def grad_sync(run: Run, sync: bool):
    """Gradient accumulation: the ranks reduce gradients on the last micro-step only (sync); before it each
    rank adds them up locally: DDP's no_sync(), FSDP's requires_gradient_sync (whole gradients meanwhile).
    --reduce-every-micro-step (fsdp): reduce-scatter after every micro-step and add up the shards instead."""
    if sharding.is_sharded(run.raw_model):
        return sharding.gradient_sync(run.raw_model, sync or run.cfg.memory.reduce_every_micro_step)
    return nullcontext() if sync or run.dist.world_size == 1 else run.model.no_sync()


def backward(run: Run, stop: StopSignal) -> torch.Tensor:
    """Forward and backward over grad_accum micro-batches; the gradients and, on the device, [the mean loss,
    the stop request, the checkpoint request, the gradient norm] (clipped after, and unscaled first under
    float16)."""
    cfg, device = run.cfg, run.dist.device
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(run.grad_accum):
        x, y = (to_device(t, device) for t in run.train_loader.next_batch())
        with grad_sync(run, sync=micro_step == run.grad_accum - 1):
            with run.autocast():
                loss = run.model(x, y, loss_chunk=cfg.memory.loss_chunk)[1]  # the (B, T, vocab) logits are not kept
            loss = loss / run.grad_accum  # the mean over the whole batch, not a sum of means
            loss_accum += loss.detach()
            (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
    if run.scaler is not None:
        for optimizer in run.optimizers:
            run.scaler.unscale_(optimizer)  # the true gradients, for the norm and its clipping
    norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    norm = sharding.whole(norm)  # under fsdp, the norm over every rank's shard
    requests = [torch.full((), float(asked), device=device) for asked in (stop.requested, stop.checkpoint_due)]
    return torch.stack([loss_accum.float(), *requests, norm.float()])


def optimizer_step(run: Run, norm: torch.Tensor) -> None:
    """Every optimizer's step; under float16 through the scaler, which skips a step whose gradients overflowed.
    GradScaler decides for each optimizer from its own gradients: with Muon and AdamW, an overflow in one skips
    both here (norm, the unscaled gradients' norm over all of them, is then not finite)."""
    if run.scaler is None:
        for optimizer in run.optimizers:
            optimizer.step()
        return
    if len(run.optimizers) == 1 or torch.isfinite(norm).item():  # one optimizer: GradScaler's own decision
        for optimizer in run.optimizers:
            run.scaler.step(optimizer)  # skipped if any of its gradients overflowed (inf / nan)
    run.scaler.update()  # halves the scale after an overflow, doubles it after 2000 clean steps


def train_step(run: Run, step: int, stop: StopSignal) -> dict:
    """One optimizer step over grad_accum micro-batches. It waits for the device once, at the end, for the
    loss, the gradient norm and whether any rank was asked to stop or to checkpoint, all in one tensor."""
    cfg, dist = run.cfg, run.dist
    t0 = time.perf_counter()
    for optimizer in run.optimizers:
        optimizer.zero_grad(set_to_none=True)
    stats = backward(run, stop)
    lr, momentum = set_schedule(run, step)
    # the loss and the requests summed over ranks: every rank logs the same loss, checkpoints and stops alike
    all_reduce_sum(stats[:3])
    optimizer_step(run, stats[3])
    loss_sum, stops, due, norm = stats.tolist()  # the step's one sync: queued after the update, it waits for it
    dt = time.perf_counter() - t0
    if step >= run.timed_from:  # the speedrun's clock: not the first steps of a process (compilation, warm-up)
        run.train_time += dt
    loss, diverged = loss_sum / dist.world_size, None
    # float16: gradients that overflow were not applied (the scaler skipped the step); anything else non-finite
    # means the weights are lost: the run stops before any checkpoint holds them, or --spike-guard rewinds
    skipped = run.scaler.get_scale() if run.scaler is not None and not math.isfinite(norm) else None
    if not (math.isfinite(loss) and (math.isfinite(norm) or (skipped or 0) >= 1)):  # < 1: fp16 overflows unscaled
        diverged = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
        if run.spike_guard is None:
            raise TrainingDiverged(f"{diverged} at step {step}: stopping; the last checkpoint "
                                   f"({checkpoints.latest_checkpoint(cfg.log_dir) or 'none'}) is untouched")
    tokens_per_sec = cfg.total_batch_size / dt
    mfu = tokens_per_sec * run.flops_per_token / run.peak_flops / dist.world_size if run.peak_flops else None
    return {"loss": loss, "lr": lr, "norm": norm, "dt": dt, "tokens_per_sec": tokens_per_sec, "mfu": mfu,
            "stop": stops > 0, "checkpoint": due > 0, "diverged": diverged, "skipped": skipped, "momentum": momentum}


# -----------------------------------------------------------------------------
# The training loop


def loop(run: Run, on_step=None) -> dict:
    cfg, metrics, guard = run.cfg, run.metrics, run.spike_guard
    saved, step, done = [], run.start_step, run.start_step - 1
    with StopSignal(cfg.long_run.checkpoint_minutes) as stop:
        while step < cfg.max_steps:
            last_step = step == cfg.max_steps - 1
            if cfg.eval_interval > 0 and (step % cfg.eval_interval == 0 or last_step):
                evaluate(run, step)
                if reached_target(run, step, saved):
                    break

            stats = train_step(run, step, stop)
            if step == run.start_step:  # compiled and running: from here a rank that hangs ends the job
                set_collective_timeout(cfg.long_run.dist_timeout)
            why = guard.check(stats["loss"], stats["diverged"]) if guard is not None else None
            if why is not None:  # before the step's checkpoint: a spiked step is never saved
                step = long_runs.rewind(run, step, stats["loss"], why)
                continue
            metrics.log(step, train=stats["loss"], **{k: stats[k] for k in ("lr", "momentum", "norm", "dt",
                                                                            "tokens_per_sec", "mfu", "skipped")})

            stopping = stats["stop"] or step == cfg.long_run.stop_after_step
            every = cfg.checkpoint.checkpoint_interval
            periodic = every > 0 and step > 0 and step % every == 0
            if last_step or periodic or stopping or stats["checkpoint"]:  # the last: --checkpoint-minutes
                path, stop.last_checkpoint = checkpoints.save_run(run, step), time.monotonic()
                if path is not None:
                    saved.append(str(path))
                    metrics.print(f"saved {path}")
            if on_step is not None:  # after the checkpoint: a callback may inspect (or break) the model
                on_step(step, {**stats, "model": run.raw_model})
            done = step
            if stopping:
                metrics.print(f"stopped after step {step}; continue with --resume")
                break
            step += 1
    return {**metrics.history, "checkpoints": saved, "step": done, "val_loss": run.val_loss}


def reached_target(run: Run, step: int, saved: list[str]) -> bool:
    """--target-val-loss: whether the evaluation at `step` (of the weights after steps 0..step-1) reached it. If so,
    logs the speedrun's metric, the tokens trained (step x tokens per step, from step 0) and the training time
    (Run.train_time: the training steps' own time, as the records time it: each process's first UNTIMED_STEPS
    steps left out, which compile and warm up; evaluations, checkpoints and set-up not counted; carried over
    resumes), and checkpoints those weights, as step - 1. Every rank decides alike (the val loss is all-reduced),
    and every rank takes part in the checkpoint."""
    cfg, metrics = run.cfg, run.metrics
    if not cfg.target_val_loss or run.val_loss > cfg.target_val_loss:
        return False
    tokens = step * cfg.total_batch_size
    metrics.log(step, target_tokens=tokens, target_time=run.train_time)
    path = checkpoints.save_run(run, step - 1) if step > 0 else None
    if path is not None and str(path) not in saved:
        saved.append(str(path))
    what = f"saved {path}" if path else "nothing trained yet"
    metrics.print(f"--target-val-loss {cfg.target_val_loss} reached: val loss {run.val_loss:.4f} after {step:,} "
                  f"steps, {tokens:,} tokens, {duration(run.train_time)} of training (the time of steps "
                  f"{UNTIMED_STEPS}..{step - 1}, each process's first {UNTIMED_STEPS} left out: compilation, warm-up); "
                  f"stopped ({what}; to go on: --resume --target-val-loss 0)")
    return True


def train(cfg: TrainConfig, on_step=None) -> dict:
    """Run training; returns the history: every metric by step, the checkpoints written, the last step.
    on_step(step, stats) is called after every optimizer step (tests, notebooks, the benchmark): stats
    holds loss, lr, norm, dt (seconds), tokens_per_sec, mfu (None off a known GPU), stop, model."""
    with deterministic_kernels(cfg.deterministic):  # before anything runs on the GPU
        dist = setup_distributed(cfg.device)
        run, failed = None, True
        try:
            run = setup(cfg, dist)
            history = loop(run, on_step)
            run.metrics.print(peak_memory(dist))
            barrier()  # the ranks leave together: Gloo aborts if a peer leaves mid-connection
            failed = False
            return history
        finally:
            try:
                if run is not None:
                    run.metrics.close(failed)
            finally:
                teardown_distributed()


# -----------------------------------------------------------------------------
# Command line: train (default), sample, export, plan. plan takes the training flags, so it is built here; sample
# and export are support/sampling.py's and support/hf.py's


def plan_main(argv: list[str]) -> None:
    p = build_train_parser()
    p.prog, p.description = "train_gpt2.py plan", "What a training run's configuration needs per GPU, and costs."
    usable = ", ".join(f"{gpu} {sold} ({usable_gib(gpu)})" for gpu, sold in GPU_MEMORY_GIB.items())
    p.epilog = f"GPUs (--gpu), GiB as sold (usable): {usable}. " + p.epilog
    add_dataclass_flags(p, PlanConfig, extra={"gpu": dict(choices=sorted(GPU_MEMORY_GIB))})
    names = {f.name for f in dataclasses.fields(PlanConfig)}
    args = vars(p.parse_args(argv))
    plan = PlanConfig(**{k: args.pop(k) for k in names})
    cfg = train_config(args)
    if plan.gpus < 1 or not 0 < plan.mfu <= 1 or plan.price < 0 or (plan.gpu_memory or 1) <= 0:
        raise TrainError("--gpus, --gpu-memory and --price take positive numbers, --mfu a fraction in (0, 1]")
    check_batch(cfg, plan.gpus)  # the training run's own checks: divisibility, fsdp on one GPU, ...
    recipes.check_recipe(cfg)
    print("\n".join(plan_report(cfg, plan)))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    agent = os.getppid()  # under torchrun, its agent (long_runs.end_torchrun)
    commands = {"sample": sample_main, "export": export_main, "plan": plan_main}  # support/sampling.py, hf.py
    try:
        if argv and argv[0] in commands:
            commands[argv[0]](argv[1:])
        else:
            train(parse_train_args(argv))
    except long_runs.NoProgress as e:
        report_error("train_gpt2.py", e)
        long_runs.end_torchrun(agent)
        sys.exit(long_runs.NO_PROGRESS_EXIT)
    except (TrainError, TokenizerError, OSError, ValueError) as e:  # OSError: a full disk, a --log-dir that is a file
        report_error("train_gpt2.py", e)
        sys.exit(2)
    except TrainingDiverged as e:
        report_error("train_gpt2.py", e)
        sys.exit(1)


if __name__ == "__main__":
    main()
