"""The model's options (gpt2.ModelOptions): RoPE, RMSNorm, QK-norm, ReLU^2, no biases, split q/k/v, an untied
zero-initialised head, zero-initialised projections, logit softcap. Each against a forward written here from
the weights alone; parameter counts; KV-cache sampling; the chunked loss; checkpoints. CPU, fp32, tiny models."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import gpt2
import train_gpt2 as tg
from gpt2 import GPT, GPTConfig, KVCache

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# every option on: the modern recipe's architecture (nanochat's, as transformers' NanoChat computes it)
MODERN = dict(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", bias=False, split_qkv=True,
              tie_embeddings=False, zero_init_proj=True, logit_softcap=15.0)


def tiny(vocab_size=100, **options) -> GPTConfig:
    return GPTConfig(block_size=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=16, **options)


def randomised(config: GPTConfig, seed=0, std=0.3) -> GPT:
    """A model whose every weight is random (zero-initialised ones too, or a lost term would go unseen);
    LayerNorm gains around 1. In eval mode."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, std)
    return model.eval()


def tokens(B=2, T=12, vocab_size=100, seed=1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# A reference forward, from the state dict alone, in float64: nothing of gpt2.py's modules


def rope_by_complex(x: torch.Tensor, base: float, start: int = 0) -> torch.Tensor:
    """x (B, nh, T, hs): dimension j and j + hs/2 as one complex number, times e^(-i pos theta_j)."""
    hs, T = x.size(-1), x.size(-2)
    z = torch.complex(x[..., : hs // 2].double(), x[..., hs // 2:].double())
    theta = base ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)  # (hs/2,)
    pos = torch.arange(start, start + T, dtype=torch.float64)
    z = z * torch.exp(-1j * pos[:, None] * theta[None, :])
    return torch.cat([z.real, z.imag], dim=-1)


def rms(x):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def reference_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    c, W = model.config, {k: v.double() for k, v in model.state_dict().items()}
    B, T = idx.shape
    C, nh = c.n_embd, c.n_head
    hs = C // nh

    def lin(x, name):
        return x @ W[name + ".weight"].T + W.get(name + ".bias", 0)

    def norm(x, name):
        if c.norm == "rmsnorm":
            return rms(x)
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * W[name + ".weight"] + W.get(name + ".bias", 0)

    heads = lambda t: t.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
    x = W["transformer.wte.weight"][idx]
    if c.pos_emb == "learned":
        x = x + W["transformer.wpe.weight"][:T]
    if c.norm == "rmsnorm":
        x = rms(x)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(c.n_layer):
        p = f"transformer.h.{layer}."
        h = norm(x, p + "ln_1")
        if c.split_qkv:
            q, k, v = (lin(h, p + f"attn.c_{n}") for n in "qkv")
        else:
            q, k, v = lin(h, p + "attn.c_attn").split(C, dim=-1)
        q, k, v = heads(q), heads(k), heads(v)
        if c.pos_emb == "rope":
            q, k = rope_by_complex(q, c.rope_base), rope_by_complex(k, c.rope_base)
        if c.qk_norm:
            q, k = rms(q), rms(k)
        att = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + lin((att @ v).transpose(1, 2).reshape(B, T, C), p + "attn.c_proj")
        h = lin(norm(x, p + "ln_2"), p + "mlp.c_fc")
        if c.mlp == "relu2":
            h = h.clamp(min=0) ** 2
        else:
            h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
        x = x + lin(h, p + "mlp.c_proj")
    logits = norm(x, "transformer.ln_f") @ W["lm_head.weight"].T
    return c.logit_softcap * torch.tanh(logits / c.logit_softcap) if c.logit_softcap else logits


@pytest.mark.parametrize("options", [
    {}, dict(pos_emb="rope"), dict(pos_emb="rope", rope_base=500.0), dict(norm="rmsnorm"), dict(qk_norm=True),
    dict(mlp="relu2"), dict(bias=False), dict(split_qkv=True), dict(tie_embeddings=False), dict(logit_softcap=2.0),
    dict(norm="layernorm", bias=False), MODERN,
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "gpt2")
def test_forward_equals_the_reference(options):
    model = randomised(tiny(**options))
    idx = tokens()
    with torch.no_grad():
        logits, _ = model(idx)
    torch.testing.assert_close(logits.double(), reference_logits(model, idx), rtol=0, atol=1e-5)
    if options.get("logit_softcap"):
        assert logits.abs().max() < options["logit_softcap"]


def test_rope_is_a_rotation_by_complex_multiplication_at_any_start():
    rotary = gpt2.Rotary(tiny(pos_emb="rope", rope_base=100.0))
    x = torch.randn(2, 2, 5, 8)
    for start in (0, 7):
        torch.testing.assert_close(rotary(x, start).double(), rope_by_complex(x, 100.0, start), rtol=0, atol=1e-6)
    assert not torch.allclose(rotary(x, 0), rotary(x, 1))  # the position matters
    assert rotary(x, 3).norm(dim=-1).sub(x.norm(dim=-1)).abs().max() < 1e-5  # and the norm does not


def test_rmsnorm_and_qk_norm_by_hand():
    x = torch.randn(3, 4, 16) * 5 + 1
    torch.testing.assert_close(gpt2.RMSNorm()(x), rms(x), rtol=0, atol=1e-6)
    assert gpt2.RMSNorm()(x.bfloat16()).dtype == torch.bfloat16  # computed in fp32, returned in the input's dtype
    attn = gpt2.CausalSelfAttention(tiny(qk_norm=True))
    assert isinstance(attn.qk_norm, gpt2.RMSNorm) and gpt2.CausalSelfAttention(tiny()).qk_norm is None


# -----------------------------------------------------------------------------
# Construction: modules, init, parameter counts, state dicts


def test_default_model_is_gpt2_as_before():
    """Values recorded from main before the options existed (b66a2e9), with a model built from the shape only."""
    torch.manual_seed(1234)
    shape = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=8)
    model = GPT(GPTConfig(**shape)).eval()
    idx = torch.arange(12).reshape(2, 6) * 5 % 64
    with torch.no_grad():
        logits, loss = model(idx, targets=idx)
    torch.testing.assert_close(logits[0, :2, :4], torch.tensor(
        [[0.06422711163759232, -0.0010949262650683522, 0.01061672531068325, 0.0421358197927475],
         [-0.0070494008250534534, 0.0009420347632840276, 0.029777800664305687, 0.017082933336496353]]),
        rtol=0, atol=1e-7)
    assert loss.item() == pytest.approx(4.060264587402344, abs=1e-6)
    assert logits.sum().item() == pytest.approx(-0.056048452854156494, abs=1e-6)
    block = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
             "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
             "mlp.c_proj.bias"]
    assert list(model.state_dict()) == ["transformer.wte.weight", "transformer.wpe.weight",
                                        *[f"transformer.h.{i}.{n}" for i in range(2) for n in block],
                                        "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"]
    assert list(model.buffers()) == []
    # every option at its default, spelled out: the same model, the same draws
    torch.manual_seed(1234)
    defaults = {f.name: f.default for f in dataclasses.fields(gpt2.ModelOptions)}
    spelled = GPT(GPTConfig(**shape, **defaults)).eval()
    assert all(torch.equal(v, spelled.state_dict()[k]) for k, v in model.state_dict().items())


def test_modern_init_modules_and_state_dict():
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=512, n_layer=3, n_head=4, n_embd=128, **MODERN)
    model = GPT(config)
    sd = model.state_dict()
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert not any(k.endswith(".bias") for k in sd) and not any(".ln_" in k for k in sd) and "transformer.wpe.weight" \
        not in sd  # no biases, no norm parameters, no learned positions
    assert set(sd) == {n for n, _ in model.named_parameters()}  # the cos/sin tables are not in the state dict
    assert isinstance(model.transformer.ln_e, gpt2.RMSNorm) and isinstance(model.transformer.ln_f, gpt2.RMSNorm)
    zero = ["lm_head.weight"] + [f"transformer.h.{i}.{m}.c_proj.weight" for i in range(3) for m in ("attn", "mlp")]
    for name, p in sd.items():
        if name in zero:
            assert torch.count_nonzero(p) == 0, name
        else:  # wte, c_q, c_k, c_v, c_fc: GPT-2's N(0, 0.02)
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
    assert sorted(k.split(".")[-2] for k in sd if ".h.0." in k) == ["c_fc", "c_k", "c_proj", "c_proj", "c_q", "c_v"]
    idx = tokens(vocab_size=512)
    logits, loss = model(idx, targets=idx)
    assert torch.count_nonzero(logits) == 0 and loss.item() == pytest.approx(math.log(512))  # zero head: uniform
    # zero_init_proj alone keeps GPT-2's tied head
    tied = GPT(tiny(zero_init_proj=True))
    assert tied.lm_head.weight is tied.transformer.wte.weight and tied.lm_head.weight.std() > 0.01
    assert torch.count_nonzero(tied.transformer.h[1].mlp.c_proj.weight) == 0


