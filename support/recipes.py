"""
Presets and recipes: named defaults that the flags override. A preset is a run (the GPT-2 ladder's four sizes as
llm.c trained them, the quick start, the speedrun); a recipe is how it trains (`gpt2`: GPT-2's own; `modern`:
modded-nanogpt's speedrun). Layering, lowest first: TrainConfig's defaults, the preset's values, the recipe's
values for that preset, the flags given.
"""

from __future__ import annotations

import dataclasses

from gpt2 import VE_GATE_CHANNELS, GPTConfig, ModelOptions
from support.data import dataset_dir
from support.errors import TrainError
from support.flags import as_flag, flat_fields
from support.modern_optim import ADAMW_GROUPS, MUON_VARIANTS, REFERENCE_WIDTH, WEIGHT_DECAY_SCHEDULES

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
# nanochat's rules (karpathy/nanochat at 92d63d4, scripts/base_train.py): its d12's learning rates, tuned at 2**19
# tokens a step, times sqrt(B / 2**19) for a batch of B tokens; its Muon weight decay 0.28 x sqrt(B / 2**19) x
# D_ref / D, where D is the model's compute-optimal horizon, 12 tokens per scaling parameter (the blocks' matrices,
# the value embeddings' gates, the head), and D_ref the same for its d12 (12 x 768 wide, 6 heads, vocab 32768).

NANOCHAT_BATCH = 2 ** 19
NANOCHAT_LRS = dict(muon_lr=0.02, embed_lr=0.3, head_lr=0.008, scalar_lr=0.5)  # gate_lr 0.2 is not batch-scaled
NANOCHAT_WEIGHT_DECAY = 0.28


def scaling_parameters(n_layer: int, n_head: int, n_embd: int, vocab_size: int) -> int:
    """nanochat's scaling parameters for a model with every option on: the blocks' 12 C^2, one gate (12 channels
    to each head) per value-embedding layer, the untied head."""
    ve_layers = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, value_embeds=True).value_embed_layers()
    return n_layer * 12 * n_embd ** 2 + len(ve_layers) * VE_GATE_CHANNELS * n_head + vocab_size * n_embd


