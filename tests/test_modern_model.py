"""The model's options (gpt2.ModelOptions): RoPE, RMSNorm, QK-norm, ReLU^2, no biases, split q/k/v, an untied
zero-initialised head, zero-initialised projections, logit softcap. Each against a forward written here from
the weights alone; parameter counts; KV-cache sampling; the chunked loss; checkpoints; the export to
transformers' NanoChatForCausalLM (and GPT2LMHeadModel) and back; sampling, HellaSwag and eval_suite on such a
model and the notebook on its run; training one, and its untied head saved under fsdp. CPU, fp32, tiny models."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_eval_suite import LESSONS, offline, teach, write_tasks  # noqa: F401 (offline: a fixture)
from test_hellaswag import EXAMPLES, totals, write_jsonl
from test_train import REPO, run, tiny_args, torchrun, write_shards

import eval_suite as es
import gpt2
import hellaswag as hs
import support.hf
from gpt2 import GPT, GPTConfig, KVCache
from support.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    model_entries,
    model_from_checkpoint,
    save_checkpoint,
)
from support.hf import from_pretrained, load_model, save_pretrained
from support.metrics import flops_per_token
from support.tokenizer import get_tokenizer

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
    if c.smear:  # nanochat's: position t >= 1 plus lambda * sigmoid(gate . x[t, :24]) times position t-1
        g = W["smear_lambda"] * torch.sigmoid(x[:, 1:, :24] @ W["smear_gate.weight"].T)  # (B, T-1, 1)
        x = torch.cat([x[:, :1], x[:, 1:] + g * x[:, :-1]], dim=1)
    x0, middle = x, None
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(c.n_layer):
        p = f"transformer.h.{layer}."
        if c.layer_scalars:
            x = W["resid_lambdas"][layer] * x + W["x0_lambdas"][layer] * x0
        h = norm(x, p + "ln_1")
        if c.split_qkv:
            q, k, v = (lin(h, p + f"attn.c_{n}") for n in "qkv")
        else:
            q, k, v = lin(h, p + "attn.c_attn").split(C, dim=-1)
        q, k, v = heads(q), heads(k), heads(v)
        if f"value_embeds.{layer}.weight" in W:  # ResFormer's: v plus a per-head gate in (0, 3) times the table's row
            gate = 3 * torch.sigmoid(h[..., :12] @ W[p + "attn.ve_gate.weight"].T)  # (B, T, nh)
            v = v + gate.transpose(1, 2)[..., None] * heads(W[f"value_embeds.{layer}.weight"][idx])
        if c.pos_emb == "rope":
            q, k = rope_by_complex(q, c.rope_base), rope_by_complex(k, c.rope_base)
        if c.qk_norm:
            q, k = rms(q) * c.qk_gain, rms(k) * c.qk_gain
        att = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + lin((att @ v).transpose(1, 2).reshape(B, T, C), p + "attn.c_proj")
        h = lin(norm(x, p + "ln_2"), p + "mlp.c_fc")
        if c.mlp == "relu2":
            h = h.clamp(min=0) ** 2
        else:
            h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
        x = x + lin(h, p + "mlp.c_proj")
        if c.backout and layer == c.n_layer // 2:
            middle = x
    if middle is not None:  # the middle layer's stream, a learned share of it taken out
        x = x - W["backout_lambda"] * middle
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
    assert flops_per_token(untied, 1024) == flops_per_token(tied, 1024)  # the same matmuls
    assert flops_per_token(GPTConfig(vocab_size=50304, pos_emb="rope"), 1024) == flops_per_token(
        tied, 1024) - 6 * 1024 * 768  # no wpe


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="--pos-emb rope .* head size 3 .* even"):
        GPTConfig(n_embd=6, n_head=2, pos_emb="rope")
    with pytest.raises(ValueError, match="--norm batchnorm: use one of layernorm, rmsnorm"):
        GPTConfig(norm="batchnorm")


def test_checkpoint_round_trip_and_old_checkpoints(tmp_path):
    model = randomised(tiny(**MODERN))
    save_checkpoint(tmp_path / "m.pt", model_entries(model))
    ckpt = load_checkpoint(tmp_path / "m.pt")  # weights_only=True
    assert ckpt["config"] == dataclasses.asdict(model.config) and ckpt["config"]["pos_emb"] == "rope"
    back = model_from_checkpoint(ckpt).eval()
    assert back.config == model.config and back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])
    # a checkpoint written before the options existed: its config has the shape only
    old = GPT(tiny())
    shape_only = {k: getattr(old.config, k) for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")}
    assert model_from_checkpoint({"model": old.state_dict(), "config": shape_only}).config == old.config


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


# -----------------------------------------------------------------------------
# Export to transformers, and back


def hf_logits(folder: Path, idx: torch.Tensor):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder).eval()  # no trust_remote_code: a class transformers has
    with torch.no_grad():
        return type(hf).__name__, hf(input_ids=idx).logits


@pytest.mark.parametrize("options,vocab_size", [
    (MODERN, 50304),  # the training vocab: padded rows dropped, GPT-2's tokenizer files written
    (dict(MODERN, tie_embeddings=True, mlp="gelu", rope_base=500.0), 100),
    (dict(MODERN, split_qkv=False, logit_softcap=0.0), 100),
], ids=["modern", "tied-gelu", "fused-qkv-no-softcap"])
def test_export_to_nanochat_equals_transformers(tmp_path, options, vocab_size):
    model = randomised(tiny(vocab_size, **options))
    save_pretrained(model, tmp_path / "hf")
    real = min(vocab_size, gpt2.GPT2_VOCAB_SIZE)
    idx = tokens(vocab_size=real)
    name, theirs = hf_logits(tmp_path / "hf", idx)
    with torch.no_grad():
        ours = model(idx)[0][..., :real]
    assert name == "NanoChatForCausalLM" and theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["rms_norm_eps"] == gpt2.RMS_NORM_EPS and hf_config["vocab_size"] == real
    assert hf_config["final_logit_softcapping"] == (options["logit_softcap"] or None)
    assert hf_config["tie_word_embeddings"] == options["tie_embeddings"]
    # and back: our importer reads the folder (read_model: --init-from, hellaswag.py, eval_suite.py)
    back = support.hf.read_model(str(tmp_path / "hf"), vocab_size=vocab_size).eval()
    init_only = dict(zero_init_proj=False, split_qkv=True)  # NanoChat keeps q, k, v apart; init is not saved
    assert back.config == dataclasses.replace(model.config, **init_only)
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0][..., :real], ours, rtol=0, atol=1e-5)
    if vocab_size == 50304:
        from transformers import AutoTokenizer

        assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
        text = "ROMEO: But soft, what light"
        assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(text) == get_tokenizer().encode(text)
        assert back.lm_head.weight[real:].abs().sum() == 0  # the padded rows come back as zeros


@pytest.mark.parametrize("options", [dict(split_qkv=True), dict(tie_embeddings=False), dict(bias=False),
                                     dict(mlp="relu2"), dict(split_qkv=True, bias=False, tie_embeddings=False)],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_export_gpt2_architecture_variants_to_gpt2lmheadmodel(tmp_path, options):
    model = randomised(tiny(**options))
    save_pretrained(model, tmp_path / "hf")
    idx = tokens()
    name, theirs = hf_logits(tmp_path / "hf", idx)
    with torch.no_grad():
        ours = model(idx)[0]
    assert name == "GPT2LMHeadModel"
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    back = from_pretrained(str(tmp_path / "hf")).eval()  # fused c_attn, zero biases: the same function
    assert back.config.tie_embeddings == model.config.tie_embeddings and back.config.mlp == model.config.mlp
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("options,flag", [
    (dict(pos_emb="rope"), "--norm layernorm"),  # rope with LayerNorm
    (dict(pos_emb="rope", norm="rmsnorm", qk_norm=True), "--bias"),  # rope with biases
    (dict(pos_emb="rope", norm="rmsnorm", bias=False), "--no-qk-norm"),
    (dict(norm="rmsnorm"), "--norm rmsnorm"),  # learned positions with RMSNorm
    (dict(qk_norm=True), "--qk-norm"),
    (dict(logit_softcap=30.0), "--logit-softcap"),
])
def test_export_refuses_what_no_transformers_class_computes(tmp_path, options, flag):
    with pytest.raises(ValueError) as e:
        save_pretrained(GPT(tiny(**options)), tmp_path / "out")
    assert flag in str(e.value) and "\n" not in str(e.value) and "no transformers class" in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing written


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def modern_checkpoint(path: Path, **options) -> GPT:
    model = randomised(GPTConfig(block_size=128, vocab_size=50304, n_layer=2, n_head=2, n_embd=32,
                                 **(MODERN | options)), std=0.5)
    save_checkpoint(path, model_entries(model))
    return model


def test_export_and_sample_commands_on_a_modern_checkpoint(tmp_path):
    model = modern_checkpoint(tmp_path / "model_00010.pt")
    out = cli("export", str(tmp_path / "model_00010.pt"), str(tmp_path / "hf"))
    assert out.returncode == 0 and "NanoChatForCausalLM" in out.stdout, out.stderr[-2000:]
    idx = tokens(vocab_size=50257)
    _, theirs = hf_logits(tmp_path / "hf", idx)
    with torch.no_grad():
        torch.testing.assert_close(theirs, model(idx)[0][..., :50257], rtol=0, atol=1e-4)
    sample = ["sample", "-m", str(tmp_path / "model_00010.pt"), "--prompt", "ROMEO:", "--max-new-tokens", "12",
              "--num-samples", "2", "--device", "cpu"]
    cached, uncached = cli(*sample), cli(*sample, "--no-cache")
    assert cached.returncode == 0, cached.stderr[-2000:]
    assert cached.stdout == uncached.stdout and cached.stdout.count("ROMEO:") == 2
    modern_checkpoint(tmp_path / "bad.pt", norm="layernorm")
    refused = cli("export", str(tmp_path / "bad.pt"), str(tmp_path / "hf_bad"))
    assert refused.returncode == 2 and not (tmp_path / "hf_bad").exists()
    assert refused.stderr.startswith("train_gpt2.py: error: cannot export") and refused.stderr.count("\n") == 1
    assert "--norm layernorm" in refused.stderr


# -----------------------------------------------------------------------------
# HellaSwag and eval_suite on modern models


def test_hellaswag_on_a_modern_checkpoint_and_its_export(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    modern_checkpoint(tmp_path / "model_00000.pt")
    data = write_jsonl(tmp_path / "hellaswag_val.jsonl")
    common = ["-d", "cpu", "--data-file", str(data)]
    assert hs.main(["-m", str(tmp_path / "model_00000.pt"), "--batch-size", "5", *common]) == 0
    batched = totals(capsys.readouterr().out.strip().splitlines())  # logits at the scored positions only
    model = load_model(str(tmp_path / "model_00000.pt"))
    unbatched = hs.evaluate_unbatched(model, EXAMPLES, "cpu")  # logits everywhere
    assert batched == (unbatched["num_total"], unbatched["num_correct"], unbatched["num_correct_norm"])
    assert 0 < batched[2] < batched[0]  # some right, some wrong: the test can tell
    save_pretrained(model, tmp_path / "hf")
    assert hs.main(["-m", str(tmp_path / "hf"), *common]) == 0  # the folder, through our importer
    assert totals(capsys.readouterr().out.strip().splitlines()) == batched
    res = hs.evaluate_unbatched(AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval(), EXAMPLES, "cpu")
    assert (res["num_total"], res["num_correct"], res["num_correct_norm"]) == batched  # transformers' NanoChat


def test_eval_suite_on_a_modern_checkpoint_equals_the_hf_backend_on_its_export(tmp_path, offline):  # noqa: F811
    from lm_eval import simple_evaluate

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, **MODERN))
    model = teach(model, LESSONS)  # the zero-initialised head must learn something to tell choices apart
    save_checkpoint(tmp_path / "model.pt", model_entries(model))
    save_pretrained(model, tmp_path / "hf")
    tasks = write_tasks(tmp_path / "tasks")
    with contextlib.redirect_stdout(io.StringIO()):
        rc = es.main(["-m", str(tmp_path / "model.pt"), "--tasks", "toy_mc", "--include-path", str(tasks), "-d", "cpu",
                      "--output", str(tmp_path / "ours.json")])
    assert rc == 0
    ours = json.loads((tmp_path / "ours.json").read_text())["results"]["toy_mc"]
    theirs = simple_evaluate(model="hf", model_args={"pretrained": str(tmp_path / "hf"), "dtype": "float32"},
                             tasks=["toy_mc"], task_manager=es.task_manager(str(tasks)), device="cpu",
                             batch_size=1)["results"]["toy_mc"]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours[metric] == theirs[metric], metric
    assert 0 < ours["acc,none"] < 1


# -----------------------------------------------------------------------------
# Training a modern model (through --init-from FOLDER, until the training flags exist)


@pytest.fixture
def modern_folder(tmp_path) -> tuple[Path, Path]:
    """Shards of test_train's tiny vocab (64), and a modern model of its shape exported to a NanoChat folder."""
    shards = write_shards(tmp_path / "shards")
    model = randomised(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, **MODERN), std=0.1)
    save_pretrained(model, tmp_path / "nanochat")
    return shards, tmp_path / "nanochat"


