"""
GPT-2: the model of the lecture, with Hugging Face's parameter names so that OpenAI's weights load 1:1.

    model = GPT(GPTConfig())                                   # GPT-2 124M, randomly initialised
    logits, loss = model(idx, targets)                         # idx, targets (B, T) token ids
    out = model.generate(idx, max_new_tokens=32)               # sampling, with a KV cache

Sections: configuration, the transformer (attention, MLP, block, GPT), the modern options (RMSNorm, rotary
embeddings, ReLU^2), the KV cache, the chunked loss. GPT-2's architecture is the default; every option that
changes it is a field of ModelOptions, chosen at construction so that forward reads plainly.

This module imports nothing of the project: the scripts and the supporting modules (support/) import it.
Loading weights from Hugging Face and exporting them is support/hf.py; our checkpoints, support/checkpoints.py;
the tokenizer, support/tokenizer.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

GPT2_VOCAB_SIZE = 50257  # real tokens: 50,000 BPE merges + 256 bytes + <|endoftext|>; training pads past it

# -----------------------------------------------------------------------------
# Configuration: GPT-2's shape, and the options that change its architecture (all off by default)

MODEL_CHOICES = {"pos_emb": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "relu2"),
                 "init": ("gpt2", "nanochat")}
VE_GATE_CHANNELS = 12  # --value-embeds: each gate reads the first 12 channels of the attention's input (nanochat's)
SMEAR_CHANNELS = 24  # --smear: its gate reads the first 24 channels of the embedding


@dataclass(kw_only=True)
class ModelOptions:
    """What a model may change of GPT-2's architecture; the defaults are GPT-2 exactly. Every field is a training
    flag and is saved in checkpoints (with GPTConfig's shape). The modern recipe (train_gpt2.py --recipe modern)
    turns them on together, as in modded-nanogpt and nanochat."""

    pos_emb: str = "learned"  # learned: GPT-2's position embeddings (wpe); rope: rotary embeddings on q and k
    rope_base: float = 10000.0  # rope: the base of the rotation frequencies
    norm: str = "layernorm"  # layernorm: GPT-2's (weight, bias); rmsnorm: no parameters, also right after wte
    qk_norm: bool = False  # RMS-normalise each head's queries and keys (after RoPE) before attention
    mlp: str = "gelu"  # gelu: GPT-2's tanh GELU; relu2: ReLU squared
    bias: bool = True  # biases in every linear layer and LayerNorm (GPT-2's); off: none
    split_qkv: bool = False  # q, k, v as three matrices (c_q, c_k, c_v) instead of GPT-2's c_attn (Muon needs it)
    tie_embeddings: bool = True  # lm_head shares wte's matrix (GPT-2); untied: a matrix of its own, zero at init
    zero_init_proj: bool = False  # attention's and the MLP's output projections (c_proj) start at zero
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap); 0: off (GPT-2)
    # nanochat's (karpathy/nanochat, gpt.py), each alone too:
    qk_gain: float = 1.0  # q and k times this after QK-norm (nanochat: 1.2, attention's logits x 1.44)
    value_embeds: bool = False  # ResFormer's value embeddings: on alternate layers (the last included) a token
    #                             embedding of its own added to v, through a learned gate per head
    layer_scalars: bool = False  # learned per-layer scalars: block i reads resid_lambdas[i] * x + x0_lambdas[i] * x0
    #                              (x0: what the first block reads: the embedding, after ln_e and --smear)
    smear: bool = False  # each position's embedding plus a learned, gated share of the previous position's
    backout: bool = False  # the middle layer's residual stream, times a learned scalar, subtracted before ln_f
    init: str = "gpt2"  # gpt2: normal(0.02), residual projections scaled down; nanochat: wte normal(0.8), lm_head
    #                     normal(0.001), the blocks' matrices uniform (c_fc x 0.4), their projections zero


@dataclass
class GPTConfig(ModelOptions):
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50257  # 50,000 BPE merges + 256 bytes + <|endoftext|>; training pads to 50304
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads
    n_embd: int = 768  # embedding width

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for name, choices in MODEL_CHOICES.items():
            if getattr(self, name) not in choices:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {getattr(self, name)}: use one of {', '.join(choices)}")
        if self.logit_softcap < 0:
            raise ValueError(f"--logit-softcap {self.logit_softcap}: give a cap > 0, or 0 for none")
        if self.rope_base <= 0:
            raise ValueError(f"--rope-base {self.rope_base}: give a base > 0 (e.g. 10000)")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"--pos-emb rope rotates pairs of a head's dimensions: head size "
                             f"{self.n_embd // self.n_head} (n_embd / n_head) must be even")
        if self.qk_gain <= 0 or (self.qk_gain != 1 and not self.qk_norm):
            raise ValueError(f"--qk-gain {self.qk_gain} scales the normalised q and k: give a gain > 0, with --qk-norm")
        if self.init == "nanochat" and self.tie_embeddings:
            raise ValueError("--init nanochat gives wte (std 0.8) and lm_head (std 0.001) scales of their own: add "
                             "--no-tie-embeddings")
        least = max(VE_GATE_CHANNELS * self.value_embeds, SMEAR_CHANNELS * self.smear)
        if self.n_embd < least:
            raise ValueError(f"--value-embeds' gates read {VE_GATE_CHANNELS} channels, --smear's {SMEAR_CHANNELS}: "
                             f"n_embd={self.n_embd} is too narrow")

    def value_embed_layers(self) -> list[int]:
        """--value-embeds' layers: every other one, ending with the last (nanochat's has_ve)."""
        L = self.n_layer
        return [i for i in range(L) if i % 2 == (L - 1) % 2] if self.value_embeds else []

    def norm_parameters(self) -> int:
        """One norm's: LayerNorm's gain (C) and bias (C, unless --no-bias); RMSNorm has none."""
        return 0 if self.norm == "rmsnorm" else self.n_embd * (1 + self.bias)

    def block_parameters(self) -> int:
        """One block's: two norms, q/k/v (3C^2 + 3C, fused or split alike), attn.c_proj (C^2 + C), c_fc
        (4C^2 + 4C), mlp.c_proj (4C^2 + C); the biases (9C in all) unless --no-bias."""
        C = self.n_embd
        return 12 * C * C + 9 * C * self.bias + 2 * self.norm_parameters()

    def lookup_parameters(self) -> int:
        """The embeddings that are looked up, never multiplied: an untied wte, --value-embeds' tables."""
        C = self.n_embd
        return self.vocab_size * C * ((not self.tie_embeddings) + len(self.value_embed_layers()))

    def num_parameters(self) -> int:
        """GPT.num_parameters() without building the model: wte (once, tied to lm_head; or an untied lm_head
        beside it), wpe (learned positions only), the blocks, ln_f; the nanochat options' tables, gates and
        scalars (block_parameters leaves out a value-embedding layer's gate, 12 x n_head)."""
        C, ve = self.n_embd, len(self.value_embed_layers())
        embeddings = self.vocab_size * C * (1 if self.tie_embeddings else 2)
        positions = self.block_size * C if self.pos_emb == "learned" else 0
        options = (ve * (self.vocab_size * C + VE_GATE_CHANNELS * self.n_head) + 2 * self.n_layer * self.layer_scalars
                   + (SMEAR_CHANNELS + 1) * self.smear + self.backout)
        return embeddings + positions + self.n_layer * self.block_parameters() + self.norm_parameters() + options




