"""
Train GPT-2 (124M) from scratch, as in the lecture: FineWeb-Edu shards (or any .txt file) in, checkpoints out.

    python train_gpt2.py --preset shakespeare                      # a small GPT on a laptop CPU
    torchrun --standalone --nproc_per_node=8 train_gpt2.py         # GPT-2 124M on FineWeb-Edu
    python train_gpt2.py sample -m gpt2 --prompt "Hello, I'm a language model,"
    python train_gpt2.py export log/model_19072.pt hf_out/         # a folder transformers loads

The model, its tokenizer and what every script shares are in gpt2.py; HellaSwag is in hellaswag.py.
Sections: configuration, data, optimizer and schedule, metrics, the run, checkpoints, set-up,
evaluation, the training step, the training loop, command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import math
import os
import re
import signal
import statistics
import sys
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import hellaswag
from gpt2 import (
    DATA_DIR,
    DATASETS,
    GPT,
    GPT2_VOCAB_SIZE,
    MODEL_CHOICES,
    PROCESS_GROUP_TIMEOUT_MINUTES,
    SAMPLE_FLAG_ALIASES,
    CheckpointDamaged,
    Dist,
    GPTConfig,
    ModelOptions,
    SampleConfig,
    TokenizerError,
    add_dataclass_flags,
    all_reduce_or_raise,
    all_reduce_sum,
    atomic_write,
    barrier,
    check_checkpoint_bytes,
    dataset_dir,
    download,
    fsync_folder,
    get_tokenizer,
    hf_architecture,
    is_shard,
    load_checkpoint,
    load_model,
    model_entries,
    model_from_checkpoint,
    on_every_rank,
    one_line,
    rank_0_first,
    read_model,
    remove_stale_temp_files,
    resolve_device,
    sample_text,
    save_checkpoint,
    set_collective_timeout,
    setup_distributed,
    setup_precision,
    teardown_distributed,
    torchrun_attempt,
)


class TrainError(ValueError):
    """Bad input or configuration: reported as one line before step 0."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: the run stops, and its last checkpoint stays as it was."""


# -----------------------------------------------------------------------------
# Configuration: every field is a --kebab-case flag; its comment is the --help text.


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
    muon_lr: float = 0.02  # muon: the blocks' matrices' peak lr (Keller Jordan's; torch's Muon default 1e-3 is not)
    muon_momentum: float = 0.95  # muon: Nesterov momentum, reached after --muon-momentum-warmup steps
    muon_momentum_start: float = 0.85  # muon: the momentum at step 0, linear to --muon-momentum over the warmup
    muon_momentum_warmup: int = 300  # muon: steps of the momentum warmup (0: --muon-momentum from the start)
    muon_weight_decay: float = 0.0  # muon: decoupled, lr x this a step (torch.optim.Muon's default 0.1 is not)
    embed_lr: float | None = None  # muon: AdamW's peak lr for the embeddings (wte, wpe; tied, the head); default max-lr
    head_lr: float | None = None  # muon: AdamW's peak lr for an untied lm_head (default: --max-lr)
    scalar_lr: float | None = None  # muon: AdamW's peak lr for every vector: biases, norms' weights (default: --max-lr)
    # evaluation and samples
    eval_interval: int = 250  # validation, HellaSwag and samples every this many steps and at the last; 0: none
    target_val_loss: float = 0.0  # >0: stop at the first validation <= this, logging its tokens and training time
    val_steps: int = 20  # validation batches per evaluation, the same tokens every time
    hellaswag: bool = True  # HellaSwag acc_norm at each evaluation (downloads the val set, or --hellaswag-file)
    hellaswag_file: str | None = None  # a local hellaswag_val.jsonl, for offline machines
    sample: SampleConfig = field(default_factory=SampleConfig)  # the samples printed at each evaluation, per rank
    # checkpoints and logging
    checkpoint_interval: int = 5000  # write a checkpoint every this many steps, and at the last step (0: last only)
    resume: str | None = None  # alone: the newest whole checkpoint in --log-dir; auto: that or a fresh start; a path
    keep_last: int = 0  # keep the newest N >= 2 checkpoints, deleting older ones once the new one is in place (0: all)
    checkpoint_minutes: float = 0  # also checkpoint when this many minutes passed since the last one (spot machines)
    stop_after_step: int | None = None  # checkpoint and exit after this step, as if preempted (fixed-length jobs)
    spike_guard: bool = False  # a loss far above its recent ones: rewind to the newest checkpoint, skip its batches
    spike_threshold: float = 8.0  # a spike: loss > median + this x robust std (MAD x 1.4826) of --spike-window losses
    spike_window: int = 100  # the recent losses a step is compared with; no check until there are this many
    max_rewinds: int = 3  # --spike-guard stops the run at the spike after this many rewinds
    wandb: str | None = None  # also log to this Weights & Biases project (pip install wandb; WANDB_MODE=offline)
    tensorboard: bool = False  # also write TensorBoard event files into --log-dir (pip install tensorboard)
    # system
    device: str = "auto"  # auto (cuda:LOCAL_RANK, mps or cpu), or cpu, cuda, mps, cuda:1 (one process only)
    dtype: str = "auto"  # autocast: bfloat16, float16 (scaled loss), float32; auto: bf16 on CUDA (or fp16), else fp32
    shard: str = "ddp"  # ddp: every rank holds all weights, gradients, AdamW state; fsdp: each 1/N of them (FSDP2)
    activation_checkpointing: bool = False  # recompute blocks' activations in backward: less memory, ~1/3 more compute
    reduce_every_micro_step: bool = False  # fsdp, accumulating: gradients stay sharded (4/N B a weight), at N x traffic
    compile: bool | None = None  # torch.compile the training step (default: on CUDA only)
    dist_timeout: float = 120  # seconds a collective waits for a hung rank from the first step on (before it: 30 min)
    loss_chunk: int = 0  # >0: output layer + loss this many tokens at a time, never all the logits at once (memory)
    seed: int = 1337  # model init and --shuffle
    shuffle: bool = False  # permute shards and windows each epoch (default: in order, as the reference)

    def model_config(self) -> GPTConfig:
        """The model a scratch run builds (--init-from scratch)."""
        return GPTConfig(self.block_size, self.vocab_size, self.n_layer, self.n_head, self.n_embd,
                         **dataclasses.asdict(self.model))


SHARDS = ("ddp", "fsdp")  # --shard's choices
OPTIMIZERS = ("adamw", "muon")  # --optimizer's
SCHEDULES = ("cosine", "wsd")  # --schedule's

PRESETS = {
    # the GPT-2 ladder, as llm.c's published runs (all: T=1024, vocab 50304, weight decay 0.1, clip 1.0,
    # HellaSwag every 250 steps). gpt2 is the defaults: the lecture's 124M recipe on FineWeb-Edu sample-10BT
    "gpt2": {},
    "gpt2-medium": dict(  # 350M: 60,000 steps of 2**19 tokens = 31.5B tokens of FineWeb sample-100BT
        n_layer=24, n_head=16, n_embd=1024, max_lr=3e-4, warmup_steps=700, min_lr_ratio=0.0, max_steps=60000,
        data=str(dataset_dir("fineweb100B")), log_dir="log_gpt2-medium"),
    "gpt2-large": dict(  # 774M: 286,102 steps of 2**19 tokens = 150B tokens of FineWeb sample-100BT
        n_layer=36, n_head=20, n_embd=1280, micro_batch_size=32, max_lr=2.5e-4, warmup_steps=700, min_lr_ratio=0.0,
        max_steps=286102, data=str(dataset_dir("fineweb100B")), log_dir="log_gpt2-large"),
    "gpt2-xl": dict(  # 1.5B: 32,000 steps of 2**20 tokens = 33.55B tokens of FineWeb-Edu sample-100BT
        n_layer=48, n_head=25, n_embd=1600, total_batch_size=1048576, micro_batch_size=16, max_lr=6e-4,
        warmup_steps=700, max_steps=32000, data=str(dataset_dir("edu_fineweb100B")), log_dir="log_gpt2-xl"),
    # the quick start, ~2 minutes on a 2-core laptop CPU. Each token costs about the same whatever the width,
    # most of it the 50304-wide output layer and its softmax, so the budget buys ~0.6M tokens: a narrow model
    # (32 wide) that sees tiny Shakespeare's 304K training tokens twice beats a wider one that sees them once
    "shakespeare": dict(
        data="input.txt", log_dir="log_shakespeare", n_layer=4, n_head=2, n_embd=32, block_size=128,
        total_batch_size=1024, micro_batch_size=8, seq_len=128, max_lr=3e-2, warmup_steps=20, max_steps=594,
        eval_interval=198, val_steps=4, hellaswag=False, checkpoint_interval=297, loss_chunk=64,
        num_samples=2, max_new_tokens=48, prompt="ROMEO:",
    ),
    # OpenAI's GPT-2 (124M, downloaded from the Hub) fine-tuned on tiny Shakespeare; a GPU makes it quick
    "shakespeare-gpt2": dict(
        data="input.txt", log_dir="log_shakespeare_gpt2", init_from="gpt2", vocab_size=50257, total_batch_size=16384,
        micro_batch_size=8, seq_len=512, max_lr=1e-4, warmup_steps=5, max_steps=50, eval_interval=10, val_steps=8,
        hellaswag=False, checkpoint_interval=0, loss_chunk=1024, num_samples=2, max_new_tokens=48, prompt="ROMEO:",
    ),
    # modded-nanogpt's speedrun at its record 11 (records/track_1_short/2024-11-10_UNetDoubleLr, the log's script):
    # 124M-sized with 6 heads of 128, 3000 steps of 8 x 64 x 1024 tokens on FineWeb sample-10BT (its cached
    # fineweb10B), validation every 125 steps on 20 batches a rank (the record's 10,485,760 tokens on 8 GPUs),
    # stopping at val loss 3.28: the speedrun's metric. The recipe's values for it are RECIPES["modern"]["speedrun"].
    # Not in our model: the record's value residual, x0 shortcut and U-net skips, and its bf16 embedding and
    # activations; HellaSwag is off, as in the record (--hellaswag adds it; its time is not counted)
    "speedrun": dict(
        recipe="modern", n_layer=12, n_head=6, n_embd=768, total_batch_size=524288, micro_batch_size=64, seq_len=1024,
        max_steps=3000, eval_interval=125, val_steps=20, hellaswag=False, target_val_loss=3.28,
        data=str(dataset_dir("fineweb10B")), log_dir="log_speedrun",
    ),
}