def test_layernorm_without_bias_keeps_its_gain():
    model = GPT(tiny(bias=False))
    assert model.transformer.h[0].ln_1.bias is None and model.transformer.h[0].ln_1.weight.shape == (16,)
    assert model.transformer.h[0].attn.c_attn.bias is None and model.transformer.h[0].mlp.c_fc.bias is None


OPTION_GRID = [dict(zip(("pos_emb", "norm", "bias", "tie_embeddings", "split_qkv", "qk_norm", "mlp"), values))
               for values in itertools.product(("learned", "rope"), ("layernorm", "rmsnorm"), (True, False),
                                               (True, False), (True, False), (True, False), ("gelu", "relu2"))]


def test_parameter_counts_for_every_option_combination():
    for options in OPTION_GRID:
        config = GPTConfig(block_size=24, vocab_size=70, n_layer=3, n_head=2, n_embd=12, **options)
        model = GPT(config)
        assert config.num_parameters() == model.num_parameters(), options  # a tied matrix once
        assert config.block_parameters() == sum(p.numel() for p in model.transformer.h[0].parameters()), options
    with torch.device("meta"):  # the speedrun's shape: 12 layers, 768 wide, head size 128, untied, no biases
        speedrun = GPT(GPTConfig(vocab_size=50304, n_head=6, **MODERN))
    assert speedrun.num_parameters() == speedrun.config.num_parameters() == 2 * 50304 * 768 + 12 * 12 * 768 ** 2