# -----------------------------------------------------------------------------
# The transformer: attention, MLP, the pre-norm block, and the GPT around them


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        C, bias = config.n_embd, config.bias
        if config.split_qkv:  # three matrices, so that Muon orthogonalises each alone
            self.c_q, self.c_k, self.c_v = (nn.Linear(C, C, bias=bias) for _ in range(3))
        else:
            self.c_attn = nn.Linear(C, 3 * C, bias=bias)  # q, k, v of all heads in one matmul
        self.c_proj = nn.Linear(C, C, bias=bias)
        self.c_proj.RESIDUAL_PROJ = True  # scaled at init: it adds into the residual stream
        self.c_proj.ZERO_INIT = config.zero_init_proj
        self.split_qkv = config.split_qkv
        self.rotary = Rotary(config) if config.pos_emb == "rope" else None  # GPT-2: positions added to wte
        self.qk_norm = RMSNorm() if config.qk_norm else None
        self.qk_gain = config.qk_gain
        if layer in config.value_embed_layers():  # how much of the value embedding each head takes, from x
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, config.n_head, bias=False)

    def qkv(self, x):
        """q, k, v (B, T, C) each."""
        if self.split_qkv:
            return self.c_q(x), self.c_k(x), self.c_v(x)
        return self.c_attn(x).split(self.n_embd, dim=2)

    def forward(self, x, kv_cache: KVCache | None = None, layer: int = 0, ve=None):
        B, T, C = x.size()
        q, k, v = self.qkv(x)
        if ve is not None:  # --value-embeds (ResFormer): v + gate * ve, the gate in (0, 3) per head and position
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))  # (B, T, nh)
            v = v + (gate.unsqueeze(-1) * ve.view(B, T, self.n_head, C // self.n_head)).view(B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.rotary is not None:  # the cache keeps k rotated: new tokens start at its position
            start = kv_cache.pos if kv_cache is not None else 0
            q, k = self.rotary(q, start), self.rotary(k, start)
        if self.qk_norm is not None:  # after RoPE, as nanochat (a rotation keeps the norm anyway)
            q, k = self.qk_norm(q), self.qk_norm(k)
        if self.qk_gain != 1:  # sharper attention than unit-norm q and k give (nanochat's 1.2)
            q, k = q * self.qk_gain, k * self.qk_gain
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
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 used the tanh approximation of GELU
        self.act = nn.GELU(approximate="tanh") if config.mlp == "gelu" else ReLUSquared()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_PROJ = True
        self.c_proj.ZERO_INIT = config.zero_init_proj

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, layer=0, ve=None):
        x = x + self.attn(self.ln_1(x), kv_cache, layer, ve)  # pre-LayerNorm: the residual path stays clean
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))  # token embeddings
        if config.pos_emb == "learned":  # GPT-2's; rope rotates q and k in each attention instead
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)  # learned position embeddings
        if config.norm == "rmsnorm":  # nanochat's: the embedding normalised too, before the first block
            modules["ln_e"] = RMSNorm()
        self.transformer = nn.ModuleDict(dict(
            **modules,
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        else:
            self.lm_head.ZERO_INIT = True  # modded-nanogpt's: the first steps predict the uniform distribution
        add_nanochat_options(self, config)  # value embeddings, layer scalars, smear, backout: where asked for
        self.apply(self._init_weights)
        if config.init == "nanochat":
            init_nanochat(self)
        init_nanochat_options(self)
        # training's memory lever (--activation-checkpointing): a block's activations are not kept for the
        # backward pass but computed again there, about a third more compute for a fraction of the memory
        self.activation_checkpointing = False

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_PROJ", False):
                std *= (2 * self.config.n_layer) ** -0.5  # two residual adds per block
            if getattr(module, "ZERO_INIT", False):  # --zero-init-proj's c_proj, an untied lm_head
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """All parameters, a tied wte/lm_head matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def real_vocab_size(self) -> int:
        """The tokens that exist: GPT-2's 50257 for a model padded for training (e.g. to 50304), else its own."""
        return GPT2_VOCAB_SIZE if self.config.vocab_size >= GPT2_VOCAB_SIZE else self.config.vocab_size

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
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:  # learned positions (GPT-2); with rope, each attention rotates q and k
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
            x = x + self.transformer.wpe(pos)  # (B, T, C)
        if "ln_e" in self.transformer:  # rmsnorm models normalise the embedding too
            x = self.transformer.ln_e(x)
        if self.config.smear:  # --smear: a share of the previous position's embedding
            x = smear(self, x, kv_cache)
        x0, middle = x, None
        for i, block in enumerate(self.transformer.h):
            if self.config.layer_scalars:  # --layer-scalars: how much of the stream, and of x0, block i reads
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None  # (B, T, C) or None
            if self.activation_checkpointing and kv_cache is None and torch.is_grad_enabled():
                # keep only the block's input; backward runs the block again for the rest
                x = checkpoint(block, x, None, i, ve, use_reentrant=False, preserve_rng_state=False)  # no dropout
            else:
                x = block(x, kv_cache, i, ve)
            if self.config.backout and i == self.config.n_layer // 2:
                middle = x
        if kv_cache is not None:
            kv_cache.pos += T
        if middle is not None:  # --backout: take out (a learned share of) the middle layer's features
            x = x - self.backout_lambda.to(x.dtype) * middle
        x = self.transformer.ln_f(x)
        cap = self.config.logit_softcap
        if targets is not None and loss_chunk > 0 and logits_at is None:
            loss = chunked_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1), loss_chunk,
                                         cap)
            return None, loss
        if logits_at is not None:
            x = x[logits_at]  # (M, C)
        logits = self.lm_head(x)  # (B, T, vocab_size), or (M, vocab_size)
        if cap > 0:  # tanh softcap (Gemma 2, modded-nanogpt), in fp32: logits within (-cap, cap)
            logits = cap * torch.tanh(logits.float() / cap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

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
        if use_cache:  # in the dtype attention computes in: under autocast, its dtype, not the fp32 weights'
            device_type = idx.device.type
            autocast = torch.is_autocast_enabled(device_type)
            dtype = torch.get_autocast_dtype(device_type) if autocast else self.lm_head.weight.dtype
            cache = KVCache(self.config, B, T + max_new_tokens, idx.device, dtype)
        vocab = self.real_vocab_size()  # never sample a padding token
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
                    logits.masked_fill_(logits < v[:, [-1]], -float("inf"))  # no host sync, unlike a masked assignment
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            out = torch.cat((out, nxt), dim=1)
            step_in = nxt
        return out


# -----------------------------------------------------------------------------
# The modern options (ModelOptions): ReLU^2, RMSNorm, rotary position embeddings


class ReLUSquared(nn.Module):
    """relu(x)^2 (modded-nanogpt's MLP; transformers' "relu2")."""

    def forward(self, x):
        return F.relu(x).square()


# RMSNorm's epsilon, inside the square root as in F.rms_norm. Fixed, rather than F.rms_norm's default (the
# dtype's machine epsilon, which would change under autocast), and equal to transformers' NanoChatConfig default
# rms_norm_eps, which the export writes: the exported model then normalises exactly as ours.
RMS_NORM_EPS = 1e-6


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) over the last dimension, with no gain or bias (nanochat's, modded-nanogpt's).
    In fp32 under autocast, as LayerNorm is there, then back to the input's dtype (transformers' NanoChat too)."""

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), eps=RMS_NORM_EPS).type_as(x)


def make_norm(config: GPTConfig) -> nn.Module:
    """The blocks' and the final norm: GPT-2's LayerNorm (gain, and bias unless --no-bias), or RMSNorm."""
    return RMSNorm() if config.norm == "rmsnorm" else nn.LayerNorm(config.n_embd, bias=config.bias)


class Rotary(nn.Module):
    """Rotary position embeddings (RoPE): each head's dimensions in two halves x1, x2 (hs/2 each), pair j
    rotated by the angle -pos * base^(-2j/hs):

        y1 = x1 cos + x2 sin,   y2 = -x1 sin + x2 cos

    The convention of nanochat and modded-nanogpt, and of transformers' NanoChat (its rotate_half flips the
    usual sign), so that an export computes the same attention: the usual +angle would be another model.
    The cos/sin tables are non-persistent buffers, computed in fp32 at construction: no state dict entry."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hs = config.n_embd // config.n_head
        inv_freq = 1.0 / config.rope_base ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs)  # (hs/2,)
        angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)  # (block_size, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x, start: int = 0):
        """x (B, nh, T, hs) at positions start .. start+T-1 (a KV cache's new tokens start past the prefix)."""
        T = x.size(2)
        cos, sin = self.cos[start:start + T].to(x.dtype), self.sin[start:start + T].to(x.dtype)  # (T, hs/2)
        x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)  # (B, nh, T, hs)