def test_modern_model_resumes_bitwise(modern_folder, tmp_path):
    shards, folder = modern_folder
    args = lambda d, *x: tiny_args(shards, d, "--init-from", str(folder), "--checkpoint-interval", "100",
                                   "--loss-chunk", "16", *x, steps=6)
    run(args(tmp_path / "straight"))
    run(args(tmp_path / "split", "--stop-after-step", "2"))
    run(args(tmp_path / "split", "--resume"))
    a, b = (torch.load(latest_checkpoint(tmp_path / d), weights_only=True) for d in ("straight", "split"))
    assert a["config"]["pos_emb"] == "rope" and a["config"]["logit_softcap"] == 15.0
    for name, w in a["model"].items():
        assert torch.equal(b["model"][name], w), name
    lines = lambda d: [ln for ln in (tmp_path / d / "log.txt").read_text().splitlines() if " train " in ln]
    assert lines("straight") == lines("split") and len(lines("straight")) == 6


def test_untied_head_saved_under_fsdp_as_under_ddp(modern_folder, tmp_path):
    shards, folder = modern_folder
    args = lambda d, shard: tiny_args(shards, tmp_path / d, "--init-from", str(folder), "--shard", shard,
                                      "--eval-interval", "0", B=2, total=128, steps=3)
    torchrun(args("ddp", "ddp"))
    torchrun(args("fsdp", "fsdp"))
    ddp, fsdp = (torch.load(tmp_path / d / "model_00002.pt", weights_only=True)["model"] for d in ("ddp", "fsdp"))
    assert not torch.equal(fsdp["lm_head.weight"], fsdp["transformer.wte.weight"])  # the head, not wte's copy
    for name, w in ddp.items():
        torch.testing.assert_close(fsdp[name], w, rtol=1e-4, atol=1e-6, msg=name)
