"""Generation speed with and without the KV cache: tokens/s at batch 1, median of several repeats.

    python bench/bench_generate.py                                   # random-init GPT-2 124M, the GPU if any
    python bench/bench_generate.py --prompt "The" --repeats 3
    python bench/bench_generate.py -m log/model_19072.pt --device cuda --dtype bfloat16
    python bench/bench_generate.py -m hf_out/                        # a GPT2LMHeadModel folder

Decoding is greedy (temperature 0), so both ways do the same work and must produce the same tokens.
Uncached generation recomputes the whole prefix for every new token; the cache computes one position.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import device_name  # noqa: E402
from gpt2 import GPT, GPTConfig
from support.hf import load_model  # noqa: E402
from support.tokenizer import get_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default=None,
                   help="HF name/folder or one of our .pt checkpoints (default: random-init GPT-2 124M)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--prompt", default="Hello, I'm a language model,", help="prompt text (GPT-2 tokenizer)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="instead of --prompt, a prompt of this many random token ids")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each kind; the median is reported")
    p.add_argument("--warmup-tokens", type=int, default=8, help="tokens generated once each way before timing")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        p.error("--repeats, --max-new-tokens and --batch-size must be at least 1")
    return args


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed_generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, use_cache: bool, device: str):
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(idx, max_new_tokens, temperature=0, use_cache=use_cache)
    sync(device)
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)

    if args.model is None:
        model = GPT(GPTConfig()).to(device)  # our own init; the weights do not matter for speed
        what = "random-init GPT-2 124M"
    else:
        model = load_model(args.model, device=device)
        what = args.model
    model = model.to(dtype).eval()
    cfg = model.config

    if args.prompt_tokens is not None:
        gen = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(0, min(cfg.vocab_size, 50257), (args.prompt_tokens,), generator=gen).tolist()
    else:
        prompt = get_tokenizer().encode(args.prompt, allowed_special={"<|endoftext|>"})
    if not prompt:
        raise SystemExit("the prompt is empty: give --prompt text or --prompt-tokens N (N >= 1)")
    if len(prompt) + args.max_new_tokens > cfg.block_size:
        raise SystemExit(f"prompt of {len(prompt)} tokens + {args.max_new_tokens} new tokens exceeds "
                         f"block_size={cfg.block_size}")
    idx = torch.tensor(prompt, dtype=torch.long, device=device).unsqueeze(0).repeat(args.batch_size, 1)

    print(f"device: {device} ({device_name(device)}) | torch {torch.__version__} | dtype {args.dtype}")
    print(f"model: {what}, {model.num_parameters() / 1e6:.2f}M parameters, vocab {cfg.vocab_size}, "
          f"block_size {cfg.block_size}")
    print(f"prompt: {len(prompt)} tokens | batch {args.batch_size} | {args.max_new_tokens} new tokens (greedy) | "
          f"median of {args.repeats} after a {args.warmup_tokens}-token warm-up", flush=True)

    times: dict[bool, list[float]] = {False: [], True: []}
    outputs: dict[bool, torch.Tensor] = {}
    with torch.inference_mode():
        if args.warmup_tokens > 0:
            for use_cache in (False, True):
                timed_generate(model, idx, args.warmup_tokens, use_cache, device)
        for r in range(args.repeats):  # interleaved, so a busy machine slows both alike
            for use_cache in (False, True):
                seconds, outputs[use_cache] = timed_generate(model, idx, args.max_new_tokens, use_cache, device)
                times[use_cache].append(seconds)
                print(f"  run {r + 1}/{args.repeats} {'cached' if use_cache else 'uncached'}: {seconds:.3f} s",
                      file=sys.stderr, flush=True)

    new_tokens = args.batch_size * args.max_new_tokens
    rate = {}
    for use_cache, label in ((False, "uncached"), (True, "cached")):
        median = statistics.median(times[use_cache])
        rate[use_cache] = new_tokens / median
        runs = ", ".join(f"{t:.2f}" for t in times[use_cache])
        print(f"{label:>8}: {rate[use_cache]:10.1f} tokens/s  (median {median:.3f} s; runs {runs} s)")
    print(f"speed-up: {rate[True] / rate[False]:.2f}x (cached / uncached)")
    same = torch.equal(outputs[True], outputs[False])
    print(f"same tokens both ways: {'yes' if same else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
