"""
Training speed and memory: ms/step, tokens/s, MFU and peak memory per rank of train_gpt2.py's own loop.

    python bench/bench_train.py                                      # GPT-2 124M, micro-batch 16/32/64 x compile on/off
    python bench/bench_train.py --data edu_fineweb10B --steps 50     # real shards instead of synthetic tokens
    python bench/bench_train.py --micro-batch-sizes 64 --compile on --loss-chunks 0,8192   # the chunked loss
    python bench/bench_train.py --nproc 8 --shards ddp,fsdp --activation-checkpointing off,on --micro-batch-sizes 16 \\
        --n-layer 48 --n-head 25 --n-embd 1600                 # GPT-2 XL's memory: sharding and recomputation
    python bench/bench_train.py --preset shakespeare --micro-batch-sizes 8 --compile off --loss-chunks 0,1024  # CPU
    python bench/bench_train.py --preset speedrun --recipes gpt2,modern --micro-batch-sizes 64   # the speedrun's
        # shape: GPT-2's recipe beside the modern one (Muon's step, RoPE, untied head, ...)

Each configuration runs train_gpt2.train() itself (the code a real run executes: autocast, compile,
fused AdamW, clipping, the loss all-reduce, FSDP) for --warmup steps, which are not timed (compilation,
allocator, cuDNN autotuning), and then --steps timed steps. It sweeps micro-batch, compile, --recipe,
--loss-chunk, --shard, --activation-checkpointing and --dtype; each row's speed is compared with its baseline,
the first configuration of the same micro-batch and compile setting (the first recipe listed, loss chunk 0 and
the first shard, checkpointing and dtype listed), measured in the same run. MFU counts the model's FLOPs
(support/metrics.py:flops_per_token), not the optimizer's: Muon's Newton-Schulz iterations cost time, not MFU. A step
is one micro-batch per rank (no gradient accumulation), as in the reference's "ms per 16x1024-token step".
Timing and MFU come from the loop's own per-step numbers (it synchronizes the GPU before stopping the clock):
the medians are printed.

Each configuration runs in fresh processes: `python` for one rank, `torchrun --nproc_per_node N` for
--nproc N (fsdp needs 2 or more). Peak memory per rank is torch.cuda.max_memory_allocated on a GPU and
the process's peak resident set on a CPU, where glibc's mmap threshold is fixed (MALLOC_MMAP_THRESHOLD_)
so that freed tensors leave the resident set instead of staying in the heap's cache.

Flags it does not know go to train_gpt2.py (model size, --seq-len, --device, ...). Without --data the
tokens are random (the speed of a step does not depend on them). The output is a markdown table with the
device, torch version and date, to paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the modules live one level up

import train_gpt2 as tg  # noqa: E402
from bench.machine import device_name  # noqa: E402
from support.distributed import DTYPES, resolve_device
from support.metrics import peak_memory_gib
from support.recipes import RECIPES, SHARDS


class _Done(Exception):
    """Raised from on_step after the last timed step: ends the run before its final checkpoint."""


def synthetic_shards(folder: Path, tokens: int, vocab: int, seed: int = 0) -> Path:
    """One train shard of random tokens in fineweb.py's format."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(folder / "synthetic_train_000001.npy", rng.integers(0, vocab, size=tokens, dtype=np.uint16))
    return folder