def nanochat_rules(n_layer: int, n_head: int, n_embd: int, vocab_size: int, total_batch_size: int,
                   lr_mult: float = 1.0) -> dict:
    """The lrs and Muon weight decay nanochat's base_train.py gives this shape and batch (lrs x lr_mult), to 4
    significant digits."""
    batch = (total_batch_size / NANOCHAT_BATCH) ** 0.5
    d12 = scaling_parameters(12, REFERENCE_WIDTH // 128, REFERENCE_WIDTH, 32768)  # heads of 128, its vocab
    ratio = d12 / scaling_parameters(n_layer, n_head, n_embd, vocab_size)
    values = {**{k: v * batch * lr_mult for k, v in NANOCHAT_LRS.items()},
              "muon_weight_decay": NANOCHAT_WEIGHT_DECAY * batch * ratio}
    return {k: float(f"{v:.4g}") for k, v in values.items()}


# -----------------------------------------------------------------------------
# Recipes (--recipe): what a recipe sets over a preset's values (and explicit flags over a recipe's). "gpt2" sets
# nothing: the defaults and presets are GPT-2's recipe. "modern" is nanochat's: modded-nanogpt's architecture
# (RoPE, QK-norm, ReLU^2, no biases, an untied head, RMSNorm also after the embedding, logit softcap) with nanochat's
# additions (value embeddings, per-layer residual and x0 scalars, the smear and back-out gates, q/k gain 1.2, rotary
# base 100,000, its initialisation), Polar Express / NorMuon on the blocks' matrices, AdamW with nanochat's per-group
# betas and decays elsewhere, its warmup, warmdown and momentum/weight-decay schedules. "*" holds its general values,
# used with every preset that has no entry of its own; a preset's entry goes over them.

MODERN_ARCHITECTURE = dict(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", bias=False, split_qkv=True,
                           tie_embeddings=False, zero_init_proj=True, logit_softcap=30.0)
NANOCHAT_ARCHITECTURE = dict(**MODERN_ARCHITECTURE | dict(logit_softcap=15.0), rope_base=100000.0, qk_gain=1.2,
                             value_embeds=True, layer_scalars=True, smear=True, backout=True, init="nanochat")
NANOCHAT_OPTIMIZER = dict(
    optimizer="muon", muon_variant="nanochat", adamw_groups="nanochat", lr_width_scale=True,
    muon_momentum_start=0.85, muon_momentum=0.97, muon_momentum_warmup=400, muon_momentum_end=0.90,
    muon_weight_decay_schedule="cosine", beta1=0.8, beta2=0.95, eps=1e-10, weight_decay=0.0, grad_clip=0.0,
    schedule="wsd", warmup_steps=40, cooldown_frac=0.65, min_lr_ratio=0.05)
RECIPES = {
    "gpt2": {},
    "modern": {
        # nanochat's d12 (12 x 768 wide, GPT-2 124M's shape) as base_train.py trains it, with our vocab (50304): lrs
        # 0.02 Muon, 0.3 wte, 0.008 head, 0.5 scalars, 0.2 gates at 2**19 tokens a step; Muon weight decay by its
        # rule (0.249 here: the larger vocab's head lengthens D), cosine to 0; momentum 0.85 -> 0.97 over 400 steps,
        # down to 0.90 over the warmdown; 40 warmup steps, the last 65% of steps down to 5%; no clipping
        "*": dict(**NANOCHAT_ARCHITECTURE, **NANOCHAT_OPTIMIZER, **nanochat_rules(12, 12, 768, 50304, NANOCHAT_BATCH)),
        # the quick start's modern twin (4 x 32 wide, 1,024 tokens a step), chosen on four texts' validation splits
        # (tiny Shakespeare, bench/docs_text.py's technical text, the King James Bible, the section-3 man pages;
        # seed 1337, val at step 593): nanochat's rules at this batch give lrs too small for 594 steps (5.55 on
        # Shakespeare); x32 of them (the lowest mean over the first two texts at the 15% floor and without one; x48
        # lower on Shakespeare alone, x16 on the mean at 5%), no softcap (at 32 wide the logits stay far from 15:
        # 4.690 without, 4.698 with; capping 50304-wide logits costs 20% of a step here), and the cooldown to 15% of
        # the peak: the run reads its text about twice, and a lower floor fits it more closely, which two of the
        # texts' splits punish and two reward (mean of the four: 5% 3.736, 15% 3.712, 30% 3.737, 50% 3.856).
        # Reported on texts none of this was chosen on (docs/fast-track.md)
        "shakespeare": dict(**nanochat_rules(4, 2, 32, 50304, 1024, lr_mult=32), logit_softcap=0.0, min_lr_ratio=0.15),
        # modded-nanogpt's record 11 (records/track_1_short/2024-11-10_UNetDoubleLr, the script in its log), in
        # full over the general values: record 10's architecture (softcap 30, rotary base 10,000, none of
        # nanochat's options), torch's Muon at 0.04 with momentum 0.85 -> 0.95 over 500 steps, kept to the end;
        # Adam (betas 0.9/0.95, torch's eps 1e-8) 0.6 on wte, 0.008 on the head, 0.04 on vectors; no weight
        # decay; no warmup; the last 900 of 3000 steps down to 0; no clipping. Its doubled lrs came with its U-net
        # skips, which our model lacks
        # the ladder's larger presets: nanochat's rules at their shapes and batches (its d12 lrs, the Muon weight
        # decay smaller for a longer horizon: gpt2-medium 0.087, gpt2-large 0.040, gpt2-xl 0.028 with x1.41 lrs)
        **{name: nanochat_rules(PRESETS[name]["n_layer"], PRESETS[name]["n_head"], PRESETS[name]["n_embd"], 50304,
                                PRESETS[name].get("total_batch_size", NANOCHAT_BATCH))
           for name in ("gpt2-medium", "gpt2-large", "gpt2-xl")},
        "speedrun": dict(**{k: getattr(ModelOptions(), k) for k in NANOCHAT_ARCHITECTURE} | MODERN_ARCHITECTURE,
                         muon_variant="keller", adamw_groups="shared", lr_width_scale=False, muon_lr=0.04,
                         muon_momentum_start=0.85, muon_momentum=0.95, muon_momentum_warmup=500,
                         muon_momentum_end=0.95, muon_weight_decay=0.0, muon_weight_decay_schedule="constant",
                         embed_lr=0.6, head_lr=0.008, scalar_lr=0.04, beta1=0.9, beta2=0.95, eps=1e-8,
                         warmup_steps=0, cooldown_frac=0.3, min_lr_ratio=0.0),
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
              "embed_lr", "head_lr", "scalar_lr", "muon_variant", "muon_momentum_end", "muon_weight_decay_schedule",
              "adamw_groups", "lr_width_scale", "gate_lr")  # what only --optimizer muon reads


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
    choices = {"muon_variant": MUON_VARIANTS, "adamw_groups": ADAMW_GROUPS,
               "muon_weight_decay_schedule": WEIGHT_DECAY_SCHEDULES}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise TrainError(f"{as_flag(name, getattr(cfg, name))}: use one of {', '.join(allowed)}")
    momenta = (cfg.muon_momentum_start, cfg.muon_momentum,
               *([cfg.muon_momentum_end] if cfg.muon_momentum_end is not None else []))
    lrs = [v for v in (cfg.muon_lr, cfg.embed_lr, cfg.head_lr, cfg.scalar_lr, cfg.gate_lr) if v is not None]
    if not all(0 <= m < 1 for m in momenta) or cfg.muon_momentum_warmup < 0 or min(lrs) < 0:
        raise TrainError("--muon-momentum, --muon-momentum-start and --muon-momentum-end take a momentum in [0, 1), "
                         "--muon-momentum-warmup a number of steps >= 0, the lrs numbers >= 0")
    if cfg.schedule == "wsd" and not 0 < cfg.cooldown_frac <= 1:
        raise TrainError(f"--cooldown-frac {cfg.cooldown_frac}: give the fraction of steps that cool down, in (0, 1]")
    if cfg.target_val_loss < 0 or (cfg.target_val_loss > 0 and cfg.eval_interval <= 0):
        raise TrainError(f"--target-val-loss {cfg.target_val_loss}: give a loss > 0 (0: none), with an "
                         "--eval-interval > 0 to measure it")
