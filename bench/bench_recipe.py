"""
What the modern recipe buys: validation loss at equal tokens, the tokens needed to reach the GPT-2 recipe's final
loss, and the time per token, for the GPT-2 recipe, the modern one and (--ablate) the GPT-2 recipe plus each single
change of the modern one; several seeds each.

    python bench/bench_recipe.py                           # the quick start's shape on tiny Shakespeare, 3 seeds
    python bench/bench_recipe.py --ablate                  # + the GPT-2 recipe with each single change
    python bench/bench_recipe.py --ablate --changes "+ smear,+ backout" --ablate-seeds 1   # some, on one seed
    python bench/bench_recipe.py --nanochat-lrs 1,32       # + nanochat's recipe, its rules' lrs x 1 and x 32
    python bench/bench_recipe.py --data other.txt          # text the recipes' settings were not tuned on
    python bench/bench_recipe.py --preset speedrun --seeds 1 --max-steps 200 --device cuda   # bigger, on a GPU

Every run is train_gpt2.train() itself, in a fresh process (`python bench/bench_recipe.py --worker ...`), with
the preset's settings (--preset, default shakespeare) and the recipe's, --evals validations evenly spaced on the
preset's validation batches (the same tokens every time), no HellaSwag, samples or checkpoints beyond the last.
Each seed (--seeds) sets the model's initialisation; the data order is the same for every run.

- val loss: at the last evaluation (it runs before the last step trains), every recipe having read the same
  tokens; the median over seeds [min, max].
- tokens to reach: the first point, linearly interpolated between two evaluations, where the validation loss is
  at or below the GPT-2 recipe's median final loss; as a share of the GPT-2 recipe's tokens ("not reached" when a
  run never gets there). The median over seeds.
- time per token: each run's median training-step time (evaluations excluded) per token, median over seeds,
  relative to the GPT-2 recipe's measured in the same invocation. Runs of the recipes are interleaved, so that
  whatever else the machine does falls on all of them alike.

Flags it does not know go to train_gpt2.py (e.g. --max-steps, --device, --val-steps). The output is a markdown
table headed by the device, torch version, data and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the modules live one level up

import train_gpt2 as tg  # noqa: E402
from bench.machine import device_name  # noqa: E402
from support.distributed import resolve_device  # noqa: E402
from support.flags import as_flag, flat_fields  # noqa: E402
from support.recipes import NANOCHAT_ARCHITECTURE, NANOCHAT_OPTIMIZER, nanochat_rules, recipe_values  # noqa: E402

# The recipes compared, as train_gpt2.py flags over --preset. --ablate adds the GPT-2 recipe plus each single
# change of the modern one: the named fields of the modern recipe, at its values for the preset.
RECIPES = {"gpt2": ["--recipe", "gpt2"], "modern": ["--recipe", "modern"]}
SINGLE_CHANGES = {
    "+ muon": ("optimizer", "split_qkv", "muon_lr", "muon_momentum", "muon_momentum_start", "muon_momentum_warmup",
               "muon_weight_decay"),  # AdamW elsewhere at the preset's lr, as in the measurement
    "+ rope": ("pos_emb",),
    "+ rmsnorm": ("norm",),
    "+ qk-norm": ("qk_norm",),
    "+ relu2": ("mlp",),
    "+ no bias": ("bias",),
    "+ untied head": ("tie_embeddings",),
    "+ zero-init proj": ("zero_init_proj",),
    "+ softcap": ("logit_softcap",),
    "+ wsd": ("schedule", "cooldown_frac", "min_lr_ratio"),
    "+ adamw settings": ("beta1", "beta2", "eps", "weight_decay", "grad_clip"),  # the modern recipe's AdamW
    # nanochat's options, each with what it needs (a gain needs QK-norm, rope's base rope, its init an untied head)
    "+ value embeds": ("value_embeds",),
    "+ layer scalars": ("layer_scalars",),
    "+ smear": ("smear",),
    "+ backout": ("backout",),
    "+ qk gain": ("qk_norm", "qk_gain"),
    "+ rope base": ("pos_emb", "rope_base"),
    "+ nanochat init": ("tie_embeddings", "init"),
    "+ nanochat's muon": ("optimizer", "split_qkv", "muon_lr", "muon_momentum", "muon_momentum_start",
                          "muon_momentum_warmup", "muon_weight_decay", "muon_variant", "muon_momentum_end",
                          "muon_weight_decay_schedule"),  # its Muon and schedules; AdamW elsewhere as "+ muon"
}


def single_change_flags(name: str, preset: str | None) -> list[str]:
    """The GPT-2 recipe plus one change at the modern recipe's values for the preset; where the preset's recipe
    leaves that change out (the quick start's has no softcap), at the recipe's general values."""
    values = recipe_values("modern", preset)
    gpt2_values = flat_fields(tg.TrainConfig())
    if all(values[k] == gpt2_values[k] for k in SINGLE_CHANGES[name]):
        values = recipe_values("modern", None)
    return ["--recipe", "gpt2", *(w for k in SINGLE_CHANGES[name] for w in as_flag(k, values[k]).split())]


def nanochat_flags(cfg: tg.TrainConfig, mult: float) -> list[str]:
    """The flags that train as nanochat's base_train.py (karpathy/nanochat at 92d63d4) would at cfg's shape and
    batch: its model (every option, softcap 15), its optimizer and schedules, its rules' lrs x mult and Muon weight
    decay (support/recipes.py:nanochat_rules)."""
    rules = nanochat_rules(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.total_batch_size, lr_mult=mult)
    values = {**NANOCHAT_ARCHITECTURE, **NANOCHAT_OPTIMIZER, **rules}
    return ["--recipe", "modern", *(w for k, v in values.items() for w in as_flag(k, v).split())]


def worker(result: str, train_args: list[str], threads: int) -> None:
    """One training run in this process: its validation curve and step times as JSON in `result`."""
    torch.set_num_threads(threads)
    cfg = tg.parse_train_args(train_args)
    dts = []
    history = tg.train(cfg, on_step=lambda step, stats: dts.append(stats["dt"]))
    val = {int(k): v for k, v in history["val"].items()}
    Path(result).write_text(json.dumps({"val": val, "dt": dts, "tokens_per_step": cfg.total_batch_size,
                                        "steps": cfg.max_steps}))


def launch(result: Path, train_args: list[str], threads: int) -> subprocess.Popen:
    """A worker process; its output goes to a file beside its result (a full pipe would stall its steps)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(result), "--threads", str(threads), "--",
           *train_args]
    return subprocess.Popen(cmd, stdout=open(result.with_suffix(".out"), "w"), stderr=subprocess.STDOUT)


