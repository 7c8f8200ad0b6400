"""
The chunked loss's gradients under float16 and bfloat16 autocast against autograd's loss on the full logits: every
parameter's gradient of a one-layer GPT with GPT-2's vocabulary, the loss scaled by 2^16 as GradScaler starts,
relative to the fp32 gradients (the norm of the difference over the norm).

    python bench/bench_loss_precision.py                                   # 8,192 tokens, 128 wide, chunks of 2,048
    python bench/bench_loss_precision.py --tokens 1024 --n-embd 32 --chunk 256

float16's smallest number is about 6e-8, and a non-target logit's gradient before the loss scale is about
1 / (50304 x tokens): the chunked loss computes it in the forward pass, before the scale can reach it (see
gpt2.py:ChunkedLinearCrossEntropy). The CPU runs float16 matmuls slowly: the default takes minutes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gpt2 import GPT, GPTConfig  # noqa: E402


def gradients(model: GPT, idx, targets, dtype, loss_chunk: int, scale: float = 2.0**16) -> torch.Tensor:
    """Every parameter's gradient, flattened, of the loss (times scale, then divided by it) under autocast."""
    with torch.autocast(idx.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        _, loss = model(idx, targets, loss_chunk=loss_chunk)
    grads = torch.autograd.grad(loss * scale, list(model.parameters()))
    return torch.cat([g.flatten().float() / scale for g in grads])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="tokens in the micro-batch (rows of 1,024 or fewer)")
    p.add_argument("--n-embd", type=int, default=128, help="the model's width")
    p.add_argument("--chunk", type=int, default=2048, help="--loss-chunk: tokens a chunk")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=1024, vocab_size=50304, n_layer=1, n_head=2, n_embd=a.n_embd)).to(a.device)
    T = min(a.tokens, 1024)
    g = torch.Generator().manual_seed(1)
    idx, targets = (torch.randint(0, 50257, (a.tokens // T, T), generator=g).to(a.device) for _ in range(2))
    want = gradients(model, idx, targets, None, 0)
    print(f"GPT-2's vocabulary, 1 layer {a.n_embd} wide, {a.tokens:,} tokens, chunks of {a.chunk:,}, on {a.device}; "
          "gradients' error relative to fp32:")
    print("| autocast | autograd, full logits | chunked loss |\n| --- | --- | --- |")
    for dtype in (torch.float16, torch.bfloat16):
        t0 = time.perf_counter()
        errors = [((gradients(model, idx, targets, dtype, chunk) - want).norm() / want.norm()).item()
                  for chunk in (0, a.chunk)]
        name, seconds = str(dtype).removeprefix("torch."), time.perf_counter() - t0
        print(f"| {name} | {errors[0]:.4%} | {errors[1]:.4%} |  ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