# -----------------------------------------------------------------------------
# nanochat's options (ModelOptions): value embeddings, per-layer scalars, smear, backout, and its initialisation.
# Their parameters sit at the model's top level under nanochat's names (value_embeds.<layer>, resid_lambdas,
# x0_lambdas, smear_gate, smear_lambda, backout_lambda), a value-embedding layer's gate in its attention (ve_gate).


def add_nanochat_options(model: GPT, config: GPTConfig) -> None:
    """The parameters of the options asked for (none for GPT-2: its state dict is unchanged)."""
    V, C, L = config.vocab_size, config.n_embd, config.n_layer
    model.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, C) for i in config.value_embed_layers()})
    if config.layer_scalars:  # their values are set by init_nanochat_options
        model.resid_lambdas = nn.Parameter(torch.ones(L))  # (L,)
        model.x0_lambdas = nn.Parameter(torch.zeros(L))  # (L,)
    if config.smear:
        model.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
        model.smear_lambda = nn.Parameter(torch.zeros(1))
    if config.backout:
        model.backout_lambda = nn.Parameter(torch.zeros(1))


@torch.no_grad()
def init_nanochat_options(model: GPT) -> None:
    """The options' own starting values, as nanochat's init_weights sets them: gates uniform in [0, 0.02) (just
    above neutral), the smear off (lambda 0), backout 0.2, and per-layer scalars from 1.15 (resid) and 0.20 (x0) at
    the first layer to 1.05 and 0.05 at the last: early layers amplify their input and read more of x0."""
    L = model.config.n_layer
    for gate in [*(b.attn.ve_gate for b in model.transformer.h if hasattr(b.attn, "ve_gate")),
                 *([model.smear_gate] if model.config.smear else [])]:
        nn.init.uniform_(gate.weight, 0.0, 0.02)
    if model.config.layer_scalars:
        depth = torch.arange(L, dtype=torch.float32) / max(L - 1, 1)  # 0 .. 1
        model.resid_lambdas.copy_(1.15 - 0.10 * depth)
        model.x0_lambdas.copy_(0.20 - 0.15 * depth)
    if model.config.backout:
        model.backout_lambda.fill_(0.2)