# -----------------------------------------------------------------------------
# Recipes (--recipe): what a recipe sets over a preset's values (and explicit flags over a recipe's). "gpt2" sets
# nothing: the defaults and presets are GPT-2's recipe. "modern" is modded-nanogpt's speedrun: its architecture
# (records 5-9: RoPE, QK-norm, ReLU^2, zero-initialised projections, untied zero-initialised head, RMSNorm also after
# the embedding, logit softcap 30), Muon on the blocks' matrices with a momentum warmup, AdamW elsewhere, a WSD
# schedule. "*" holds its general values, used with every preset that has no entry of its own; a preset's entry
# goes over them.

MODERN_ARCHITECTURE = dict(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", bias=False, split_qkv=True,
                           tie_embeddings=False, zero_init_proj=True, logit_softcap=30.0)
RECIPES = {
    "gpt2": {},
    "modern": {
        # records/track_1_short/2024-11-08_CastBf16 (record 10, the last without U-net skips, whose lrs record 11
        # doubled): Muon 0.02 with momentum 0.85 -> 0.95 over 500 steps, Adam 0.3 on wte, 0.002 on the head, 0.02
        # on vectors, no weight decay, no warmup, a cooldown over its last 926/3242 ~ 0.3, no clipping; AdamW's
        # betas 0.8/0.95 and eps 1e-10 are the later records' (and nanochat's)
        "*": dict(**MODERN_ARCHITECTURE, optimizer="muon", muon_lr=0.02, muon_momentum=0.95, muon_momentum_start=0.85,
                  muon_momentum_warmup=500, muon_weight_decay=0.0, embed_lr=0.3, head_lr=0.002, scalar_lr=0.02,
                  beta1=0.8, beta2=0.95, eps=1e-10, weight_decay=0.0, grad_clip=0.0, schedule="wsd",
                  warmup_steps=0, cooldown_frac=0.3, min_lr_ratio=0.0),
        # the quick start's modern twin, tuned on tiny Shakespeare's validation split (one seed, 594 steps; each
        # value against the one before, bench/bench_recipe.py's worker): Muon 0.01 (val 4.93; 0.02: 5.01, 0.04:
        # 5.11); AdamW 3e-2 on the embedding (the preset's; 0.1: 5.01), 2e-2 on the head (0.01: 5.03); no weight
        # decay (0.1: 5.04); no softcap: at 32 wide the logits stay far from 30 (val 5.0066 without, 5.0081
        # with), while capping the 50304-wide logits cost 25% of each step here. Then reported on text it was
        # not tuned on (README). The preset's 20 warmup steps; the momentum warmup over a sixth of the run
        "shakespeare": dict(muon_lr=0.01, embed_lr=3e-2, head_lr=2e-2, scalar_lr=0.02, warmup_steps=20,
                            muon_momentum_warmup=100, logit_softcap=0.0),
        # record 11 (records/track_1_short/2024-11-10_UNetDoubleLr, the script in its log): Muon 0.04, momentum
        # 0.85 -> 0.95 over 500 steps; Adam (betas 0.9/0.95, torch's eps 1e-8) 0.6 on wte, 0.008 on the head,
        # 0.04 on vectors; weight decay 0; no warmup; the last 900 of 3000 steps cool down to 0; no clipping.
        # Its doubled lrs came with its U-net skips, which our model lacks
        "speedrun": dict(muon_lr=0.04, embed_lr=0.6, head_lr=0.008, scalar_lr=0.04, beta1=0.9, beta2=0.95, eps=1e-8,
                         muon_momentum_warmup=500, warmup_steps=0, cooldown_frac=0.3),
    },
}


def recipe_values(recipe: str, preset: str | None) -> dict:
    """What --recipe sets with this preset: its general values, then the preset's own entry over them."""
    entries = RECIPES[recipe]
    return {**entries.get("*", {}), **entries.get(preset, {})}


def recipe_help() -> str:
    return "Recipes: " + "; ".join(f"{name}{' for ' + preset if preset != '*' else ''}: {values}"
                                   for name, entries in RECIPES.items() if entries
                                   for preset, values in entries.items())


def as_flag(name: str, value) -> str:
    """A field's value as the flag that sets it: --qk-norm, --no-bias, --muon-lr 0.02."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value}"


def recipe_lines(cfg: TrainConfig) -> list[str]:
    """The run's first lines: the recipe, the values it set, and the flags that overrode them (a value that is
    not the recipe's can only come from a flag: flags are the one layer above it)."""
    values = recipe_values(cfg.recipe, cfg.preset)
    if not values:
        return [f"recipe {cfg.recipe}: sets nothing (GPT-2's recipe is the defaults"
                f"{' and the preset ' + cfg.preset if cfg.preset else ''}, under the flags given)"]
    flat = {**dataclasses.asdict(cfg), **dataclasses.asdict(cfg.model)}
    which = f"its values for --preset {cfg.preset}" if cfg.preset in RECIPES[cfg.recipe] else "its general values"
    lines = [f"recipe {cfg.recipe}, {which}: " + " ".join(as_flag(k, v) for k, v in values.items())]
    over = [f"{as_flag(k, flat[k])} (recipe: {v})" for k, v in values.items() if flat[k] != v]
    return lines + ([f"flags over the recipe: {', '.join(over)}"] if over else [])


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_gpt2.py",
        description="Train GPT-2. Subcommands: `train_gpt2.py sample --help`, `train_gpt2.py export --help`, "
                    "`train_gpt2.py plan --help`.",
        epilog="Presets: " + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()) + ". " + recipe_help() + ".")
    # flags not given stay unset, so a preset's (and a recipe's) values apply and explicit flags override them
    add_dataclass_flags(p, TrainConfig, unset_is_absent=True, extra={
        "resume": dict(nargs="?", const="latest", metavar="CHECKPOINT"),
        "preset": dict(choices=sorted(PRESETS)),
        "recipe": dict(choices=sorted(RECIPES)),
        "shard": dict(choices=SHARDS),
        "optimizer": dict(choices=OPTIMIZERS),
        "schedule": dict(choices=SCHEDULES),
        **{name: dict(choices=choices) for name, choices in MODEL_CHOICES.items()},
        **SAMPLE_FLAG_ALIASES,
    })
    return p


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    return train_config(vars(build_train_parser().parse_args(argv)))


MUON_FLAGS = ("muon_lr", "muon_momentum", "muon_momentum_start", "muon_momentum_warmup", "muon_weight_decay",
              "embed_lr", "head_lr", "scalar_lr")  # what only --optimizer muon reads


def train_config(args: dict) -> TrainConfig:
    """The flags given (build_train_parser's namespace) over their recipe's values for the preset, over the
    preset's values, over the defaults. --optimizer muon implies --split-qkv (from scratch): Muon orthogonalises
    q, k and v one by one. A flag that this run would not read is an error."""
    preset = PRESETS.get(args.get("preset"), {})
    recipe = args.get("recipe", preset.get("recipe", "gpt2"))
    values = {**preset, **recipe_values(recipe, args.get("preset")), **args, "recipe": recipe}
    needs = {**{k: ("optimizer", "muon") for k in MUON_FLAGS}, "cooldown_frac": ("schedule", "wsd")}
    for k, (what, value) in needs.items():
        if k in args and values.get(what) != value:
            raise TrainError(f"--{k.replace('_', '-')} applies to --{what} {value}, which this run does not use: "
                             f"drop it, or add --{what} {value}")
    if values.get("optimizer") == "muon" and values.get("init_from", "scratch") == "scratch":
        if args.get("split_qkv") is False:
            raise TrainError("--optimizer muon orthogonalises q, k and v one by one: drop --no-split-qkv")
        values["split_qkv"] = True
    groups = {name: {f.name: values.pop(f.name) for f in dataclasses.fields(cls) if f.name in values}
              for name, cls in (("sample", SampleConfig), ("model", ModelOptions))}
    return TrainConfig(**values, sample=SampleConfig(**groups["sample"]), model=ModelOptions(**groups["model"]))


# -----------------------------------------------------------------------------
# Data: uint16 token shards (fineweb.py's format, and build-nanogpt's) or one .txt file.
# A shard is read as consecutive windows of B*T+1 tokens (inputs and the next-token targets);
# rank r takes window r of every group of world_size windows, so ranks never overlap and all
# of them move to the next shard at the same step.

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def _read_text_file(path: Path) -> tuple[bytes, Path]:
    """A .txt file's bytes, and where its tokens are cached: beside it, under a name holding the text's hash
    (never stale)."""
    if not path.is_file():
        raise TrainError(f"--data {path}: no such file or shard folder (run fineweb.py, or give a .txt file)")
    raw = path.read_bytes()
    return raw, path.with_name(f"{path.name}.{hashlib.sha256(raw).hexdigest()[:16]}.gpt2.npy")