def test_flops_per_token_counts_an_untied_embedding_as_a_lookup():
    tied, untied = GPTConfig(vocab_size=50304), GPTConfig(vocab_size=50304, tie_embeddings=False)
    assert untied.num_parameters() == tied.num_parameters() + 50304 * 768
    assert tg.flops_per_token(untied, 1024) == tg.flops_per_token(tied, 1024)  # the same matmuls
    assert tg.flops_per_token(GPTConfig(vocab_size=50304, pos_emb="rope"), 1024) == tg.flops_per_token(
        tied, 1024) - 6 * 1024 * 768  # no wpe


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="--pos-emb rope .* head size 3 .* even"):
        GPTConfig(n_embd=6, n_head=2, pos_emb="rope")
    with pytest.raises(ValueError, match="--norm batchnorm: use one of layernorm, rmsnorm"):
        GPTConfig(norm="batchnorm")


def test_checkpoint_round_trip_and_old_checkpoints(tmp_path):
    model = randomised(tiny(**MODERN))
    gpt2.save_checkpoint(tmp_path / "m.pt", gpt2.model_entries(model))
    ckpt = gpt2.load_checkpoint(tmp_path / "m.pt")  # weights_only=True
    assert ckpt["config"] == dataclasses.asdict(model.config) and ckpt["config"]["pos_emb"] == "rope"
    back = gpt2.model_from_checkpoint(ckpt).eval()
    assert back.config == model.config and back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])
    # a checkpoint written before the options existed: its config has the shape only
    old = GPT(tiny())
    shape_only = {k: getattr(old.config, k) for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")}
    assert gpt2.model_from_checkpoint({"model": old.state_dict(), "config": shape_only}).config == old.config


# -----------------------------------------------------------------------------
# Loss paths and sampling


def test_chunked_loss_equals_plain_loss_with_softcap():
    model = randomised(tiny(**MODERN)).train()
    idx, targets = tokens(T=20), tokens(T=20, seed=2)
    targets[0, :3] = -1  # ignored positions
    grads = {}
    for chunk in (0, 7):
        model.zero_grad()
        _, loss = model(idx, targets=targets, loss_chunk=chunk)
        loss.backward()
        grads[chunk] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[7][0] == pytest.approx(grads[0][0], rel=1e-6)
    assert grads[0][0] > 1.0  # a real loss, far from the cap's limits
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[7][1][name], g, rtol=1e-5, atol=1e-7, msg=name)
    # and against autograd through the softcap written out here
    h, w = torch.randn(30, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (30,))
    y[4] = -1
    ours = gpt2.chunked_cross_entropy(h, w, y, 8, softcap=3.0)
    theirs = F.cross_entropy(3.0 * torch.tanh(h @ w.T / 3.0), y, ignore_index=-1)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    for a, b in zip(torch.autograd.grad(ours, (h, w)), torch.autograd.grad(theirs, (h, w))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_logits_at_with_softcap():
    model = randomised(tiny(**MODERN))
    idx = tokens()
    mask = torch.rand(idx.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        torch.testing.assert_close(model(idx, logits_at=mask)[0], model(idx)[0][mask], rtol=0, atol=1e-6)


def test_kv_cache_at_rope_positions_equals_the_whole_forward():
    model = randomised(tiny(**MODERN))
    idx = tokens(T=14)
    with torch.no_grad():
        whole = model(idx)[0]
        cache = KVCache(model.config, 2, 14, "cpu", torch.float32)
        parts = [model(idx[:, :6], kv_cache=cache)[0], model(idx[:, 6:9], kv_cache=cache)[0]]  # prefill, 3 at once
        parts += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(9, 14)]  # then one at a time
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_sampling_equals_uncached(temperature):
    model = randomised(tiny(**MODERN), std=0.5)
    idx = tokens(T=5)
    out = [model.generate(idx, 20, temperature=temperature, top_k=20, use_cache=use_cache,
                          generator=torch.Generator().manual_seed(7)) for use_cache in (True, False)]
    assert torch.equal(out[0], out[1])
    assert len(set(out[0][0, 5:].tolist())) > 1  # not one token repeated: the test can tell
