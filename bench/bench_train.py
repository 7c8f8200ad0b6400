"""
Training speed: ms/step, tokens/s, MFU and peak memory of train_gpt2.py's own training loop.

    python bench/bench_train.py                                      # GPT-2 124M, micro-batch 16/32/64 x compile on/off
    python bench/bench_train.py --data edu_fineweb10B --steps 50     # real shards instead of synthetic tokens
    python bench/bench_train.py --micro-batch-sizes 64 --compile on --loss-chunks 0,8192   # the chunked loss
    python bench/bench_train.py --preset shakespeare --micro-batch-sizes 8 --compile off --loss-chunks 0,1024  # CPU

Each configuration runs train_gpt2.train() itself (the code a real run executes: autocast, compile,
fused AdamW, clipping, the loss all-reduce) for --warmup steps, which are not timed (compilation,
allocator, cuDNN autotuning), and then --steps timed steps. It sweeps micro-batch, compile and
--loss-chunk; each loss chunk is compared with the one-matmul loss (0) of the same micro-batch and
compile setting. A step is one micro-batch (no gradient accumulation), as in the reference's "ms per
16x1024-token step". Timing and MFU come from the loop's own per-step numbers (it synchronizes the GPU
before stopping the clock): the medians are printed. Each configuration runs in a fresh process; its
peak memory is torch.cuda.max_memory_allocated on a GPU, the process's peak RSS on a CPU.

Flags it does not know go to train_gpt2.py (model size, --seq-len, --dtype, --device, ...). Without
--data the tokens are random (the speed of a step does not depend on them). The output is a markdown
table with the GPU, torch version and date, to paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import itertools
import multiprocessing
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the modules live one level up

import gpt2  # noqa: E402
import train_gpt2 as tg  # noqa: E402
from bench.machine import device_name  # noqa: E402


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
    import resource

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
    _, tok_s0, mfu0 = timed[0]
    mfu = tok_s * mfu0 / tok_s0 if mfu0 is not None else None  # MFU is proportional to tokens/s
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:  # Linux reports ru_maxrss in KiB
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"oom": False, "ms": 1000 * step_s, "tok_s": tok_s, "mfu": mfu, "peak_gib": peak}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                epilog="Other flags are train_gpt2.py's (e.g. --seq-len, --dtype, --n-layer).")
    p.add_argument("--data", default="", help="a shard folder (default: random tokens in a temporary folder)")
    p.add_argument("--micro-batch-sizes", default="16,32,64", help="comma-separated sequences per step to sweep")
    p.add_argument("--compile", default="on,off", help="comma-separated: on, off or both")
    p.add_argument("--loss-chunks", default="0", help="comma-separated --loss-chunk values to sweep (0: one matmul)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--steps", type=int, default=20, help="timed steps; medians are reported")
    args, train_flags = p.parse_known_args(argv)
    batch_sizes = [int(b) for b in args.micro_batch_sizes.split(",")]
    compile_modes = [c.strip() for c in args.compile.split(",")]
    loss_chunks = sorted({int(c) for c in args.loss_chunks.split(",")})  # 0 first: the baseline of the others
    if any(c not in ("on", "off") for c in compile_modes) or min(batch_sizes) < 1 or min(loss_chunks) < 0 \
            or args.steps < 1:
        p.error("--compile takes on/off, --micro-batch-sizes positive integers, --loss-chunks integers >= 0, "
                "--steps at least 1")
    base = tg.parse_train_args(train_flags)  # the train flags, checked once up front
    T = base.seq_len
    dist = gpt2.Dist(device=gpt2.resolve_device(base.device))
    cuda = dist.device_type == "cuda"

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        most = max(batch_sizes) * T * (args.warmup + args.steps + 2) + 1
        data = Path(args.data) if args.data else synthetic_shards(tmp / "data", most, min(base.vocab_size, 50257))
        print(f"{datetime.date.today()} | {dist.device} ({device_name(dist.device)}) | torch {torch.__version__} | "
              f"data {'random tokens' if not args.data else data} | T={T} | {args.warmup} warm-up + {args.steps} "
              f"timed steps, one micro-batch each")
        print("\n| micro-batch | compile | loss chunk | ms/step | speed vs chunk 0 | tokens/s | MFU | peak memory |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        baseline = {}  # (B, compile) -> ms/step with one matmul, to compare each loss chunk with
        for B, mode, chunk in itertools.product(batch_sizes, compile_modes, loss_chunks):
            run_args = [*train_flags, "--data", str(data), "--log-dir", str(tmp / f"log_{B}_{mode}_{chunk}"),
                        "--micro-batch-size", str(B), "--total-batch-size", str(B * T), "--loss-chunk", str(chunk),
                        "--eval-interval", "0", "--no-hellaswag", "--num-samples", "0",
                        "--compile" if mode == "on" else "--no-compile"]
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                r = pool.submit(run_config, run_args, args.warmup, args.steps, cuda).result()
            row = f"| {B} | {mode} | {chunk or '-'} | "
            if r["oom"]:
                print(row + "out of memory | | | | |", flush=True)
                continue
            if chunk == 0:
                baseline[B, mode] = r["ms"]
            ratio = f"{baseline[B, mode] / r['ms']:.2f}x" if (B, mode) in baseline else "-"
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            peak = f"{r['peak_gib']:.2f} GiB"
            print(row + f"{r['ms']:.2f} | {ratio} | {r['tok_s']:,.0f} | {mfu} | {peak} |", flush=True)


if __name__ == "__main__":
    main()
