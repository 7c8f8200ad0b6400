"""
Presets and recipes: named defaults that the flags override. A preset is a run (the GPT-2 ladder's four sizes as
llm.c trained them, the quick start, the speedrun); a recipe is how it trains (`gpt2`: GPT-2's own; `modern`:
modded-nanogpt's speedrun). Layering, lowest first: TrainConfig's defaults, the preset's values, the recipe's
values for that preset, the flags given.
"""

from __future__ import annotations

import dataclasses

from gpt2 import ModelOptions
from support.data import dataset_dir
from support.errors import TrainError
from support.flags import as_flag, flat_fields

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


def recipe_lines(cfg) -> list[str]:
    """The run's first lines: the recipe, the values it set, and the flags that overrode them (a value that is
    not the recipe's can only come from a flag: flags are the one layer above it)."""
    values = recipe_values(cfg.recipe, cfg.preset)
    if not values:
        return [f"recipe {cfg.recipe}: sets nothing (GPT-2's recipe is the defaults"
                f"{' and the preset ' + cfg.preset if cfg.preset else ''}, under the flags given)"]
    flat = flat_fields(cfg)
    which = f"its values for --preset {cfg.preset}" if cfg.preset in RECIPES[cfg.recipe] else "its general values"
    lines = [f"recipe {cfg.recipe}, {which}: " + " ".join(as_flag(k, v) for k, v in values.items())]
    over = [f"{as_flag(k, flat[k])} (recipe: {v})" for k, v in values.items() if flat[k] != v]
    return lines + ([f"flags over the recipe: {', '.join(over)}"] if over else [])


MUON_FLAGS = ("muon_lr", "muon_momentum", "muon_momentum_start", "muon_momentum_warmup", "muon_weight_decay",
              "embed_lr", "head_lr", "scalar_lr")  # what only --optimizer muon reads


def layered_values(args: dict) -> dict:
    """The flags given (a parser's namespace, without the flags not given) over their recipe's values for the
    preset, over the preset's values: the fields they set, by name (TrainConfig's defaults fill in the rest).
    --optimizer muon implies --split-qkv (from scratch): Muon orthogonalises q, k and v one by one. A flag that
    this run would not read is an error."""
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
    return values


def check_recipe(cfg) -> None:
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
    if cfg.optimizer == "muon" and cfg.memory.shard == "fsdp":
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
