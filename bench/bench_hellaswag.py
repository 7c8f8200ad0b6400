"""
HellaSwag speed: the batched evaluate() against the one-example-per-forward loop, same model, same data.

    python bench/bench_hellaswag.py                                   # CPU: random 4-layer 256-wide GPT, 64 examples
    python bench/bench_hellaswag.py -m gpt2 -d cuda --data-file hellaswag/hellaswag_val.jsonl -n 0 --batched-only

Prints examples/s of each path (median of --repeats runs, the two paths interleaved so both see the
same machine load), the ratio, and whether the two paths predict the same endings. On CUDA the clock
stops after a synchronize, and forwards run under bf16 autocast unless --dtype float32.

--breakdown also times the batched path with logits at every position (what packing alone buys) and
the time the batched path spends in the output layer (lm_head) alone. Exact scoring needs a full
vocab-sized logits row at every scored position, so one-at-a-time time / that time is the speed-up
batching would reach if everything but that matmul were free: a ceiling for this machine and model
(a fused matmul + logsumexp kernel that never writes the logits out could lower it a little).
Without --data-file the examples are synthetic, with HellaSwag's shape: a third short ActivityNet-like
contexts and endings, two thirds longer WikiHow-like ones (about 100 tokens per padded row, like the
real validation set's ~4M tokens over 40k rows).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the modules live one level up

import hellaswag as hs  # noqa: E402
from bench.machine import device_name  # noqa: E402
from gpt2 import GPT, GPTConfig
from support.distributed import resolve_device, setup_precision  # noqa: E402
from support.hf import load_model
from support.tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
# Synthetic HellaSwag-shaped examples (random words: only the lengths matter for speed)

WORDS = ("the a man woman boy girl dog people is are was starts begins continues then while after "
         "running walking holding putting into onto on in of with and camera table kitchen water "
         "ball bike rope paint brush shows you your should can will make sure before using it").split()


def synthetic_examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
        return " ".join(words).capitalize() + "."

    examples = []
    for i in range(n):
        if rng.random() < 1 / 3:  # ActivityNet-like: a sentence or two, short endings
            ctx, ends = text(8, 35), [text(5, 25) for _ in range(4)]
        else:  # WikiHow-like: a paragraph, long endings
            ctx, ends = text(30, 110), [text(15, 55) for _ in range(4)]
        examples.append(dict(ind=i, ctx=ctx, endings=ends, label=rng.randrange(4), split="val"))
    return examples


class FullLogits(torch.nn.Module):
    """The model without a visible lm_head: hellaswag then scores from logits at every position."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    def forward(self, idx):
        return self.inner(idx)


# -----------------------------------------------------------------------------
# Timing


class ModuleTimer:
    """Seconds spent inside one module's forward, summed over calls (synchronized on CUDA)."""

    def __init__(self, module, device):
        self.total, self.device, self._t0 = 0.0, device, 0.0
        self._hooks = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self, module, args):
        self._sync()
        self._t0 = time.perf_counter()

    def _stop(self, module, args, out):
        self._sync()
        self.total += time.perf_counter() - self._t0

    def remove(self):
        for h in self._hooks:
            h.remove()