def run_all(runs: list[tuple[str, int, list[str]]], jobs: int, threads: int, folder: Path) -> dict:
    """runs: (name, seed, flags), started in this order, at most `jobs` at a time. Returns {(name, seed): result}."""
    pending, active, results = list(enumerate(runs)), [], {}
    while pending or active:
        while pending and len(active) < jobs:
            i, (name, seed, flags) = pending.pop(0)
            path = folder / f"result_{i}.json"
            active.append((name, seed, path, launch(path, flags, threads)))
        time.sleep(0.2)
        for name, seed, path, proc in [a for a in active if a[3].poll() is not None]:
            active.remove((name, seed, path, proc))
            if proc.returncode != 0:
                for _, _, _, other in active:
                    other.kill()
                sys.stderr.write(path.with_suffix(".out").read_text()[-4000:])
                raise SystemExit(f"bench_recipe.py: the run {name} (seed {seed}) failed (exit {proc.returncode})")
            results[name, seed] = json.loads(path.read_text())
            print(f"  {name} seed {seed}: val {last_val(results[name, seed]):.4f}", file=sys.stderr, flush=True)
    return results


def last_val(r: dict) -> float:
    return r["val"][str(r["steps"] - 1)] if str(r["steps"] - 1) in r["val"] else r["val"][max(r["val"], key=int)]


def tokens_to_reach(r: dict, target: float) -> float:
    """Tokens read when the validation loss first reaches target, interpolated between evaluations; inf if never."""
    points = sorted((int(step), v) for step, v in r["val"].items())
    prev = None
    for step, v in points:
        tokens = step * r["tokens_per_step"]  # an evaluation at step s runs before step s trains
        if v <= target:
            if prev is None or prev[1] == v:
                return tokens
            t0, v0 = prev
            return t0 + (v0 - target) / (v0 - v) * (tokens - t0)
        prev = (tokens, v)
    return math.inf


def seconds_per_token(r: dict) -> float:
    dts = r["dt"][1:] if len(r["dt"]) > 1 else r["dt"]  # the first step pays one-off costs
    return statistics.median(dts) / r["tokens_per_step"]


def table(results: dict, names: list[str], seeds: list[int]) -> list[str]:
    base = "gpt2"
    target = statistics.median(last_val(results[base, s]) for s in seeds)
    base_tokens = statistics.median(tokens_to_reach(results[base, s], target) for s in seeds)
    base_spt = statistics.median(seconds_per_token(results[base, s]) for s in seeds)
    first = results[base, seeds[0]]
    final_tokens = max(map(int, first["val"])) * first["tokens_per_step"]  # the last evaluation precedes the last step
    lines = [f"| recipe | val loss after {final_tokens:,} tokens | tokens to reach {target:.4f} | share of GPT-2's | "
             "time per token vs GPT-2 |",
             "| --- | --- | --- | --- | --- |"]
    for name in names:
        ran = [s for s in seeds if (name, s) in results]  # --ablate-seeds: on the first seeds only
        vals = [last_val(results[name, s]) for s in ran]
        reach = statistics.median(tokens_to_reach(results[name, s], target) for s in ran)
        spt = statistics.median(seconds_per_token(results[name, s]) for s in ran)
        spread = f" [{min(vals):.4f}, {max(vals):.4f}]" if len(ran) > 1 else ""
        reach_text = "not reached" if math.isinf(reach) else f"{reach:,.0f}"
        share = "-" if math.isinf(reach) else f"{reach / base_tokens:.0%}"
        lines.append(f"| {name} | {statistics.median(vals):.4f}{spread} | {reach_text} | {share} | "
                     f"{spt / base_spt:.2f}x |")
    return lines