def _out_of_memory(e: BaseException | None) -> bool:
    """An out-of-memory error, also when compilation wraps it in another exception."""
    while e is not None:
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def run_config(train_args: list[str], warmup: int, steps: int, cuda: bool) -> dict:
    """Train for warmup + steps steps; the timed steps' dt/tok/s/MFU and the peak memory.

    Runs in a fresh process per configuration (see main): nothing compiled, cached or allocated by one
    configuration is there for the next, and on a CPU the process's peak RSS is this configuration's.
    """
    cfg = tg.parse_train_args(train_args + ["--max-steps", str(warmup + steps + 1)])
    timed = []

    def on_step(step, stats):
        if step >= warmup:
            timed.append((stats["dt"], stats["tokens_per_sec"], stats["mfu"]))
        if step == warmup + steps - 1:
            raise _Done

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    log = io.StringIO()  # the loop's per-step lines: shown only if the run fails
    try:
        with contextlib.redirect_stdout(log):
            tg.train(cfg, on_step=on_step)
    except _Done:
        pass
    except BaseException as e:
        if _out_of_memory(e):
            return {"oom": True}
        print(log.getvalue(), file=sys.stderr)
        raise
    # tokens/s and MFU from the median step time (with an even count, medians of tokens/s would not match it)
    step_s = statistics.median(dt for dt, _, _ in timed)
    tok_s = cfg.micro_batch_size * cfg.seq_len / step_s
    dt0, _, mfu0 = timed[0]
    mfu = mfu0 * dt0 / step_s if mfu0 is not None else None  # MFU is inversely proportional to the step time
    peak = peak_memory_gib("cuda" if cuda else "cpu")  # the current GPU's (each rank's own), or the peak RSS
    return {"oom": False, "ms": 1000 * step_s, "tok_s": tok_s, "mfu": mfu, "peak_gib": peak}


def worker(result: str, train_args: list[str], warmup: int, steps: int) -> None:
    """One configuration, in this process (one of torchrun's ranks, or alone): its result as JSON in
    result.RANK."""
    cfg = tg.parse_train_args(train_args)
    cuda = resolve_device(cfg.device).startswith("cuda")
    r = run_config(train_args, warmup, steps, cuda)
    Path(f"{result}.{os.environ.get('RANK', '0')}").write_text(json.dumps(r))


def launch(run_args: list[str], nproc: int, warmup: int, steps: int, folder: Path, cuda: bool) -> dict:
    """Run one configuration in fresh processes; rank 0's timing, every rank's peak memory."""
    result = folder / "result"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(torchrun if nproc > 1 else [sys.executable]), __file__, "--worker", str(result), "--warmup",
           str(warmup), "--steps", str(steps), "--", *run_args]
    env = dict(os.environ) if cuda else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    ranks = [json.loads(p.read_text()) for p in sorted(folder.glob("result.*"), key=lambda p: int(p.suffix[1:]))]
    if len(ranks) < nproc or out.returncode != 0 and not any(r["oom"] for r in ranks):
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit(f"bench_train.py: a configuration failed: {' '.join(run_args)}")
    if any(r["oom"] for r in ranks):
        return {"oom": True}
    return {**ranks[0], "peaks": [r["peak_gib"] for r in ranks]}