def timed(fn, device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("-m", "--model", default="", help="HF name / HF folder / our .pt checkpoint (default: random GPT)")
    p.add_argument("--layers", type=int, default=4, help="random GPT: blocks")
    p.add_argument("--width", type=int, default=256, help="random GPT: n_embd (n_head = width // 64)")
    p.add_argument("--data-file", default="", help="a hellaswag jsonl (default: synthetic examples)")
    p.add_argument("-n", "--num-examples", type=int, default=64, help="examples to time (0: all of --data-file)")
    p.add_argument("-d", "--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bfloat16 autocast on cuda, float32 elsewhere")
    p.add_argument("--batch-size", type=int, default=0,
                   help="examples per forward of the batched path (0: hellaswag's default, 64 on cuda, 4 on cpu)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--batched-only", action="store_true", help="skip the slow loop (e.g. the full val set on a GPU)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the batched path with logits at every position (packing alone, no logits_at)")
    return p


def model_and_examples(args, device) -> tuple:
    """The model to time (a checkpoint, or a random GPT of --layers x --width), its name, and the examples."""
    if args.model:
        model, what = load_model(args.model, device), args.model
    else:
        torch.manual_seed(0)
        config = GPTConfig(block_size=1024, vocab_size=50304, n_layer=args.layers,
                           n_head=max(1, args.width // 64), n_embd=args.width)
        model, what = GPT(config).to(device).eval(), f"random GPT {args.layers}x{args.width}"
    if args.data_file:
        examples = hs.load_examples(data_file=args.data_file)
        examples = examples[:args.num_examples] if args.num_examples else examples
    else:
        examples = synthetic_examples(args.num_examples or 64)
    return model, what, examples


def describe(model, what: str, examples: list[dict]) -> None:
    enc = get_tokenizer()
    ctx = [len(enc.encode(ex["ctx"])) for ex in examples]
    ends = [len(enc.encode(" " + e)) for ex in examples for e in ex["endings"]]
    padded = sum(4 * (c + max(ends[4 * i:4 * i + 4])) for i, c in enumerate(ctx))
    print(f"model {what} ({sum(q.numel() for q in model.parameters()) / 1e6:.1f}M params) | {len(examples)} examples"
          f" | context {sum(ctx) / len(ctx):.1f} tokens, ending {sum(ends) / len(ends):.1f} tokens on average"
          f" | {padded:,} tokens in one-at-a-time forwards, {sum(ends):,} scored")


def measure(args, model, examples, device, autocast_dtype) -> tuple[dict, dict]:
    """Times per repeat: batched (b), one-at-a-time (u), batched with all-position logits (f), the output
    layer inside the batched run (h); and each path's last (sum, mean) losses, to compare predictions."""
    batched = lambda: hs.score_batched(model, examples, device, args.batch_size, autocast_dtype)
    full = FullLogits(model)
    batched_full = lambda: hs.score_batched(full, examples, device, args.batch_size, autocast_dtype)
    unbatched = lambda: hs.score_unbatched(model, examples, device, autocast_dtype)
    # warm-up: allocator, kernels, lazy inits; not timed
    hs.score_batched(model, examples[:8], device, args.batch_size, autocast_dtype)
    hs.score_unbatched(model, examples[:2], device, autocast_dtype)
    times, losses = {"b": [], "u": [], "f": [], "h": []}, {}
    for r in range(args.repeats):
        dt, losses["b"] = timed(batched, device)
        times["b"].append(dt)
        line = f"repeat {r}: batched {len(examples) / dt:8.1f} ex/s"
        if args.breakdown:
            timer = ModuleTimer(model.lm_head, device)  # a separate run: the hooks' syncs must not slow the one above
            timed(batched, device)
            timer.remove()
            times["h"].append(timer.total)
            line += f" (output layer alone {timer.total:.2f} s of {dt:.2f} s)"
            dt, _ = timed(batched_full, device)
            times["f"].append(dt)
            line += f" | batched, all-position logits {len(examples) / dt:8.1f} ex/s"
        if not args.batched_only:
            dt, losses["u"] = timed(unbatched, device)
            times["u"].append(dt)
            line += f" | one-at-a-time {len(examples) / dt:8.1f} ex/s"
        print(line, flush=True)
    return times, losses


def summarize(times: dict, losses: dict, n: int, batch_size: int) -> None:
    med = {k: statistics.median(v) for k, v in times.items() if v}
    summary = f"batched: {n / med['b']:.1f} examples/s (batch {batch_size} examples)"
    if "u" in med:
        (sum_b, avg_b), (sum_u, avg_u) = losses["b"], losses["u"]
        same = (sum_b.argmin(1) == sum_u.argmin(1)).float().mean().item()
        same_norm = (avg_b.argmin(1) == avg_u.argmin(1)).float().mean().item()
        summary += (f" | one-at-a-time: {n / med['u']:.1f} examples/s | speedup {med['u'] / med['b']:.2f}x"
                    f" | same predictions: acc {same:.0%}, acc_norm {same_norm:.0%}")
    if "f" in med:
        summary += f" | batched with all-position logits: {n / med['f']:.1f} examples/s"
    print(summary)
    if "h" in med and "u" in med:
        print(f"output layer (lm_head matmul) at the scored positions: {med['h']:.2f} s; were all else "
              f"free, batched would be {med['u'] / med['h']:.2f}x the one-at-a-time loop")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(resolve_device(args.device))
    autocast_dtype = setup_precision(args.dtype, device.type)
    dtype = "bfloat16" if autocast_dtype == torch.bfloat16 else "float32"
    print(f"device {device} ({device_name(device)}) | torch {torch.__version__} | dtype {dtype}")
    model, what, examples = model_and_examples(args, device)
    describe(model, what, examples)
    args.batch_size = args.batch_size or hs.default_batch_size(device)
    times, losses = measure(args, model, examples, device, autocast_dtype)
    summarize(times, losses, len(examples), args.batch_size)


if __name__ == "__main__":
    main()