# -----------------------------------------------------------------------------
# The runs and the report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shakespeare", help="train_gpt2.py's preset, the shape and data (shakespeare)")
    p.add_argument("--seeds", default="1337,1338,1339", help="comma-separated model-init seeds, each recipe run once"
                   " per seed (1337,1338,1339)")
    p.add_argument("--ablate", action="store_true", help="also the GPT-2 recipe plus each single change")
    p.add_argument("--ablate-seeds", type=int, default=0, help="--ablate's runs on the first N seeds (0: all)")
    p.add_argument("--changes", default="", help="--ablate's rows, comma-separated names (e.g. '+ smear,+ backout'; "
                   "default: all)")
    p.add_argument("--also", action="append", default=[], metavar="NAME=FLAGS", help="also a recipe of your own: "
                   "train_gpt2.py flags over --preset, e.g. 'modern, no smear=--recipe modern --no-smear'")
    p.add_argument("--nanochat-lrs", default="", help="comma-separated multiples: also nanochat's recipe with its "
                   "learning rates times each (1: as base_train.py sets them)")
    p.add_argument("--evals", type=int, default=18, help="validations per run, evenly spaced, and at the last step")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1)")
    p.add_argument("--worker", metavar="RESULT", help=argparse.SUPPRESS)  # one run, in this process
    return p


def plan_runs(args, extra: list[str]) -> tuple[list[tuple[str, int, list[str]]], tg.TrainConfig]:
    """Every run's (name, seed, train_gpt2 flags), seeds outermost so that recipes interleave; and the GPT-2
    recipe's config, for the header."""
    seeds = [int(s) for s in args.seeds.split(",")]
    base = tg.parse_train_args(["--preset", args.preset, *extra])
    common = ["--preset", args.preset, "--eval-interval", str(max(1, base.max_steps // args.evals)),
              "--no-hellaswag", "--num-samples", "0", "--checkpoint-interval", "0"]
    runs = [(name, seed, [*common, *flags, "--seed", str(seed)]) for seed in seeds
            for name, flags in compared(args, base).items()]
    if args.ablate:
        runs += [(name, seed, [*common, *single_change_flags(name, args.preset), "--seed", str(seed)])
                 for seed in seeds[:args.ablate_seeds or None] for name in ablated(args)]
    return [(name, seed, flags + extra) for name, seed, flags in runs], base


def ablated(args) -> list[str]:
    """--ablate's rows: --changes' names (each checked), or every single change."""
    names = [n.strip() for n in args.changes.split(",") if n.strip()] or list(SINGLE_CHANGES)
    unknown = [n for n in names if n not in SINGLE_CHANGES]
    if unknown:
        raise SystemExit(f"--changes {', '.join(unknown)}: not a row; use some of {', '.join(SINGLE_CHANGES)}")
    return names


def compared(args, base: tg.TrainConfig) -> dict[str, list[str]]:
    """The recipes every seed runs: gpt2, modern, and nanochat's at each --nanochat-lrs multiple."""
    mults = [float(m) for m in args.nanochat_lrs.split(",") if m]
    also = dict(spec.split("=", 1) for spec in args.also)
    return {**RECIPES, **{f"nanochat x{m:g}": nanochat_flags(base, m) for m in mults},
            **{name: flags.split() for name, flags in also.items()}}


def header(cfg: tg.TrainConfig, seeds: list[int], threads: int) -> str:
    torch.set_num_threads(threads)
    return (f"{device_name(resolve_device(cfg.device))} | torch {torch.__version__} | "
            f"{datetime.date.today()} | --preset {cfg.preset}, data {cfg.data}, {cfg.max_steps} steps of "
            f"{cfg.total_batch_size:,} tokens | seeds {', '.join(map(str, seeds))}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args, unknown = build_parser().parse_known_args(ours)
    extra = unknown + extra
    if args.worker:
        return worker(args.worker, extra, args.threads)
    runs, base = plan_runs(args, extra)
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(name, seed, [*flags, "--log-dir", str(Path(tmp) / f"log_{i}")])
                for i, (name, seed, flags) in enumerate(runs)]
        results = run_all(runs, args.jobs, args.threads, Path(tmp))
    names = list(compared(args, base)) + (ablated(args) if args.ablate else [])
    print(header(base, seeds, args.threads))
    print()
    print("\n".join(table(results, names, seeds)))


if __name__ == "__main__":
    main()
