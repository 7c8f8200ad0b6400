"""
The report card of a training run, `python eval_suite.py -m log/model_19072.pt --report`: is this run normal, and
did it reproduce GPT-2? Beside the checkpoint, report.md (for people), report.json (for programs) and report.png
(the curves): the model and what it was trained on; its validation loss on the run's own validation split (where
the data is at hand), HellaSwag acc_norm and CORE, each beside the published value of the GPT-2 (and GPT-3) of the
nearest size; the loss and HellaSwag curves of the run's log.txt; a few samples. eval_suite.py measures HellaSwag
and CORE (every rank takes part); this module computes the rest and writes the card.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from gpt2 import GPT, GPT2_VOCAB_SIZE
from support.core import GPT2_CORE
from support.data import open_val_split, shard_tokens
from support.distributed import autocast, resolve_dtype
from support.errors import TrainError, one_line
from support.files import atomic_write
from support.sampling import SampleConfig, sample_text

GPT2_PARAMETERS = {"gpt2 (124M)": 124e6, "gpt2-medium (355M)": 355e6, "gpt2-large (774M)": 774e6,
                   "gpt2-xl (1558M)": 1558e6}
# what the README and play.ipynb cite: OpenAI's GPT-2 on FineWeb-Edu's validation split (124M only), HellaSwag
# acc_norm on its 10,042 validation examples (124M, 1558M), and GPT-3's paper (125M: "GPT-3 Small")
GPT2_VAL_LOSS = {"gpt2 (124M)": 3.2924}
GPT2_HELLASWAG = {"gpt2 (124M)": 0.2955, "gpt2-xl (1558M)": 0.4893}
GPT3_HELLASWAG = {"gpt2 (124M)": 0.337}  # GPT-3 Small (125M), beside GPT-2 124M
SAMPLE_PROMPT = "Hello, I'm a language model,"


def nearest_gpt2(parameters: int) -> str:
    """The GPT-2 checkpoint closest in size (on a log scale)."""
    return min(GPT2_PARAMETERS, key=lambda name: abs(math.log(parameters / GPT2_PARAMETERS[name])))


def run_info(ckpt: dict, model: GPT) -> dict:
    args, c = ckpt.get("args", {}), model.config
    step = ckpt.get("step")
    return {"parameters": model.num_parameters(), "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
            "vocab_size": c.vocab_size, "recipe": args.get("recipe", "gpt2"), "optimizer": args.get("optimizer"),
            "steps": None if step is None else step + 1, "data": args.get("data"),
            "tokens": None if step is None or "total_batch_size" not in args else (step + 1) * args["total_batch_size"],
            "world_size": ckpt.get("world_size")}


def validation_windows(shards: list, B: int, T: int, rank: int, world: int):
    """Rank `rank`'s validation windows, as training's DataLoader gives them from its start: whole groups of
    `world` windows of B*T+1 tokens a shard (shards too short for one are skipped), over and over."""
    groups = [(len(shard_tokens(s)) - 1) // (B * T) // world for s in shards]
    while True:
        for shard, g in zip(shards, groups):
            tokens = shard_tokens(shard)
            for group in range(g):
                w = group * world + rank
                yield torch.from_numpy(tokens[w * B * T: (w + 1) * B * T + 1].astype(np.int64))


@torch.no_grad()
def validation_loss(model: GPT, ckpt: dict, device: str) -> dict:
    """The loss on the windows the run's own evaluation read (val_steps windows on each of its ranks), in the
    run's precision on this device; or why it cannot be measured here (the run's data is not here, it had no
    validation split, ...): the card is written either way."""
    args, world = ckpt.get("args") or {}, ckpt.get("world_size") or 1
    if any(args.get(k) in (None, "") for k in ("data", "micro_batch_size", "seq_len", "val_steps")):
        return {"value": None, "why": "the checkpoint does not hold the run's data and batch arguments"}
    data = Path(args["data"])
    if not data.exists():
        return {"value": None, "why": f"the run's data ({data}) is not here (relative to {Path.cwd()})"}
    B, T, steps = args["micro_batch_size"], args["seq_len"], args["val_steps"]
    try:
        shards, names = open_val_split(data, args.get("val_fraction", 0.1), model.config.vocab_size)
    except TrainError as e:
        return {"value": None, "why": one_line(e)}
    if steps <= 0 or not any((len(shard_tokens(s)) - 1) // (B * T) // world for s in shards):
        return {"value": None, "why": f"no validation windows: --val-steps {steps}, {B} x {T} tokens x {world} ranks"}
    dtype = resolve_dtype(args.get("dtype", "auto"), torch.device(device).type)
    losses = []
    for rank in range(world):
        for _, buf in zip(range(steps), validation_windows(shards, B, T, rank, world)):
            buf = buf.to(device)
            with autocast(buf.device.type, dtype):
                _, loss = model(buf[:-1].view(B, T), buf[1:].view(B, T), loss_chunk=args.get("loss_chunk", 0))
            losses.append(loss.float().item())
    return {"value": sum(losses) / len(losses), "tokens": len(losses) * B * T, "split": names[0],
            "dtype": str(dtype or torch.float32).removeprefix("torch.")}


def plot_curves(log: dict, out: Path, size: str) -> None:
    """The training and validation loss, and HellaSwag where the run measured it, with GPT-2's and GPT-3's lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if log.get("hella") else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for name, style in (("train", dict(alpha=0.4, lw=0.8)), ("val", dict(lw=1.5, marker="o", ms=3))):
        if log.get(name):
            ax.plot(list(log[name]), list(log[name].values()), label=f"{name} loss", **style)
    if size in GPT2_VAL_LOSS:
        ax.axhline(GPT2_VAL_LOSS[size], color="r", ls="--", label=f"OpenAI {size}, FineWeb-Edu val")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    if panels == 2:
        ax = axes[0][1]
        ax.plot(list(log["hella"]), list(log["hella"].values()), marker="o", ms=3, label="this run")
        for refs, label, color in ((GPT2_HELLASWAG, "OpenAI", "r"), (GPT3_HELLASWAG, "GPT-3 of", "g")):
            if size in refs:
                ax.axhline(refs[size], color=color, ls="--", label=f"{label} {size}")
        ax.set(xlabel="step", ylabel="acc_norm", title="HellaSwag")
        ax.legend()
    fig.tight_layout()
    with atomic_write(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def verdict(value: float | None, reference: float | None, lower_is_better: bool, stderr: float = 0.0) -> str:
    """How a measurement stands against a published one: at or past it, within its 95% interval of it, or short."""
    if value is None or reference is None:
        return "—"
    better = reference - value if lower_is_better else value - reference
    if better >= 0:
        return "reached"
    return "within the 95% interval" if -better <= 1.96 * stderr else "not reached"


def make_card(checkpoint: Path, ckpt: dict, model: GPT, hellaswag: dict, core_summary: dict, device: str,
              max_per_task: int = 0) -> dict:
    """The card's contents: the run, the three measurements beside the nearest GPT-2's, samples. max_per_task: CORE
    was measured on the first N examples of each task (a subset, marked as such)."""
    info = run_info(ckpt, model)
    size = nearest_gpt2(info["parameters"])
    val = validation_loss(model, ckpt, device)
    core_name = f"CORE (first {max_per_task} examples a task)" if max_per_task else "CORE"
    h, n = hellaswag["acc_norm"], hellaswag["num_total"]
    h_err = math.sqrt(h * (1 - h) / n)
    comparison = [
        dict(metric="validation loss", value=val["value"], stderr=None, gpt2=GPT2_VAL_LOSS.get(size), gpt3=None,
             verdict=verdict(val["value"], GPT2_VAL_LOSS.get(size), lower_is_better=True)),
        dict(metric="HellaSwag acc_norm", value=h, stderr=h_err, gpt2=GPT2_HELLASWAG.get(size),
             gpt3=GPT3_HELLASWAG.get(size), verdict=verdict(h, GPT2_HELLASWAG.get(size), False, h_err)),
        dict(metric=core_name, value=core_summary["core_metric"], stderr=core_summary["core_stderr"],
             gpt2=GPT2_CORE[size], gpt3=None,
             verdict=verdict(core_summary["core_metric"], GPT2_CORE[size], False, core_summary["core_stderr"])),
    ]
    samples = []
    if model.config.vocab_size >= GPT2_VOCAB_SIZE:  # GPT-2's tokens: samples the tokenizer can read
        new = min(32, model.config.block_size - 16)
        samples = sample_text(model, SampleConfig(SAMPLE_PROMPT, 3, new), seed=42, device=device)
    return {"checkpoint": str(checkpoint), "model": info, "nearest_gpt2": size, "validation": val,
            "core_max_per_task": max_per_task or None,
            "hellaswag": hellaswag, "core": core_summary, "comparison": comparison, "samples": samples,
            "curves": "report.png"}


def render_markdown(card: dict) -> str:
    info, size = card["model"], card["nearest_gpt2"]
    cell = lambda v, se=None: "—" if v is None else f"{v:.4f}" + (f" ± {1.96 * se:.4f}" if se else "")
    count = lambda v: "?" if v is None else f"{v:,}"
    lines = [f"# Report card: {card['checkpoint']}", "",
             f"{info['parameters']:,} parameters ({info['n_layer']} layers, {info['n_head']} heads, {info['n_embd']} "
             f"wide, vocabulary {info['vocab_size']:,}), recipe {info['recipe']}, optimizer {info['optimizer']}; "
             f"{count(info['steps'])} steps, {count(info['tokens'])} tokens of {info['data']} on "
             f"{count(info['world_size'])} rank(s). Compared with OpenAI's {size}, the nearest GPT-2 (± is a 95% "
             "interval).", "",
             f"| | this run | GPT-2 {size} | GPT-3 of its size | |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['metric']} | {cell(r['value'], r['stderr'])} | {cell(r['gpt2'])} | {cell(r['gpt3'])} | "
              f"{r['verdict']} |" for r in card["comparison"]]
    val = card["validation"]
    measured = (f"{val['tokens']:,} tokens of {val['split']} ({val['dtype']})" if val["value"] is not None
                else f"not measured: {val['why']}")
    subset = card.get("core_max_per_task")
    core_text = f"the first {subset} examples of each of" if subset else "all the examples of"
    lines += ["", f"Validation loss: {measured}. HellaSwag: {card['hellaswag']['num_total']:,} validation examples. "
              f"CORE: {core_text} its {len(card['core']['results'])} tasks"
              f"{' (a subset: not comparable with published CORE)' if subset else ''}.", "",
              "![loss and HellaSwag curves](report.png)", "", "## CORE, task by task", "",
              "| task | shots | accuracy | centered |", "| --- | --- | --- | --- |"]
    lines += [f"| {label} | {t['num_fewshot']} | {card['core']['results'][label]:.4f} | "
              f"{card['core']['centered_results'][label]:.4f} |" for label, t in card["core"]["tasks"].items()]
    lines += ["", "## Samples", ""]
    lines += [f"{i}. {text!r}" for i, text in enumerate(card["samples"], 1)] or ["(the model's vocabulary is not "
                                                                                  "GPT-2's: no samples)"]
    return "\n".join(lines) + "\n"


def write_card(card: dict, folder: Path, log: dict) -> list[Path]:
    """report.json, report.md and report.png in folder (each written whole or not at all)."""
    paths = [folder / "report.json", folder / "report.md", folder / "report.png"]
    with atomic_write(paths[0]) as tmp:
        tmp.write_text(json.dumps(card, indent=2, ensure_ascii=False))
    with atomic_write(paths[1]) as tmp:
        tmp.write_text(render_markdown(card))
    plot_curves(log, paths[2], card["nearest_gpt2"])
    return paths