def _prepare_text_file(path: Path) -> Path:
    """Rank 0's part: download tiny Shakespeare if it is missing, tokenize the text into its cache (returned)."""
    if not path.exists() and path.name == "input.txt":
        print(f"{path} not found: downloading tiny Shakespeare from {TINY_SHAKESPEARE_URL}")
        try:
            download(TINY_SHAKESPEARE_URL, path)
        except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are OSErrors
            raise TrainError(f"--data {path}: not found and the download failed ({e}); "
                             f"put tiny Shakespeare there (offline machines: copy it by hand)") from e
    raw, cache = _read_text_file(path)
    if cache.exists():
        return cache
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TrainError(f"--data {path}: not UTF-8 text ({e.reason} at byte {e.start}): convert it, "
                         "or shard it with fineweb.py") from None
    tokens = np.array(get_tokenizer().encode_ordinary(text), dtype=np.uint16)
    with atomic_write(cache) as tmp, open(tmp, "wb") as f:
        np.save(f, tokens)
    return cache


def tokenize_text_file(path: Path, dist: Dist) -> np.ndarray:
    """Tokens of a .txt file: rank 0 downloads (tiny Shakespeare only) and tokenizes once, every rank reads."""
    cache = rank_0_first(lambda: _prepare_text_file(path), dist,
                         TrainError(f"--data {path}: rank 0 could not prepare it (see its error above)"))
    # the others hash the text to find the cache; a node that does not see rank 0's files (no shared file
    # system) fails here, and every rank must hear of it
    return on_every_rank(lambda: np.load(cache or _read_text_file(path)[1]), dist,
                         TrainError(f"--data {path}: another rank could not read its tokens (see its error)"))


def build_command(data_dir: Path) -> str:
    """The command that writes this shard folder (a recipe's dataset), or the general one."""
    if data_dir.name in DATASETS and data_dir.resolve() == dataset_dir(data_dir.name):
        return "python fineweb.py" + ("" if data_dir.name == DATA_DIR.name else f" --preset {data_dir.name}")
    return f"python fineweb.py --out-dir {data_dir} (see its --help for the dataset)"


def find_shards(data_dir: Path, split: str) -> list[Path]:
    if not data_dir.is_dir():
        raise TrainError(f"--data {data_dir}: no such folder: run `{build_command(data_dir)}` to build the shards "
                         "(or pass --data input.txt)")
    shards = sorted(p for p in data_dir.iterdir() if is_shard(p.name, split))
    if not shards:
        raise TrainError(f"--data {data_dir}: no {split} shards (*_{split}_NNNNNN.npy): run "
                         f"`{build_command(data_dir)}`")
    return shards


