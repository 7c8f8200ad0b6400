"""Sampling: one set of settings for `train_gpt2.py sample` and for training's in-loop samples, the prompt -> text
path around GPT.generate (the tokenizer on both sides, a seeded generator), and the `sample` command itself."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch

from gpt2 import GPT
from support.distributed import resolve_device
from support.flags import add_dataclass_flags
from support.hf import load_model
from support.tokenizer import get_tokenizer


@dataclass
class SampleConfig:
    prompt: str = "Hello, I'm a language model,"  # the text the samples continue
    num_samples: int = 4  # samples to draw (in training: per rank, at each evaluation)
    max_new_tokens: int = 32  # new tokens per sample; prompt + new tokens must fit the block size (no cropping)
    top_k: int = 50  # sample among the k most likely tokens (0: all)
    temperature: float = 1.0  # 0 is greedy decoding


SAMPLE_FLAG_ALIASES = {  # other names these flags are accepted under
    "num_samples": dict(aliases=["--num-return-sequences"]),
    "max_new_tokens": dict(aliases=["--sample-tokens"]),
}


def sample_text(model: GPT, settings: SampleConfig, seed: int = 42, device: str = "cpu",
                use_cache: bool = True) -> list[str]:
    """Sample completions of settings.prompt; the same seed gives the same text."""
    enc = get_tokenizer()
    tokens = enc.encode(settings.prompt, allowed_special={"<|endoftext|>"})
    idx = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(0).repeat(settings.num_samples, 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, settings.max_new_tokens, temperature=settings.temperature, top_k=settings.top_k,
                         generator=generator, use_cache=use_cache)
    return [enc.decode(row.tolist()) for row in out]


def sample_main(argv: list[str]) -> None:
    """`train_gpt2.py sample -m MODEL`."""
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