def sweep(args, train_flags: list[str]) -> list[tuple]:
    """The configurations: (micro-batch, compile, recipe, loss chunk, shard, activation checkpointing, dtype).
    Without --recipes, the recipe is the train flags' own (--recipe, or a preset's)."""
    split = lambda v: [c.strip() for c in v.split(",")]
    batch_sizes = [int(b) for b in split(args.micro_batch_sizes)]
    compile_modes, shards, acs, dtypes = (split(v) for v in (args.compile, args.shards, args.activation_checkpointing,
                                                             args.dtypes))
    recipes = split(args.recipes) if args.recipes else [tg.parse_train_args(train_flags).recipe]
    loss_chunks = sorted({int(c) for c in split(args.loss_chunks)})  # 0 first: the baseline of the others
    bad = [f"--compile {c}" for c in compile_modes + acs if c not in ("on", "off")]
    bad += [f"--shards {s}" for s in shards if s not in SHARDS] + [f"--dtypes {d}" for d in dtypes
                                                                      if d not in DTYPES]
    bad += [f"--recipes {r}" for r in recipes if r not in RECIPES]
    if bad or min(batch_sizes) < 1 or min(loss_chunks) < 0 or args.steps < 1:
        raise ValueError(f"{', '.join(bad) or 'a number'} not understood: --compile and --activation-checkpointing "
                         "take on/off, --shards ddp/fsdp, --dtypes auto/bfloat16/float16/float32, --recipes "
                         f"{'/'.join(RECIPES)}, --micro-batch-sizes positive integers, --loss-chunks integers >= 0, "
                         "--steps at least 1")
    if "fsdp" in shards and args.nproc < 2:
        raise ValueError("--shards fsdp needs --nproc 2 or more (the model is split over the ranks)")
    return list(itertools.product(batch_sizes, compile_modes, recipes, loss_chunks, shards, acs, dtypes))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                epilog="Other flags are train_gpt2.py's (e.g. --seq-len, --n-layer, --device).")
    p.add_argument("--data", default="", help="a shard folder (default: random tokens in a temporary folder)")
    p.add_argument("--micro-batch-sizes", default="16,32,64", help="comma-separated sequences per step to sweep")
    p.add_argument("--compile", default="on,off", help="comma-separated: on, off or both")
    p.add_argument("--recipes", default="", help="comma-separated --recipe values (gpt2, modern) to sweep "
                                                 "(default: the train flags' own)")
    p.add_argument("--loss-chunks", default="0", help="comma-separated --loss-chunk values to sweep (0: one matmul)")
    p.add_argument("--shards", default="ddp", help="comma-separated --shard values: ddp, fsdp (needs --nproc >= 2)")
    p.add_argument("--activation-checkpointing", default="off", help="comma-separated: off, on or both")
    p.add_argument("--dtypes", default="auto", help="comma-separated --dtype values (auto, bfloat16, float16, float32)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per configuration (torchrun on this machine)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--steps", type=int, default=20, help="timed steps; medians are reported")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one configuration, write its result here
    args, train_flags = p.parse_known_args(argv)
    train_flags = [f for f in train_flags if f != "--"]
    if args.worker:
        return worker(args.worker, train_flags, args.warmup, args.steps)
    try:
        configs = sweep(args, train_flags)
    except ValueError as e:
        p.error(str(e))
    base = tg.parse_train_args(train_flags)  # the train flags, checked once up front
    T = base.seq_len
    device = resolve_device(base.device, args.nproc)
    cuda = device.startswith("cuda")

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        most = max(c[0] for c in configs) * T * args.nproc * (args.warmup + args.steps + 2) + 1
        data = Path(args.data) if args.data else synthetic_shards(tmp / "data", most, min(base.vocab_size, 50257))
        print(f"{datetime.date.today()} | {device} ({device_name(device)}) x {args.nproc} rank(s) | torch "
              f"{torch.__version__} | data {'random tokens' if not args.data else data} | T={T} | {args.warmup} "
              f"warm-up + {args.steps} timed steps, one micro-batch per rank each")
        print("\n| micro-batch | compile | recipe | loss chunk | shard | act. ckpt | dtype | ms/step | speed vs "
              "baseline | tokens/s | MFU | peak memory per rank |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        baseline = {}  # (B, compile) -> ms/step of its first configuration
        for i, (B, mode, recipe, chunk, shard, ac, dtype) in enumerate(configs):
            run_args = [*train_flags, "--recipe", recipe, "--data", str(data), "--log-dir", str(tmp / f"log_{i}"),
                        "--micro-batch-size", str(B), "--total-batch-size", str(B * T * args.nproc),
                        "--loss-chunk", str(chunk), "--shard", shard, "--dtype", dtype, "--eval-interval", "0",
                        "--target-val-loss", "0", "--no-hellaswag", "--num-samples", "0",
                        "--compile" if mode == "on" else "--no-compile",
                        "--activation-checkpointing" if ac == "on" else "--no-activation-checkpointing"]
            (tmp / f"result_{i}").mkdir()
            r = launch(run_args, args.nproc, args.warmup, args.steps, tmp / f"result_{i}", cuda)
            row = f"| {B} | {mode} | {recipe} | {chunk or '-'} | {shard} | {ac} | {dtype} | "
            if r["oom"]:
                print(row + "out of memory | | | | |", flush=True)
                continue
            baseline.setdefault((B, mode), r["ms"])
            ratio = f"{baseline[B, mode] / r['ms']:.2f}x"
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            peaks = ", ".join(f"{g:.2f}" for g in r["peaks"])
            tok_s = r["tok_s"] * args.nproc
            print(row + f"{r['ms']:.2f} | {ratio} | {tok_s:,.0f} | {mfu} | {peaks} GiB |", flush=True)


if __name__ == "__main__":
    main()