def open_shard(path: Path) -> np.ndarray:
    """Memory-mapped: resident memory does not grow with the shard's size."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise TrainError(f"shard {path} is corrupt ({e}): delete it and rerun fineweb.py") from e
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise TrainError(f"shard {path} holds {tokens.dtype} of shape {tokens.shape}, expected 1-D uint16")
    return tokens


def shard_tokens(shard) -> np.ndarray:
    """A shard's tokens: a path is opened memory-mapped, an array (a .txt file's split) is itself."""
    return shard if isinstance(shard, np.ndarray) else open_shard(shard)


def check_tokens(name, tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> None:
    """Every token id < vocab_size, read in chunks so a 100M-token shard costs little memory."""
    for i in range(0, len(tokens), chunk):
        top = int(tokens[i:i + chunk].max(initial=0))
        if top >= vocab_size:
            raise TrainError(f"{name} holds token id {top} >= vocab size {vocab_size}: "
                             "wrong tokenizer, or a larger --vocab-size is needed")


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
    """Train and val loaders, every shard checked (format, token range) before step 0."""
    data, B, T = Path(cfg.data), cfg.micro_batch_size, cfg.seq_len
    if data.suffix == ".txt" or data.is_file():
        tokens = tokenize_text_file(data, dist)
        n_val = int(len(tokens) * cfg.val_fraction)
        splits = {"train": [tokens[: len(tokens) - n_val]], "val": [tokens[len(tokens) - n_val:]]}
        names = {k: [f"{data} ({k} split)"] for k in splits}
    else:
        splits = {"train": find_shards(data, "train"), "val": find_shards(data, "val") if need_val else []}
        names = {k: [str(p) for p in v] for k, v in splits.items()}
    # each rank checks its share of the shards; one bad (or unreadable) shard stops every rank
    mine = list(zip(names["train"] + names["val"], splits["train"] + splits["val"]))[dist.rank::dist.world_size]
    on_every_rank(lambda: [check_tokens(name, shard_tokens(shard), vocab_size) for name, shard in mine], dist,
                  TrainError("another rank found a bad shard (see its error above)"))
    kw = dict(rank=dist.rank, world_size=dist.world_size, seed=cfg.seed)
    train_loader = DataLoader(splits["train"], B, T, shuffle=cfg.shuffle, names=names["train"], **kw)
    val_loader = DataLoader(splits["val"], B, T, names=names["val"], **kw) if need_val else None
    return train_loader, val_loader


# -----------------------------------------------------------------------------
# Optimizer and learning-rate schedule


def configure_optimizer(model: nn.Module, weight_decay: float, lr: float, betas: tuple[float, float],
                        eps: float, device_type: str) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings (dim >= 2) only, never on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device_type == "cuda")


# torch.optim.Muon's settings, every one given (its defaults are not Keller Jordan's): the quintic Newton-Schulz
# iteration's coefficients and 5 steps (his muon.py's, which torch's also takes), its epsilon, Nesterov momentum,
# and the update scaled by sqrt(max(1, rows / cols)) ("original": modded-nanogpt's `max(1, g.size(0)/g.size(1))**0.5`)
MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
MUON_NS_STEPS = 5
MUON_EPS = 1e-7
MUON_ADJUST_LR = "original"


def muon_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """--optimizer muon's groups: muon, every 2-D parameter inside the blocks (q, k, v, the projections, the MLP);
    then AdamW's: embed, the other matrices (wte, wpe; with tied embeddings the head too), head (an untied
    lm_head), scalar (every vector: biases, norms' weights). Empty groups are left out."""
    in_blocks = {id(p) for p in model.transformer.h.parameters()}
    groups = {"muon": [], "embed": [], "head": [], "scalar": []}
    for name, p in model.named_parameters():  # tied weights appear once, as transformer.wte.weight
        if not p.requires_grad:
            continue
        kind = ("muon" if id(p) in in_blocks and p.dim() == 2 else "head" if name == "lm_head.weight"
                else "embed" if p.dim() >= 2 else "scalar")
        groups[kind].append(p)
    return {k: v for k, v in groups.items() if v}


def configure_optimizers(model: nn.Module, cfg: TrainConfig, device_type: str):
    """(AdamW, Muon or None): GPT-2's AdamW alone (configure_optimizer), or --optimizer muon's pair. Each group
    carries its name (base_lr reads its lr by it); the lrs and Muon's momentum are set at every step."""
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return configure_optimizer(model, cfg.weight_decay, cfg.max_lr, betas, cfg.eps, device_type), None
    groups = muon_groups(model)
    decay = {"embed": cfg.weight_decay, "head": cfg.weight_decay, "scalar": 0.0}  # as AdamW's: not on vectors
    adamw = torch.optim.AdamW([{"params": ps, "weight_decay": decay[k], "name": k} for k, ps in groups.items()
                               if k != "muon"], lr=cfg.max_lr, betas=betas, eps=cfg.eps, fused=device_type == "cuda")
    muon = torch.optim.Muon([{"params": groups.get("muon", []), "name": "muon"}], lr=cfg.muon_lr,
                            weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum_start, nesterov=True,
                            ns_coefficients=MUON_NS_COEFFICIENTS, eps=MUON_EPS, ns_steps=MUON_NS_STEPS,
                            adjust_lr_fn=MUON_ADJUST_LR)
    return adamw, muon


def optimizer_lines(run: Run) -> list[str]:
    """What trains which parameters, at which peak lr, and the schedule: for the run's first lines."""
    cfg = run.cfg
    count = lambda group: f"{sum(p.numel() for p in group['params']):,}"
    name = lambda group: group.get("name", "decay" if group["weight_decay"] else "no decay")
    groups = ", ".join(f"{name(g)} ({count(g)} parameters, lr {base_lr(cfg, g):g}, weight decay {g['weight_decay']:g})"
                       for g in run.optimizer.param_groups)
    lines = [f"optimizer {cfg.optimizer}: AdamW (betas {cfg.beta1}, {cfg.beta2}, eps {cfg.eps:g}) on {groups}"]
    if run.muon is not None:
        g = run.muon.param_groups[0]
        lines[0] += (f"; Muon on the blocks' {len(g['params'])} matrices ({count(g)} parameters, lr {cfg.muon_lr:g} x "
                     f"sqrt(max(1, rows/cols)), Nesterov momentum {cfg.muon_momentum_start:g} -> {cfg.muon_momentum:g} "
                     f"over {cfg.muon_momentum_warmup} steps, weight decay {cfg.muon_weight_decay:g}, "
                     f"{MUON_NS_STEPS} Newton-Schulz steps)")
    if cfg.schedule == "wsd":
        n = cooldown_steps(cfg.max_steps, cfg.cooldown_frac)
        shape = f"constant, then linear over the last {n:,} steps (--cooldown-frac {cfg.cooldown_frac:g})"
    else:
        shape = "cosine"
    lines.append(f"schedule {cfg.schedule}: warmup {cfg.warmup_steps:,} steps, {shape} to {cfg.min_lr_ratio:g}x the "
                 f"peak lrs at step {cfg.max_steps:,}")
    return lines


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict, keeping this optimizer's implementation (fused / foreach / capturable).

    A state dict carries its param groups' flags, and load_state_dict would take them: a checkpoint
    written on a CPU would silently turn off fused AdamW for the rest of a GPU run.
    """
    keep = ("fused", "foreach", "capturable")
    groups = [{**saved, **{k: now[k] for k in keep if k in now}}
              for saved, now in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})


def get_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to max_lr, then cosine decay to min_lr at max_steps, then min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step > max_steps:
        return min_lr
    decay_ratio = (step - warmup_steps) / (max_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


def cooldown_steps(max_steps: int, cooldown_frac: float) -> int:
    """--cooldown-frac of the steps, at least one."""
    return max(1, round(cooldown_frac * max_steps))


def get_wsd_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int, cooldown: int) -> float:
    """Warmup-stable-decay (trapezoidal): linear warmup to max_lr, constant, then over the last `cooldown` steps
    linearly down to min_lr, reached at max_steps (the last step trains at 1/cooldown of the way above it), then
    min_lr. As modded-nanogpt's: with min_lr 0 its record 11 (3000 steps, 900 of cooldown) has 1.0 at step 2100
    and 1/900 at step 2999."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    decay_ratio = min(1.0, (max_steps - step) / cooldown)  # 1 until the cooldown, then -> 0
    return min_lr + decay_ratio * (max_lr - min_lr)


def muon_momentum(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Muon's momentum, linear from start to end over the first warmup_steps steps (modded-nanogpt's warmup)."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


def base_lr(cfg: TrainConfig, group: dict) -> float:
    """A param group's peak lr, which the schedule scales: --max-lr for every AdamW group (GPT-2's recipe); under
    muon, each group's own flag (its default --max-lr), Muon's --muon-lr. Read from the flags at every step, so
    that a resumed run takes the lrs it was given."""
    if cfg.optimizer == "adamw":
        return cfg.max_lr
    own = {"muon": cfg.muon_lr, "embed": cfg.embed_lr, "head": cfg.head_lr, "scalar": cfg.scalar_lr}[group["name"]]
    return cfg.max_lr if own is None else own


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
    momentum = muon_momentum(step, cfg.muon_momentum_start, cfg.muon_momentum, cfg.muon_momentum_warmup)
    run.muon.param_groups[0]["momentum"] = momentum
    return run.muon.param_groups[0]["lr"], momentum


# -----------------------------------------------------------------------------
# Sharding (--shard fsdp): FSDP2 splits every parameter, its gradient and its AdamW state over the ranks.
# Each block is one unit: its weights are all-gathered just before its forward (and again for its backward)
# and freed after, its gradients reduce-scattered as soon as they are complete. The root unit holds the
# embeddings, the tied lm_head and ln_f. Checkpoints stay whole (gathered to rank 0), in the same format as
# under DDP, so a run can change from one to the other on resume.


def shard_model(model: GPT, dist: Dist, use_compile: bool) -> None:
    """fully_shard each block, then the root (in place). Master weights and gradient reduction are fp32; the
    weights are gathered in fp32 too, and autocast casts them for the matmuls exactly as under DDP: the same
    numerics (bf16 matmuls, fp32 residual stream and LayerNorms). Gathering in bf16 (param_dtype) would halve
    the traffic, but would also round the LayerNorm weights and cast every block's input, putting the
    residual stream in bf16.

    With compile, each block's forward is compiled before it is sharded: FSDP's hooks then run around the
    compiled code (a whole-model compile would break its graph at every hook and fall back to eager)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(dist.device_type, (dist.world_size,))
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for block in model.transformer.h:
        if use_compile:
            block.forward = torch.compile(block.forward)  # names and state dict unchanged
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # the root's weights are needed again at once by the backward pass: kept gathered after the forward
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (DTensor) gathered whole on every rank, which must all call this, in the same order."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def whole_state(state: dict, keep: bool, errors: list) -> dict:
    """A state dict (the model's, or the optimizer's nested one) with every tensor gathered whole, one at a
    time: on the CPU where keep (rank 0, for the checkpoint), dropped at once elsewhere (None). A copy that
    fails (host memory) goes to errors and the gathers go on, so that no other rank waits in one forever."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            v = whole_state(v, keep, errors)
        elif isinstance(v, torch.Tensor):
            v = whole(v)  # every rank takes part in every gather
            try:
                v = v.cpu() if keep and not errors else None
            except (RuntimeError, MemoryError) as e:
                errors.append(e)
                v = None
        out[k] = v
    return out


def this_ranks_shard(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor (a checkpoint's) cut as `like` is sharded: a DTensor holding this rank's piece, cut from
    the rank's own copy (no communication). Other tensors (`like` not sharded) come back as they are."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return t
    return distribute_tensor(t.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A whole optimizer state (a checkpoint's) cut into this rank's shards of the sharded parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's numbering
    shard = lambda v, p: this_ranks_shard(v, p) if v.shape == p.shape else v  # the moments, not the step count
    return {**state, "state": {i: {k: shard(v, params[i]) for k, v in s.items()} for i, s in state["state"].items()}}


def load_weights(model: nn.Module, weights: dict) -> None:
    """Whole weights (a checkpoint's) copied into the model's parameters in place, so that the optimizer and the
    DDP / compiled wrappers keep holding them; under fsdp each rank copies in its own shard."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for name, p in model.state_dict(keep_vars=True).items():  # the tied matrix twice: harmless
            w = this_ranks_shard(weights[name], p)
            if isinstance(p, DTensor):
                p, w = p.to_local(), w.to_local()
            p.copy_(w)


@contextmanager
def gathered(model: nn.Module):
    """Under FSDP, every weight gathered on every rank for the duration, and no collective in the forward
    passes: each rank may then run forwards of its own (HellaSwag's uneven shares, sampling), where a sharded
    forward would wait for the other ranks' all-gathers. Costs one whole fp32 copy of the weights while it
    lasts. Nothing to do under DDP."""
    if not is_sharded(model):
        yield
        return
    units = [m for m in model.modules() if is_sharded(m)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # as shard_model set them


# -----------------------------------------------------------------------------
# Metrics: the one place a number goes to the console, log.txt, the history train() returns, and the
# trackers (Weights & Biases, TensorBoard) when asked for. log.txt lines are `{step} {name} {value}`,
# the reference's format, which play.ipynb reads.


def duration(seconds: float) -> str:
    seconds = round(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class WandbTracker:
    """Weights & Biases: one run per --log-dir, continued by --resume (its id is kept in the folder), plotted
    against our step. Offline (WANDB_MODE=offline) it writes the run under LOG_DIR/wandb/ for `wandb sync`."""

    def __init__(self, cfg: TrainConfig, start_step: int):
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # wandb's crash telemetry calls home, even offline
        try:
            import wandb
        except ImportError:
            raise TrainError("--wandb needs the wandb package: pip install wandb") from None
        id_file = Path(cfg.log_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if start_step > 0 and id_file.is_file() else None  # None: a new run
        try:
            self.run = wandb.init(project=cfg.wandb, id=run_id, resume="allow" if run_id else None, dir=cfg.log_dir,
                                  config=dataclasses.asdict(cfg), settings=wandb.Settings(console="off"))
        except Exception as e:  # no account, no network, ...
            raise TrainError(f"--wandb {cfg.wandb}: no run started ({one_line(e)}); "
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

    def __init__(self, cfg: TrainConfig, dist: Dist, start_step: int):
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
            if cfg.tensorboard:
                self.trackers.append(TensorBoardTracker(cfg.log_dir, start_step))
            if cfg.wandb:
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


# dense bf16 tensor-core peaks per GPU from NVIDIA's data sheets, the most specific name first
# (the first substring of torch.cuda.get_device_name that matches wins); TF32 is half of these
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                   "GH200": 989e12, "A100": 312e12,
                   "V100": 125e12, "T4": 65e12}  # fp16: these have no bf16


def peak_for_name(name: str, bf16: bool = True) -> float | None:
    """Peak matmul FLOP/s of a GPU by its name: bf16 (fp16) tensor cores, or TF32 for fp32 matmuls (half of
    that; None before Ampere, which has no TF32). None when unknown."""
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if peak is None or bf16:
        return peak
    return None if any(old in name for old in ("V100", "T4")) else peak / 2


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
    is a lookup, not a matmul: left out of N (the head's matrix stays). A learned wpe, a lookup too, stays in N
    as it always was (0.6% of GPT-2 124M's), so that GPT-2's MFU keeps its meaning."""
    lookup = 0 if config.tie_embeddings else config.vocab_size * config.n_embd
    return 6 * (config.num_parameters() - lookup) + 6 * config.n_layer * config.n_embd * T


# -----------------------------------------------------------------------------
# The run: one plain record of everything the loop works with, made by setup()


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
    train_time: float = 0.0  # seconds in training steps since step 0, across resumes (--target-val-loss reports it)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer] + ([self.muon] if self.muon is not None else [])

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.dist.device_type, dtype=self.autocast_dtype)


# -----------------------------------------------------------------------------
# Fault injection, for tests/test_faults.py only: the environment variable GPT2_FAULTS (never a flag) lists
# faults as KIND@STEP:RANK:ATTEMPT, comma-separated, where `*` or a field left out matches any, ATTEMPT is
# torchrun's TORCHELASTIC_RESTART_COUNT; STEP `start` is before the process group, `evalN` before step N's
# evaluation. Unset, nothing happens.
#   kill: the rank SIGKILLs itself as the step begins     stop: it SIGSTOPs itself there (a hung rank)
#   nan: the step's loss is multiplied by NaN             late: the rank sleeps 3 s first
#   kill-in-save / enospc: rank 0 writes half of the step's checkpoint, then SIGKILLs itself / fails with ENOSPC
# Each fires once per process; a relaunch (torchrun's restart) reads the variable afresh.

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


def inject_faults(step, rank: int) -> None:
    if fault("kill", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
    if fault("stop", step, rank):
        os.kill(os.getpid(), signal.SIGSTOP)
    if fault("late", step, rank):
        time.sleep(3)


def checkpoint_writer(step: int):
    """torch.save; under kill-in-save or enospc one that leaves half the file on disk, then dies or fails."""
    kind = next((k for k in ("kill-in-save", "enospc") if fault(k, step, 0)), None)
    if kind is None:
        return torch.save

    def half_then_fail(obj, tmp):
        torch.save(obj, tmp)
        os.truncate(tmp, os.path.getsize(tmp) // 2)
        if kind == "kill-in-save":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, f"No space left on device (injected): {tmp}")
    return half_then_fail


# -----------------------------------------------------------------------------
# Checkpoints: the run's state, saved and restored side by side. A checkpoint is gpt2.model_entries (the
# model's weights and shape) plus what continues the run exactly: optimizer, step, data position, every
# rank's RNG, the arguments. Rank 0 writes it as model_{step:05d}.pt in --log-dir, through a temporary file
# renamed into place once all of it is on disk; every byte is verified before it is used (gpt2.load_checkpoint).

RUN_STATE = ("optimizer", "step", "val_loss", "loader", "rng", "args", "world_size")  # beside model_entries'
NO_PROGRESS_EXIT = 140  # a crash loop under torchrun ends the job with this status (128 + SIGUSR2 on Linux)
ATTEMPTS_FILE = "restarts.txt"  # in --log-dir: each torchrun attempt's run id, restart count and first step


def first_step(ckpt: dict | None) -> int:
    """The step a run starts with: after its checkpoint's, or 0 for a fresh run."""
    return ckpt["step"] + 1 if ckpt is not None else 0


class NoProgress(TrainError):
    """A torchrun restart that would start where the attempt before it started: that one wrote no checkpoint."""


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


@contextmanager
def patient_collectives(cfg: TrainConfig):
    """While rank 0 writes a checkpoint or every rank reads one (a big file, a slow disk), collectives wait up to
    the set-up's timeout, not --dist-timeout; after it, --dist-timeout again."""
    set_collective_timeout(PROCESS_GROUP_TIMEOUT_MINUTES * 60)
    try:
        yield
    finally:
        set_collective_timeout(cfg.dist_timeout)


def save_run(run: Run, step: int) -> Path | None:
    """Every rank calls this (it gathers the ranks' RNG states, and under fsdp the weights and AdamW state);
    rank 0 writes the checkpoint and returns its path. If the write fails (a full disk), every rank stops.
    Meanwhile the others wait for rank 0 under patient_collectives."""
    with patient_collectives(run.cfg):  # every collective here may wait for rank 0's disk
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
                         "args": dataclasses.asdict(run.cfg), "world_size": run.dist.world_size,
                         "muon": run.muon.state_dict() if run.muon is not None else None, "train_time": run.train_time,
                         "scaler": run.scaler.state_dict() if run.scaler is not None else None,
                         "spike_guard": run.spike_guard.state_dict() if run.spike_guard is not None else None}

        def write():
            if errors:  # rank 0 could not hold the gathered state: every rank stops, here, together
                raise TrainError(f"rank 0 could not gather the checkpoint {path} in host memory: {one_line(errors[0])}")
            try:
                save_checkpoint(path, state(), write=checkpoint_writer(step))
            except OSError as e:  # a full disk: the temporary file is gone, the checkpoints before it untouched
                fix = "free some space (or pass --keep-last N)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix it"
                raise TrainError(f"could not write {path} ({one_line(e)}): {fix}, then continue with --resume") from e
            if run.cfg.keep_last:
                prune_checkpoints(path, run.cfg.keep_last)
        rank_0_first(write, run.dist, TrainError(f"rank 0 could not write {path} (see its error)"))
    if run.spike_guard is not None:  # every rank knows where a rewind goes
        run.spike_guard.checkpoint = path
    return path if run.dist.master else None


def restore_run(run: Run, ckpt: dict, weights: bool = False) -> None:
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


def open_resume(cfg: TrainConfig, dist: Dist) -> tuple[dict | None, Path | None]:
    """The checkpoint --resume names (None for a fresh run), whole and checked against this run before anything
    is built. Rank 0 first deletes the temporary files a killed writer left in --log-dir (kill -9 mid-save)."""
    if dist.master and Path(cfg.log_dir).is_dir():  # a log dir is one run's: no other process writes there now
        remove_stale_temp_files(cfg.log_dir)  # (under torchrun, it stopped every earlier attempt's workers first)
    ckpt, path = find_resume(cfg)
    if ckpt is not None:
        check_resumable(cfg, ckpt, path, dist.world_size)
    check_progress(cfg, first_step(ckpt), path)
    return ckpt, path


def find_resume(cfg: TrainConfig) -> tuple[dict | None, Path | None]:
    log_dir = Path(cfg.log_dir)
    if cfg.resume == "auto" and latest_checkpoint(log_dir) is None:
        return None, None  # the first launch of a job that will relaunch itself with the same command line
    if not cfg.resume:
        if latest_checkpoint(log_dir) is not None:
            raise TrainError(f"--log-dir {log_dir} holds checkpoints of an earlier run: add --resume to continue "
                             "it, or use another --log-dir")
        return None, None
    if cfg.resume in ("latest", "auto"):
        ckpt, path = newest_whole_checkpoint(log_dir)
    else:
        path = Path(cfg.resume)
        if not path.is_file():
            raise TrainError(f"--resume {path}: no such checkpoint")
        try:
            ckpt = load_checkpoint(path)
        except CheckpointDamaged as e:
            raise TrainError(f"--resume: {e}: resume from another one (--resume alone takes the newest whole "
                             "checkpoint)") from None
    return ckpt, path


def check_resumable(cfg: TrainConfig, ckpt: dict, path: Path, world_size: int) -> None:
    """A checkpoint this run can continue: a run's state, the same optimizer and model, the same number of ranks."""
    if any(k not in ckpt for k in RUN_STATE):
        raise TrainError(f"--resume {path}: a model without a run's state: start from it with --init-from {path}")
    if ckpt["args"].get("optimizer", "adamw") != cfg.optimizer:  # before the architecture options: muon sets one
        raise TrainError(f"--resume: the checkpoint's run had --optimizer {ckpt['args'].get('optimizer', 'adamw')}, "
                         f"this run {cfg.optimizer}: pass the flags (or --recipe) of the run that wrote it")
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


def check_progress(cfg: TrainConfig, start_step: int, path: Path | None) -> None:
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


def record_attempt(cfg: TrainConfig, dist: Dist, start_step: int) -> None:
    """Under torchrun --max-restarts, rank 0 appends where this attempt starts to restarts.txt (never truncated,
    unlike log.txt) once every rank has read it: before the model and the data, so that an attempt failing in
    their set-up counts too."""
    job, restart, max_restarts = torchrun_attempt()
    if dist.master and max_restarts > 0:
        Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(cfg.log_dir) / ATTEMPTS_FILE, "a") as f:
            f.write(f"{job} {restart} {start_step}\n")


# -----------------------------------------------------------------------------
# Set-up: every check before step 0, then the run. What each rank reads for itself (the checkpoint, the
# model, HellaSwag, rank 0's log and trackers) goes through on_every_rank: a failure on one stops them all.


def check_batch(cfg: TrainConfig, world_size: int) -> int:
    """The checks that need no file; returns the gradient accumulation steps."""
    B, T = cfg.micro_batch_size, cfg.seq_len
    if cfg.total_batch_size % (B * T * world_size):
        raise TrainError(f"--total-batch-size {cfg.total_batch_size} is not divisible by micro-batch {B} x "
                         f"seq-len {T} x {world_size} ranks = {B * T * world_size}: change one of them")
    if cfg.loss_chunk < 0:
        raise TrainError(f"--loss-chunk {cfg.loss_chunk}: give a number of tokens, or 0 for one matmul")
    if cfg.reduce_every_micro_step and cfg.shard != "fsdp":
        raise TrainError("--reduce-every-micro-step keeps fsdp's gradients sharded: it needs --shard fsdp")
    if cfg.shard == "fsdp" and world_size == 1:
        raise TrainError("--shard fsdp splits the model over ranks: launch with torchrun --nproc_per_node N "
                         "(N >= 2), or use --shard ddp in one process")
    return cfg.total_batch_size // (B * T * world_size)


def check_checkpointing(cfg: TrainConfig) -> None:
    """--keep-last, --checkpoint-minutes and --dist-timeout."""
    if cfg.keep_last and cfg.keep_last < 2:
        raise TrainError(f"--keep-last {cfg.keep_last}: keep 2 or more (the newest can be damaged; 0 keeps all)")
    if cfg.checkpoint_minutes < 0:
        raise TrainError(f"--checkpoint-minutes {cfg.checkpoint_minutes}: give minutes > 0, or 0 for none")
    if not cfg.dist_timeout > 0:
        raise TrainError(f"--dist-timeout {cfg.dist_timeout}: give seconds > 0, longer than any step, evaluation or "
                         "checkpoint takes")


def check_spike_guard(cfg: TrainConfig) -> None:
    """--spike-guard's flags (checked only when it is on: they mean nothing otherwise)."""
    if not cfg.spike_guard:
        return
    if cfg.checkpoint_interval <= 0:
        raise TrainError("--spike-guard rewinds to the newest checkpoint: give a --checkpoint-interval N > 0 "
                         "(the steps a rewind redoes, at most N)")
    if not cfg.spike_threshold > 0:
        raise TrainError(f"--spike-threshold {cfg.spike_threshold}: give a number of deviations > 0 (e.g. 8)")
    if cfg.spike_window < 3:
        raise TrainError(f"--spike-window {cfg.spike_window}: the median and its deviation need 3 losses or more")
    if cfg.max_rewinds < 0:
        raise TrainError(f"--max-rewinds {cfg.max_rewinds}: give 0 (stop at the first spike) or more")


def check_recipe(cfg: TrainConfig) -> None:
    """The architecture options, the optimizer, the schedule and --target-val-loss."""
    plain = ModelOptions()
    changed = [as_flag(k, v) for k, v in dataclasses.asdict(cfg.model).items() if v != getattr(plain, k)]
    if cfg.init_from != "scratch" and changed:
        by = f" (--recipe {cfg.recipe} sets them)" if recipe_values(cfg.recipe, cfg.preset) else ""
        raise TrainError(f"--init-from {cfg.init_from}: the architecture comes from its weights, so {' '.join(changed)}"
                         f"{by} cannot apply: drop them, or train from scratch")
    if cfg.optimizer not in OPTIMIZERS or cfg.schedule not in SCHEDULES:
        raise TrainError(f"--optimizer {cfg.optimizer} --schedule {cfg.schedule}: use one of {', '.join(OPTIMIZERS)}, "
                         f"and one of {', '.join(SCHEDULES)}")
    if cfg.optimizer == "muon" and cfg.shard == "fsdp":
        raise TrainError("--optimizer muon with --shard fsdp: torch.optim.Muon cannot step sharded (DTensor) "
                         "parameters, and each matrix must be orthogonalised whole: use --shard ddp")
    if cfg.optimizer == "muon" and cfg.init_from == "scratch" and not cfg.model.split_qkv:
        raise TrainError("--optimizer muon orthogonalises q, k and v one by one: it needs --split-qkv")
    momenta = (cfg.muon_momentum_start, cfg.muon_momentum)
    lrs = [v for v in (cfg.muon_lr, cfg.embed_lr, cfg.head_lr, cfg.scalar_lr) if v is not None]
    if not all(0 <= m < 1 for m in momenta) or cfg.muon_momentum_warmup < 0 or min(lrs) < 0:
        raise TrainError("--muon-momentum and --muon-momentum-start take a momentum in [0, 1), --muon-momentum-warmup "
                         "a number of steps >= 0, the lrs numbers >= 0")
    if cfg.schedule == "wsd" and not 0 < cfg.cooldown_frac <= 1:
        raise TrainError(f"--cooldown-frac {cfg.cooldown_frac}: give the fraction of steps that cool down, in (0, 1]")
    if cfg.target_val_loss < 0 or (cfg.target_val_loss > 0 and cfg.eval_interval <= 0):
        raise TrainError(f"--target-val-loss {cfg.target_val_loss}: give a loss > 0 (0: none), with an "
                         "--eval-interval > 0 to measure it")


def build_model(cfg: TrainConfig, ckpt: dict | None) -> GPT:
    if ckpt is not None:
        model = model_from_checkpoint(ckpt)
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
    raw_model.activation_checkpointing = cfg.activation_checkpointing
    use_compile = cfg.compile if cfg.compile is not None else dist.device_type == "cuda"
    if cfg.shard == "fsdp":  # cut on the CPU: only this rank's shards go to the device; blocks compiled inside
        shard_model(raw_model, dist, use_compile)
        return raw_model, raw_model, use_compile
    raw_model.to(dist.device)
    compiled = torch.compile(raw_model) if use_compile else raw_model
    if dist.world_size == 1:
        return compiled, compiled, use_compile
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [torch.device(dist.device).index] if dist.device_type == "cuda" else None
    # no buffer broadcast before every forward: the only buffers are RoPE's cos/sin tables, the same on every rank
    return compiled, DDP(compiled, device_ids=device_ids, broadcast_buffers=False), use_compile


def loss_scaler(autocast_dtype: torch.dtype | None, cfg: TrainConfig, dist: Dist) -> torch.amp.GradScaler | None:
    """float16's gradient scaler: the loss is multiplied by a large power of two before backward, so that small
    gradients do not underflow fp16; a step whose gradients overflow is skipped and the scale halved."""
    if autocast_dtype != torch.float16:
        return None
    if cfg.shard == "fsdp":  # each rank sees a shard of the gradients: an overflow anywhere skips on every rank
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(dist.device_type)
    return torch.amp.GradScaler(dist.device_type)


def setup(cfg: TrainConfig, dist: Dist) -> Run:
    """Check everything, build everything, resume if asked: the run, ready for its first step."""
    torch.manual_seed(cfg.seed)
    grad_accum = check_batch(cfg, dist.world_size)
    check_spike_guard(cfg)
    check_checkpointing(cfg)
    check_recipe(cfg)
    autocast_dtype = setup_precision(cfg.dtype, dist.device_type)
    others = lambda what: TrainError(f"another rank could not {what} (see its error)")
    ckpt, ckpt_path = on_every_rank(lambda: open_resume(cfg, dist), dist, others("read the checkpoint"))
    on_every_rank(lambda: record_attempt(cfg, dist, first_step(ckpt)), dist, others("write its restarts.txt"))
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
    run.spike_guard = SpikeGuard(cfg.spike_threshold, cfg.spike_window, ckpt_path) if cfg.spike_guard else None
    if ckpt is not None:
        restore_run(run, ckpt)
        del ckpt  # every rank holds it in host memory: model + Adam state, 1.5 GB at 124M, 18 GB for gpt2-xl
    run.metrics = on_every_rank(lambda: Metrics(cfg, dist, run.start_step), dist, others("open its log"))
    _, restart, max_restarts = torchrun_attempt()
    if max_restarts > 0:  # where each attempt starts (also in restarts.txt)
        run.metrics.log(run.start_step, restart=restart)
    if ckpt_path is not None:
        run.metrics.print(f"resuming from {ckpt_path} at step {run.start_step}")
    run.metrics.print(f"{raw_model.num_parameters():,} parameters | {dist.world_size} rank(s) on {dist.device} | "
                      f"{cfg.shard} | grad accumulation {grad_accum} | {cfg.total_batch_size:,} tokens/step | compile "
                      f"{use_compile} | autocast {autocast_dtype or 'off'}{' with loss scaling' if run.scaler else ''}"
                      f"{' | activation checkpointing' if cfg.activation_checkpointing else ''}")
    for line in recipe_lines(cfg) + optimizer_lines(run):
        run.metrics.print(line)
    if cfg.dtype == "auto" and autocast_dtype == torch.float16:
        run.metrics.print("--dtype auto: this GPU has no bfloat16, so float16 autocast with loss scaling")
    return run


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
            _, loss = run.compiled(to_device(x, device), to_device(y, device), loss_chunk=run.cfg.loss_chunk)
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
        with gathered(run.raw_model):  # under fsdp: each rank's forwards are its own, no collective inside
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


def grad_sync(run: Run, sync: bool):
    """Gradient accumulation: the ranks reduce gradients on the last micro-step only (sync); before it each
    rank adds them up locally: DDP's no_sync(), FSDP's requires_gradient_sync (whole gradients meanwhile).
    --reduce-every-micro-step (fsdp): reduce-scatter after every micro-step and add up the shards instead."""
    if is_sharded(run.raw_model):
        run.raw_model.set_requires_gradient_sync(sync or run.cfg.reduce_every_micro_step)
        return nullcontext()
    return nullcontext() if sync or run.dist.world_size == 1 else run.model.no_sync()


def backward(run: Run, stop: StopSignal, poison: bool = False) -> torch.Tensor:
    """Forward and backward over grad_accum micro-batches; the gradients and, on the device, [the mean loss,
    the stop request, the checkpoint request, the gradient norm] (clipped after, and unscaled first under
    float16). poison: the loss times NaN (fault injection)."""
    cfg, device = run.cfg, run.dist.device
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(run.grad_accum):
        x, y = (to_device(t, device) for t in run.train_loader.next_batch())
        with grad_sync(run, sync=micro_step == run.grad_accum - 1):
            with run.autocast():
                loss = run.model(x, y, loss_chunk=cfg.loss_chunk)[1]  # the (B, T, vocab) logits are not kept
            loss = loss / run.grad_accum  # the mean over the whole batch, not a sum of means
            if poison:
                loss = loss * math.nan
            loss_accum += loss.detach()
            (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
    if run.scaler is not None:
        for optimizer in run.optimizers:
            run.scaler.unscale_(optimizer)  # the true gradients, for the norm and its clipping
    norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    norm = whole(norm)  # under fsdp, the norm over every rank's shard
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
    stats = backward(run, stop, poison=fault("nan", step, dist.rank))
    lr, momentum = set_schedule(run, step)
    # the loss and the requests summed over ranks: every rank logs the same loss, checkpoints and stops alike
    all_reduce_sum(stats[:3])
    optimizer_step(run, stats[3])
    loss_sum, stops, due, norm = stats.tolist()  # the step's one sync: queued after the update, it waits for it
    dt = time.perf_counter() - t0
    run.train_time += dt
    loss, diverged = loss_sum / dist.world_size, None
    # float16: gradients that overflow were not applied (the scaler skipped the step); anything else non-finite
    # means the weights are lost: the run stops before any checkpoint holds them, or --spike-guard rewinds
    skipped = run.scaler.get_scale() if run.scaler is not None and not math.isfinite(norm) else None
    if not (math.isfinite(loss) and (math.isfinite(norm) or (skipped or 0) >= 1)):  # < 1: fp16 overflows unscaled
        diverged = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
        if run.spike_guard is None:
            raise TrainingDiverged(f"{diverged} at step {step}: stopping; the last checkpoint "
                                   f"({latest_checkpoint(cfg.log_dir) or 'none'}) is untouched")
    tokens_per_sec = cfg.total_batch_size / dt
    mfu = tokens_per_sec * run.flops_per_token / run.peak_flops / dist.world_size if run.peak_flops else None
    return {"loss": loss, "lr": lr, "norm": norm, "dt": dt, "tokens_per_sec": tokens_per_sec, "mfu": mfu,
            "stop": stops > 0, "checkpoint": due > 0, "diverged": diverged, "skipped": skipped, "momentum": momentum}


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


def rewind(run: Run, step: int, loss: float, why: str) -> int:
    """Undo the steps since the newest checkpoint c, the spiked `step` the last of them: every rank loads c
    (weights, optimizer, loss scale, RNG, the guard's losses), then moves the data to where it was after `step`.
    Returns the step to go on from, c + 1. The ranks decide alike: they all see the same all-reduced loss."""
    cfg, guard, metrics = run.cfg, run.spike_guard, run.metrics
    metrics.log(step, spike=loss, note=why)
    path = guard.checkpoint
    if path is None:
        raise TrainingDiverged(f"loss {loss:.4f} at step {step} is a spike, {why}, and there is no checkpoint to "
                               "rewind to yet: stopping (a smaller --checkpoint-interval writes the first one sooner)")
    if guard.rewinds >= cfg.max_rewinds:
        raise TrainingDiverged(f"loss {loss:.4f} at step {step} is a spike after {guard.rewinds} rewind(s) "
                               f"(--max-rewinds {cfg.max_rewinds}): stopping; its last checkpoint {path} is untouched")
    data_after, rewinds = run.train_loader.state_dict(), guard.rewinds + 1
    with patient_collectives(cfg):  # every rank reads all of it
        ckpt = on_every_rank(lambda: load_checkpoint(path), run.dist,
                             TrainError(f"another rank could not read {path} to rewind to (see its error)"))
    restore_run(run, ckpt, weights=True)
    del ckpt
    run.train_loader.load_state_dict(data_after)  # the batches of steps c+1..step: skipped
    guard.rewinds = rewinds
    c = run.start_step - 1
    metrics.print(f"rewind {rewinds} of at most {cfg.max_rewinds}: back to {path} (step {c}), the batches of steps "
                  f"{c + 1}..{step} skipped ({(step - c) * run.grad_accum} micro-batches per rank)")
    return run.start_step


# -----------------------------------------------------------------------------
# The training loop


def reached_target(run: Run, step: int, checkpoints: list[str]) -> bool:
    """--target-val-loss: whether the evaluation at `step` (of the weights after steps 0..step-1) reached it. If so,
    logs the speedrun's metric, the tokens trained (step x tokens per step) and the training time (Run.train_time:
    the training steps' own time, compilation in the first ones included; evaluations, checkpoints and set-up not;
    carried over resumes), and checkpoints those weights, as step - 1. Every rank decides alike (the val loss is
    all-reduced), and every rank takes part in the checkpoint."""
    cfg, metrics = run.cfg, run.metrics
    if not cfg.target_val_loss or run.val_loss > cfg.target_val_loss:
        return False
    tokens = step * cfg.total_batch_size
    metrics.log(step, target_tokens=tokens, target_time=run.train_time)
    path = save_run(run, step - 1) if step > 0 else None
    if path is not None and str(path) not in checkpoints:
        checkpoints.append(str(path))
    saved = f"saved {path}" if path else "nothing trained yet"
    metrics.print(f"--target-val-loss {cfg.target_val_loss} reached: val loss {run.val_loss:.4f} after {step:,} "
                  f"steps, {tokens:,} tokens, {duration(run.train_time)} of training steps; stopped ({saved}; to go "
                  "on: --resume --target-val-loss 0)")
    return True


def loop(run: Run, on_step=None) -> dict:
    cfg, metrics, guard = run.cfg, run.metrics, run.spike_guard
    checkpoints, step, done = [], run.start_step, run.start_step - 1
    with StopSignal(cfg.checkpoint_minutes) as stop:
        while step < cfg.max_steps:
            last_step = step == cfg.max_steps - 1
            if cfg.eval_interval > 0 and (step % cfg.eval_interval == 0 or last_step):
                inject_faults(f"eval{step}", run.dist.rank)  # tests only (GPT2_FAULTS)
                evaluate(run, step)
                if reached_target(run, step, checkpoints):
                    break

            inject_faults(step, run.dist.rank)  # tests only (GPT2_FAULTS)
            stats = train_step(run, step, stop)
            if step == run.start_step:  # compiled and running: from here a rank that hangs ends the job
                set_collective_timeout(cfg.dist_timeout)
            why = guard.check(stats["loss"], stats["diverged"]) if guard is not None else None
            if why is not None:  # before the step's checkpoint: a spiked step is never saved
                step = rewind(run, step, stats["loss"], why)
                continue
            metrics.log(step, train=stats["loss"], **{k: stats[k] for k in ("lr", "momentum", "norm", "dt",
                                                                            "tokens_per_sec", "mfu", "skipped")})

            stopping = stats["stop"] or step == cfg.stop_after_step
            periodic = cfg.checkpoint_interval > 0 and step > 0 and step % cfg.checkpoint_interval == 0
            if last_step or periodic or stopping or stats["checkpoint"]:  # the last: --checkpoint-minutes
                path, stop.last_checkpoint = save_run(run, step), time.monotonic()
                if path is not None:
                    checkpoints.append(str(path))
                    metrics.print(f"saved {path}")
            if on_step is not None:  # after the checkpoint: a callback may inspect (or break) the model
                on_step(step, {**stats, "model": run.raw_model})
            done = step
            if stopping:
                metrics.print(f"stopped after step {step}; continue with --resume")
                break
            step += 1
    return {**metrics.history, "checkpoints": checkpoints, "step": done, "val_loss": run.val_loss}


def train(cfg: TrainConfig, on_step=None) -> dict:
    """Run training; returns the history: every metric by step, the checkpoints written, the last step.
    on_step(step, stats) is called after every optimizer step (tests, notebooks, the benchmark): stats
    holds loss, lr, norm, dt (seconds), tokens_per_sec, mfu (None off a known GPU), stop, model."""
    inject_faults("start", int(os.environ.get("RANK", "0")))  # tests only (GPT2_FAULTS)
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
# Planning (`train_gpt2.py plan`): before renting GPUs, what one GPU holds for a configuration, the largest
# micro-batch that fits, and what the run costs. Arithmetic on the model's shape; the activations' count is
# checked against what autograd actually saves (tests/test_plan.py), the rest follows from the dtypes.

GIB = 2**30
GPU_MEMORY_GIB = {"H200": 141, "H100-80GB": 80, "A100-80GB": 80, "A100-40GB": 40, "L40S": 48, "A10": 24, "L4": 24,
                  "RTX-4090": 24, "RTX-3090": 24, "V100-32GB": 32, "V100-16GB": 16, "T4": 16}  # as sold
CUDA_ALLOWANCE_GIB = 1.5  # the CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation (an assumption)


@dataclass
class PlanConfig:
    gpus: int = 8  # GPUs the run uses, all nodes together
    gpu: str = "H100-80GB"  # the GPU: its memory and, where known, its peak FLOP/s (names listed below)
    gpu_memory: float | None = None  # GiB per GPU, instead of --gpu's
    tokens_per_sec: float | None = None  # the run's measured speed, all GPUs together (a short run's tok/sec)
    mfu: float = 0.4  # without --tokens-per-sec: the model FLOPs utilization assumed for the time and cost
    price: float = 2.5  # price of one GPU-hour, in dollars (an assumption: pass your provider's)


def block_activation_bytes(c: GPTConfig, dtype_bytes: int) -> int:
    """What autograd keeps of one block for the backward pass, per token: the two LayerNorms' fp32 inputs
    (the residual stream, 2 x 4C bytes), 14C values in the autocast dtype (LayerNorm outputs, q/k/v, attention
    output, the MLP's 4C-wide input and GELU output), and LayerNorm/attention statistics ((4 + n_head) fp32)."""
    return 8 * c.n_embd + 14 * c.n_embd * dtype_bytes + 4 * (4 + c.n_head)


def saved_activation_bytes(c: GPTConfig, tokens: int, dtype_bytes: int, checkpointing: bool) -> int:
    """What autograd keeps for the backward pass at the end of the forward, but the logits: each block's
    activations, or with checkpointing only each block's input (4C a token) plus the one block recomputed
    during the backward pass at a time; then ln_f and lm_head's input."""
    C, block = c.n_embd, block_activation_bytes(c, dtype_bytes)
    per_token = c.n_layer * (4 * C if checkpointing else block) + 8 * C
    return tokens * per_token + (tokens * block if checkpointing else 0)  # + the block being recomputed


def logits_bytes(c: GPTConfig, tokens: int, dtype_bytes: int, loss_chunk: int) -> int:
    """The output layer and loss: the log-probabilities kept for backward (fp32), the logits and their fp32
    copy while the loss is computed. Chunked (--loss-chunk), only a chunk's worth at a time, plus lm_head's
    weight gradient computed in the same pass."""
    rows = min(loss_chunk, tokens) if loss_chunk > 0 else tokens
    return rows * c.vocab_size * (8 + dtype_bytes) + (c.vocab_size * c.n_embd * 4 if loss_chunk > 0 else 0)


def optimizer_state_bytes(cfg: TrainConfig, n: int) -> dict[str, int]:
    """The optimizer state one GPU holds (n: the GPUs FSDP splits it over): AdamW's two fp32 moments a parameter;
    under muon, Muon's one fp32 momentum buffer for the blocks' matrices and AdamW's two for each of its groups,
    counted on the model the run builds (made on the meta device: no memory)."""
    if cfg.optimizer == "adamw":
        return {"AdamW state (fp32 m, v)": 8 * cfg.model_config().num_parameters() // n}
    with torch.device("meta"):
        groups = {k: sum(p.numel() for p in ps) for k, ps in muon_groups(GPT(cfg.model_config())).items()}
    parts = {"Muon momentum (fp32): block matrices": 4 * groups.pop("muon", 0) // n}
    return parts | {f"AdamW state (fp32 m, v): {k}": 8 * size // n for k, size in groups.items()}


def plan_memory(cfg: TrainConfig, gpus: int, B: int, dtype_bytes: int) -> dict[str, int]:
    """Bytes one GPU holds at its peak, by what they are."""
    c, P = cfg.model_config(), cfg.model_config().num_parameters()
    fsdp = cfg.shard == "fsdp"
    accumulating = cfg.total_batch_size > B * cfg.seq_len * gpus and not cfg.reduce_every_micro_step
    n = gpus if fsdp else 1  # FSDP splits the model states over the GPUs
    parts = {"weights (fp32)": 4 * P // n, "gradients (fp32)": 4 * P // n, **optimizer_state_bytes(cfg, n)}
    if fsdp:  # gathered (fp32): the root unit (embeddings, ln_f) and two blocks (this one and the next,
        block = c.block_parameters()  # prefetched); the root's gradients before their reduction
        root = P - c.n_layer * block
        parts["gathered weights, the root's gradients"] = 4 * (2 * root + 2 * block)
        parts["whole gradients between micro-steps"] = 4 * P if accumulating else 0
    else:
        parts["DDP's gradient buckets"] = 4 * P if gpus > 1 else 0
    parts["autocast's weight copies"] = 2 * P if dtype_bytes == 2 else 0  # bf16 casts kept for the backward pass
    tokens = B * cfg.seq_len
    parts["activations"] = saved_activation_bytes(c, tokens, dtype_bytes, cfg.activation_checkpointing)
    parts["logits and loss"] = logits_bytes(c, tokens, dtype_bytes, cfg.loss_chunk)
    parts["CUDA context and workspaces (assumed)"] = int(CUDA_ALLOWANCE_GIB * GIB)
    return parts


def largest_micro_batch(cfg: TrainConfig, gpus: int, memory: float, dtype_bytes: int) -> int | None:
    """The largest micro-batch that fits and divides the total batch (accumulation computed); None if none."""
    per_step = cfg.total_batch_size // (cfg.seq_len * gpus)
    fits = [b for b in range(1, per_step + 1) if per_step % b == 0
            and sum(plan_memory(cfg, gpus, b, dtype_bytes).values()) <= memory]
    return max(fits) if fits else None


def plan_report(cfg: TrainConfig, plan: PlanConfig) -> list[str]:
    """The plan, as printed."""
    c, gpus = cfg.model_config(), plan.gpus
    memory = (plan.gpu_memory or GPU_MEMORY_GIB[plan.gpu]) * GIB
    dtype_bytes = 4 if cfg.dtype == "float32" else 2  # auto: bf16 (or fp16) on CUDA
    dtype = {"auto": "bf16", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[cfg.dtype]
    parts = plan_memory(cfg, gpus, cfg.micro_batch_size, dtype_bytes)
    total, accum = sum(parts.values()), cfg.total_batch_size // (cfg.micro_batch_size * cfg.seq_len * gpus)
    lines = [f"{c.num_parameters():,} parameters ({c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide) on {gpus} x "
             f"{plan.gpu} ({memory / GIB:.0f} GiB) | --shard {cfg.shard} | activation checkpointing "
             f"{'on' if cfg.activation_checkpointing else 'off'} | {dtype} autocast | --optimizer {cfg.optimizer}",
             f"micro-batch {cfg.micro_batch_size} x {cfg.seq_len} tokens, gradient accumulation {accum}", "per GPU:"]
    lines += [f"  {name:<40} {v / GIB:8.2f} GiB" for name, v in parts.items() if v]
    verdict = "fits" if total <= memory else "does NOT fit"
    lines.append(f"  {'total':<40} {total / GIB:8.2f} GiB of {memory / GIB:.0f}: {verdict}")
    best = largest_micro_batch(cfg, gpus, memory, dtype_bytes)
    lines.append(f"largest micro-batch that fits: {best}" if best else "no micro-batch fits: add --shard fsdp, "
                 "--activation-checkpointing, --loss-chunk 8192 or GPUs")
    return lines + plan_cost(cfg, plan)


def plan_cost(cfg: TrainConfig, plan: PlanConfig) -> list[str]:
    tokens = cfg.max_steps * cfg.total_batch_size
    peak = peak_for_name(plan.gpu.replace("-", " "), bf16=cfg.dtype != "float32")
    if plan.tokens_per_sec:
        speed, source = plan.tokens_per_sec, "measured (--tokens-per-sec)"
    elif peak:
        speed = plan.mfu * peak * plan.gpus / flops_per_token(cfg.model_config(), cfg.seq_len)
        source = f"assumed: {plan.mfu:.0%} MFU of {peak / 1e12:.0f} TFLOP/s a GPU (--mfu; or --tokens-per-sec)"
    else:
        return [f"run: {cfg.max_steps:,} steps x {cfg.total_batch_size:,} tokens = {tokens / 1e9:.1f}B tokens; "
                f"time and cost: pass --tokens-per-sec (no peak FLOP/s known for {plan.gpu})"]
    hours = tokens / speed / 3600
    return [f"run: {cfg.max_steps:,} steps x {cfg.total_batch_size:,} tokens = {tokens / 1e9:.1f}B tokens",
            f"at {speed:,.0f} tokens/s ({source}): {hours:,.1f} hours, {hours * plan.gpus:,.0f} GPU-hours, "
            f"${hours * plan.gpus * plan.price:,.0f} at ${plan.price:.2f} a GPU-hour (--price)"]


def plan_main(argv: list[str]) -> None:
    p = build_train_parser()
    p.prog, p.description = "train_gpt2.py plan", "What a training run's configuration needs per GPU, and costs."
    p.epilog = f"GPUs (--gpu): {', '.join(f'{k} {v} GiB' for k, v in GPU_MEMORY_GIB.items())}. " + p.epilog
    add_dataclass_flags(p, PlanConfig, extra={"gpu": dict(choices=sorted(GPU_MEMORY_GIB))})
    names = {f.name for f in dataclasses.fields(PlanConfig)}
    args = vars(p.parse_args(argv))
    plan = PlanConfig(**{k: args.pop(k) for k in names})
    cfg = train_config(args)
    if plan.gpus < 1 or not 0 < plan.mfu <= 1 or plan.price < 0 or (plan.gpu_memory or 1) <= 0:
        raise TrainError("--gpus, --gpu-memory and --price take positive numbers, --mfu a fraction in (0, 1]")
    check_batch(cfg, plan.gpus)  # the training run's own checks: divisibility, fsdp on one GPU, ...
    check_recipe(cfg)
    print("\n".join(plan_report(cfg, plan)))


# -----------------------------------------------------------------------------
# Command line: train (default), sample, export, plan


def sample_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="train_gpt2.py sample", description="Sample from a model.")
    p.add_argument("-m", "--model", required=True, help="an HF name (gpt2, gpt2-xl), an HF folder, or our .pt")
    add_dataclass_flags(p, SampleConfig, extra=SAMPLE_FLAG_ALIASES)
    p.add_argument("--seed", type=int, default=42, help="the same seed gives the same text (default: 42)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps or cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every token (slow)")
    a = vars(p.parse_args(argv))
    settings = SampleConfig(**{f.name: a[f.name] for f in dataclasses.fields(SampleConfig)})
    device = resolve_device(a["device"])
    model = load_model(a["model"], device)
    for i, text in enumerate(sample_text(model, settings, seed=a["seed"], device=device, use_cache=not a["no_cache"])):
        print(f"sample {i}: {text}")


def export_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="train_gpt2.py export",
                                description="Write one of our checkpoints as a Hugging Face folder: a GPT2LMHeadModel "
                                "(GPT-2's architecture) or a NanoChatForCausalLM (RoPE, RMSNorm, QK-norm, no biases).")
    p.add_argument("checkpoint", help="a model_XXXXX.pt written by training")
    p.add_argument("out_dir", help="folder for config.json + model.safetensors")
    a = p.parse_args(argv)
    model = load_model(a.checkpoint)
    model.save_pretrained(a.out_dir)  # a model no transformers class computes: a ValueError, nothing written
    print(f"wrote {a.out_dir}: load it with AutoModelForCausalLM.from_pretrained({a.out_dir!r}) "
          f"(a {hf_architecture(model.config)})")


def end_torchrun(agent: int) -> None:
    """Under torchrun, end it with the status NO_PROGRESS_EXIT, so that a scheduler does not requeue the job.
    torchrun restarts a failed worker whatever its exit code and exits 1 itself after any failure: only a signal
    it does not handle carries a status of ours, SIGUSR2, which kills it (128 + 12 = 140 on Linux, a shell's $?).
    Every rank sends it before exiting, so torchrun dies before it sees a worker exit and restarts one; once it
    is gone (our parent, `agent` at start-up, is no longer), the others send nothing."""
    if torchrun_attempt()[0] is not None and os.getppid() == agent:  # a torchrun worker whose agent still lives
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(agent, signal.SIGUSR2)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    agent = os.getppid()  # under torchrun, its agent (end_torchrun)
    commands = {"sample": sample_main, "export": export_main, "plan": plan_main}
    try:
        if argv and argv[0] in commands:
            commands[argv[0]](argv[1:])
        else:
            train(parse_train_args(argv))
    except NoProgress as e:
        print(f"train_gpt2.py: error: {one_line(e)}", file=sys.stderr, flush=True)
        end_torchrun(agent)
        sys.exit(NO_PROGRESS_EXIT)
    except (TrainError, TokenizerError, OSError, ValueError) as e:  # OSError: a full disk, a --log-dir that is a file
        print(f"train_gpt2.py: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"train_gpt2.py: error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