@torch.no_grad()
def init_nanochat(model: GPT) -> None:
    """--init nanochat: wte normal(0.8) (nanochat normalises it: with --norm rmsnorm, ln_e), lm_head
    normal(0.001); the blocks' q, k, v (or c_attn) uniform in +-s, s = sqrt(3 / n_embd) (the std of
    normal(1/sqrt(n_embd)) without its outliers), c_fc in +-0.4 s, both projections zero; value embeddings as v's
    matrix."""
    s = (3 / model.config.n_embd) ** 0.5
    nn.init.normal_(model.transformer.wte.weight, mean=0.0, std=0.8)
    nn.init.normal_(model.lm_head.weight, mean=0.0, std=0.001)
    for block in model.transformer.h:
        attn = block.attn
        for linear in (attn.c_q, attn.c_k, attn.c_v) if attn.split_qkv else (attn.c_attn,):
            nn.init.uniform_(linear.weight, -s, s)
        nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
        nn.init.zeros_(attn.c_proj.weight)
        nn.init.zeros_(block.mlp.c_proj.weight)
    for table in model.value_embeds.values():
        nn.init.uniform_(table.weight, -s, s)


def smear(model: GPT, x: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
    """--smear: x (B, T, C) with, from the sequence's second position on, x[t] + lambda * sigmoid(gate(x[t, :24]))
    * x[t-1] (a cheap bigram: what came just before). With a KV cache, the cache keeps the last position's
    embedding, so the first new position reads the one before it as the whole forward does."""
    start = kv_cache.pos if kv_cache is not None else 0
    if start > 0:  # the first new position's previous one is in the cache
        cur, prev = x, torch.cat([kv_cache.last_embedding, x[:, :-1]], dim=1)
    else:  # the first position has none: unchanged
        cur, prev = x[:, 1:], x[:, :-1]
    gate = model.smear_lambda.to(x.dtype) * torch.sigmoid(model.smear_gate(cur[..., :model.smear_gate.in_features]))
    out = cur + gate * prev
    if kv_cache is not None:
        kv_cache.last_embedding = x[:, -1:]
    return out if start > 0 else torch.cat([x[:, :1], out], dim=1)


# -----------------------------------------------------------------------------
# The KV cache: generation's keys and values, so each new token costs one position


class KVCache:
    """Preallocated keys/values of every layer, so a new token attends to the prefix in O(1) work."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached
        self.last_embedding = None  # --smear: the last cached position's embedding (B, 1, C)

    def repeat(self, batch_size: int, max_len: int) -> KVCache:
        """A cache of batch_size rows (up to max_len positions), each starting with this one's row: a prefix
        computed once for many continuations."""
        out = copy.copy(self)  # every field; the tensors then made anew
        L, _, nh, _, hs = self.k.shape
        out.k, out.v = (t.new_zeros(L, batch_size, nh, max_len, hs) for t in (self.k, self.v))
        out.k[:, :, :, :self.pos], out.v[:, :, :, :self.pos] = self.k[:, :1, :, :self.pos], self.v[:, :1, :, :self.pos]
        out.pos = self.pos
        out.last_embedding = None if self.last_embedding is None else self.last_embedding[:1].expand(batch_size, -1, -1)
        return out

    def update(self, layer: int, k, v):
        T = k.size(2)
        end = self.pos + T
        if end > self.k.size(3):
            raise ValueError(f"KV cache holds {self.k.size(3)} positions, asked for {end}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# -----------------------------------------------------------------------------
# The chunked loss (--loss-chunk): the output layer and cross-entropy without all the logits at once


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

    softcap > 0 caps the logits first, z -> softcap * tanh(z / softcap) (in fp32), as GPT.forward does; the
    chain rule then multiplies the logits' gradient by 1 - tanh^2.

    float16: the logits' gradient is computed before the loss scale (GradScaler's) reaches it, and its entries
    for unlikely tokens (~1 / (vocab x count)) lie below float16's smallest number. So it goes into float16 times
    the largest power of two A that keeps it and both matmuls' results within float16's range (fp16_scale), and
    the results are divided by A in fp32: autograd's float16 loss, whose gradient carries the loss scale, is as
    exact. bfloat16 has float32's range and takes the plain path.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, dtype: torch.dtype, grads: bool, softcap: float = 0.0):
        valid = targets != -1  # (N,)
        count = valid.sum().clamp(min=1).float()
        grad_h = torch.empty_like(h) if grads and ctx.needs_input_grad[0] else None  # (N, C)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if grads and ctx.needs_input_grad[1] else None
        w = weight.to(dtype)  # (V, C)
        w_max = torch.linalg.vector_norm(weight.detach(), float("inf")) if dtype == torch.float16 else None
        w_in = w / softcap if softcap > 0 else w  # the cap's 1/softcap folded into the (V, C) matrix, not (n, V)
        # the capped logits' buffer, allocated once: a fresh (n, V) tensor per chunk costs its page faults each time
        capped = torch.empty(min(chunk, h.size(0)), w.size(0), device=h.device) if softcap > 0 else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.size(0), chunk):
            hc, yc, vc = h[i:i + chunk].to(dtype), targets[i:i + chunk].clamp(min=0), valid[i:i + chunk]
            logits = (hc @ w_in.T).float()  # (n, V); with a softcap, the raw logits / softcap
            if softcap > 0:
                tanh = logits.tanh_()  # in place: the raw logits are not needed again
                logits = torch.mul(tanh, softcap, out=capped[:tanh.size(0)])  # (n, V), capped
            lse = torch.logsumexp(logits, dim=1)  # (n,)
            loss += ((lse - logits.gather(1, yc[:, None]).squeeze(1)) * vc).sum()
            if grad_h is None and grad_w is None:
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place: the logits are not needed again
            g.scatter_add_(1, yc[:, None], torch.full_like(lse[:, None], -1.0))  # - one-hot
            if softcap > 0:
                g.addcmul_(g, tanh.square_(), value=-1.0)  # x (d capped / d raw = 1 - tanh^2), in one pass
            if w_max is None:
                g, unscale = g.mul_((vc / count)[:, None]).to(dtype), None  # d(mean loss)/d logits; ignored rows 0
            else:  # float16: times A, the gradient over the count in fp32 after the matmuls
                scale = fp16_scale(g.mul_(vc[:, None]), hc, w_max)
                g, unscale = g.mul_(scale).to(dtype), 1.0 / (scale * count)
            if grad_h is not None:
                grad_h[i:i + chunk] = g @ w if unscale is None else (g @ w).float() * unscale
            if grad_w is not None:
                grad_w += (g.T @ hc).float() if unscale is None else (g.T @ hc).float() * unscale
        ctx.save_for_backward(grad_h, grad_w)
        return loss / count

    @staticmethod
    @torch.autograd.function.once_differentiable  # the gradients were computed without a graph
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss if grad_h is not None else None,
                grad_w * grad_loss if grad_w is not None else None, None, None, None, None, None)


def fp16_scale(g: torch.Tensor, hc: torch.Tensor, w_max: torch.Tensor) -> torch.Tensor:
    """The largest power of two A for which g * A (g: softmax - one-hot, (n, V), each row's |entries| summing to
    at most 2), (g * A) @ w and (g * A).T @ hc all stay within float16's largest number, 65504: a row of g @ w is
    at most 2 max|w|, a column of g.T @ hc at most (its column's sum of |g|) max|hc|. A 0-d tensor: no sync."""
    col = torch.linalg.vector_norm(g, 1, dim=0).max()  # the largest column sum of |g|
    worst = torch.maximum(2 * w_max.float(), col * torch.linalg.vector_norm(hc, float("inf")).float())
    return torch.exp2(torch.floor(torch.log2(65504.0 / worst.clamp(min=1.0))))


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                          softcap: float = 0.0) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets, ignore_index=-1), chunk rows at a time; h (N, C), targets (N,).
    softcap > 0: of the capped logits softcap * tanh(h @ weight.T / softcap)."""
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):  # the dtypes above are applied by hand
        return ChunkedLinearCrossEntropy.apply(h, weight, targets, chunk, dtype, grads, softcap)
