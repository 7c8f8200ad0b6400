"""The GPT-2 model: size, names, init, and exact agreement with Hugging Face's GPT2LMHeadModel both ways."""

from __future__ import annotations

import dataclasses
import math
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` puts tests/, not the repo root, on sys.path
    sys.path.insert(0, str(ROOT))

from gpt2 import GPT, GPTConfig, KVCache, fp16_scale  # noqa: E402
from support.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from support.hf import (  # noqa: E402
    from_hf_model,
    from_pretrained,
    load_model,  # noqa: E402
    save_pretrained,
)

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

ATOL_LOGITS = 1e-4
ATOL_LOSS = 1e-5


def tiny_config(**kw) -> GPTConfig:
    return GPTConfig(**(dict(block_size=64, vocab_size=1000, n_layer=2, n_head=2, n_embd=32) | kw))


def perturb_(model: torch.nn.Module) -> torch.nn.Module:
    """Give every LayerNorm gain/bias and Linear bias its own random value.

    Both inits set them to exactly 1 and 0, so a mixed-up ln_1/ln_2 or a lost bias would go unseen.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.02)
            elif ".ln_" in name:
                p.normal_(1.0, 0.1)
    return model


def hf_model(n_layer, n_head, n_embd, n_positions, vocab_size, seed=0, **kw) -> GPT2LMHeadModel:
    """A random GPT2LMHeadModel, biases and LayerNorms perturbed, in eval mode (a fresh one trains: dropout on)."""
    torch.manual_seed(seed)
    special = 50256 if vocab_size > 50256 else vocab_size - 1  # keep bos/eos inside the vocab
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                        vocab_size=vocab_size, bos_token_id=special, eos_token_id=special, **kw)
    return perturb_(GPT2LMHeadModel(config)).eval()


def hf_logits(hf, idx) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=idx).logits


def our_logits(model, idx) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


def random_tokens(B, T, vocab_size, seed=1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# -- size, names, init ----------------------------------------------------------------------------


def test_gpt2_124m_parameter_count():
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = GPT(GPTConfig())
        padded = GPT(GPTConfig(vocab_size=50304))
    assert model.num_parameters() == 124_439_808  # the "124M": wte counted once (tied to lm_head)
    assert padded.num_parameters() == 124_439_808 + (50304 - 50257) * 768


def test_parameter_names_match_hugging_face():
    config = tiny_config()
    hf = hf_model(config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size)
    hf_names = {k for k in hf.state_dict() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    ours = GPT(config)
    assert set(ours.state_dict()) == hf_names
    for k, v in ours.state_dict().items():  # HF's Conv1D stores (in, out): the transpose of nn.Linear
        hv = hf.state_dict()[k]
        assert v.shape == (hv.t().shape if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else hv.shape)


def test_init():
    torch.manual_seed(0)
    config = GPTConfig(block_size=256, vocab_size=4096, n_layer=6, n_head=4, n_embd=256)
    model = GPT(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: one tensor
    assert model.lm_head.bias is None
    residual_std = 0.02 * (2 * config.n_layer) ** -0.5
    seen_proj = 0
    for name, p in model.named_parameters():
        p = p.detach()
        if name.endswith(".bias"):
            assert torch.count_nonzero(p) == 0, name  # all biases (Linear and LayerNorm) start at zero
        elif ".ln_" in name:
            assert torch.equal(p, torch.ones_like(p)), name  # LayerNorm gains start at one
        else:
            want = residual_std if name.endswith("c_proj.weight") else 0.02
            seen_proj += name.endswith("c_proj.weight")
            assert abs(p.mean().item()) < 0.05 * want, name
            assert p.std().item() == pytest.approx(want, rel=0.05), name
    assert seen_proj == 2 * config.n_layer  # attn.c_proj and mlp.c_proj of every block
    # and the scaled ones really are smaller than the rest
    assert model.transformer.h[0].mlp.c_proj.weight.std() < 0.5 * model.transformer.h[0].mlp.c_fc.weight.std()


# -- Hugging Face -> ours --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_layer,n_head,n_embd,n_positions,vocab_size,B,T",
    [
        (2, 2, 32, 64, 1000, 3, 64),
        (3, 4, 64, 128, 50257, 2, 100),
        (12, 12, 768, 1024, 50257, 1, 16),  # the GPT-2 124M shape
    ],
    ids=["tiny", "small", "124M"],
)
def test_from_pretrained_matches_hugging_face(tmp_path, n_layer, n_head, n_embd, n_positions, vocab_size, B, T):
    hf = hf_model(n_layer, n_head, n_embd, n_positions, vocab_size)
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    model = from_pretrained(str(tmp_path / "hf")).eval()
    shutil.rmtree(tmp_path / "hf")  # 500 MB at the 124M shape: pytest keeps its last few tmp folders
    assert model.config == GPTConfig(block_size=n_positions, vocab_size=vocab_size, n_layer=n_layer,
                                     n_head=n_head, n_embd=n_embd)  # GPT-2's architecture: every option off
    assert model.lm_head.weight is model.transformer.wte.weight

    idx = random_tokens(B, T, vocab_size)
    want = hf_logits(hf, idx)
    got = our_logits(model, idx)
    assert got.shape == want.shape == (B, T, vocab_size)
    torch.testing.assert_close(got, want, atol=ATOL_LOGITS, rtol=0)

    # HF shifts labels inside: its loss on (idx, labels=idx) predicts idx[:, 1:] from idx[:, :-1], which is our
    # loss on inputs idx[:, :-1] with targets idx[:, 1:] (same causal prefixes, same B*(T-1) terms averaged)
    with torch.no_grad():
        hf_loss = hf(input_ids=idx, labels=idx).loss
        _, loss = model(idx[:, :-1], targets=idx[:, 1:].contiguous())  # non-contiguous: see the test below
        # or every position, the last one ignored (-1), as the training data loader may pad
        _, loss_ignore = model(idx, targets=torch.cat([idx[:, 1:], torch.full((B, 1), -1)], dim=1))
    assert abs(loss.item() - hf_loss.item()) <= ATOL_LOSS
    assert abs(loss_ignore.item() - hf_loss.item()) <= ATOL_LOSS
    assert loss.item() == pytest.approx(torch.log(torch.tensor(float(vocab_size))).item(), rel=0.1)  # ~uniform


def test_loss_accepts_sliced_targets():
    """targets=idx[:, 1:] is a strided view: the loss must not need contiguous targets."""
    model = GPT(tiny_config()).eval()
    idx = random_tokens(2, 33, 1000)
    with torch.no_grad():
        _, want = model(idx[:, :-1], targets=idx[:, 1:].contiguous())
        _, got = model(idx[:, :-1], targets=idx[:, 1:])
    assert got.item() == want.item()


# -- the chunked output layer + loss -------------------------------------------------------------


def loss_and_grads(model, idx, targets, **kw):
    _, loss = model(idx, targets, **kw)
    return loss, torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_loss_equals_cross_entropy(chunk):
    """The loss and every parameter's gradient (the tied wte/lm_head too) equal F.cross_entropy's, in fp32;
    ignored targets (-1) count nowhere; the last chunk may be short."""
    model = perturb_(GPT(tiny_config()))
    idx, targets = random_tokens(3, 21, 1000), random_tokens(3, 21, 1000, seed=2)
    targets[0, :5] = -1
    want, want_grads = loss_and_grads(model, idx, targets)
    got, got_grads = loss_and_grads(model, idx, targets, loss_chunk=chunk)
    assert model(idx, targets, loss_chunk=chunk)[0] is None  # no logits: that is the point
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for (name, _), g, w in zip(model.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # evaluation: the same loss, and no gradient work
        assert torch.allclose(model(idx, targets, loss_chunk=chunk)[1], want, rtol=1e-6, atol=1e-6)
        assert model(idx, torch.full_like(targets, -1), loss_chunk=chunk)[1].item() == 0.0  # documented: not nan


def test_chunked_loss_under_bf16_autocast_matches_the_plain_path():
    """Under autocast both paths compute bf16 logits and an fp32 softmax: the same numbers up to bf16 rounding."""
    model = perturb_(GPT(tiny_config()))
    idx, targets = random_tokens(2, 32, 1000), random_tokens(2, 32, 1000, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = loss_and_grads(model, idx, targets)
        got, got_grads = loss_and_grads(model, idx, targets, loss_chunk=16)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=0.02, atol=5e-4)  # bf16 matmuls, blocked differently


def test_chunked_loss_under_float16_is_as_exact_as_autograds_float16_loss():
    """GPT-2's vocabulary, 1,024 tokens: the gradient of a non-target logit (~1 / (50304 x 1024)) lies below
    float16's smallest number. Every parameter's gradient under float16 autocast, the loss scaled as GradScaler
    starts (2^16), against fp32's: the chunked loss is off by no more than 2x autograd's float16 loss (without
    its power-of-two scaling: 7%, against 0.05%)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=1024, vocab_size=50304, n_layer=1, n_head=2, n_embd=32))
    idx, targets = random_tokens(1, 1024, 50257), random_tokens(1, 1024, 50257, seed=2)

    def grads(dtype, **kw):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            _, loss = model(idx, targets, **kw)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss * 2.0**16, list(model.parameters()))])

    want = grads(None)
    error = lambda got: ((got - want).norm() / want.norm()).item()
    autograd, chunked = error(grads(torch.float16)), error(grads(torch.float16, loss_chunk=256))
    assert chunked <= 2 * autograd and autograd < 1e-3, (chunked, autograd)


def test_float16_scale_keeps_every_result_within_float16():
    """The worst case fp16_scale guards: one token the target of every row, big activations and weights."""
    g = torch.softmax(torch.randn(64, 100, generator=torch.Generator().manual_seed(0)), 1)
    g[:, 3] -= 1  # softmax - one-hot
    h, w = torch.full((64, 8), 300.0), torch.randn(100, 8) * 50
    scale = fp16_scale(g, h, w.abs().max())
    g16 = (g * scale).half()
    assert scale.item() == 2.0 ** round(math.log2(scale.item()))  # a power of two: dividing by it is exact
    assert torch.isfinite(g16 @ w.half()).all() and torch.isfinite(g16.T @ h.half()).all()


def test_unknown_name_is_a_value_error_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained", no_network)
    with pytest.raises(ValueError, match="gpt3-huge"):
        from_pretrained("gpt3-huge")
    with pytest.raises(ValueError, match="gpt3-huge"):
        load_model("gpt3-huge")


@pytest.mark.parametrize("activation", ["relu", "gelu"])  # "gelu" is the exact erf GELU, not GPT-2's tanh one
def test_non_gpt2_activation_is_a_value_error(tmp_path, activation):
    hf = hf_model(2, 2, 32, 64, 1000, activation_function=activation)
    with pytest.raises(ValueError, match=activation):
        from_hf_model(hf)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=activation):
        from_pretrained(str(tmp_path))


# -- ours -> Hugging Face ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config,perturb",
    [(tiny_config(), False), (tiny_config(vocab_size=50257, n_layer=3, n_head=4, n_embd=64), True)],
    ids=["vocab1000-own-init", "vocab50257-perturbed"],
)
def test_save_pretrained_loads_in_hugging_face(tmp_path, config, perturb):
    torch.manual_seed(0)
    model = GPT(config).eval()
    if perturb:
        perturb_(model)
    out = tmp_path / "export"
    save_pretrained(model, out)
    files = ["config.json", "model.safetensors"] + (["tokenizer.json", "tokenizer_config.json"]
                                                   if config.vocab_size == 50257 else [])  # GPT-2's tokens
    assert sorted(p.name for p in out.iterdir()) == files  # no temp files left

    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.vocab_size == config.vocab_size
    assert hf.config.n_positions == config.block_size
    assert hf.config.activation_function in ("gelu_new", "gelu_pytorch_tanh")
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied in HF too
    idx = random_tokens(2, config.block_size, config.vocab_size)
    torch.testing.assert_close(hf_logits(hf, idx), our_logits(model, idx), atol=ATOL_LOGITS, rtol=0)

    # exporting again over the same folder replaces it cleanly
    save_pretrained(model, out)
    assert sorted(p.name for p in out.iterdir()) == files


def test_padded_vocab_round_trip(tmp_path):
    hf = hf_model(2, 2, 32, 64, 50257)
    hf.save_pretrained(tmp_path / "hf")
    model = from_pretrained(str(tmp_path / "hf"), vocab_size=50304).eval()
    assert model.config.vocab_size == 50304
    wte = model.transformer.wte.weight.detach()
    assert wte.shape == (50304, 32)
    assert torch.count_nonzero(wte[50257:]) == 0  # padding rows start at zero
    torch.testing.assert_close(wte[:50257], hf.transformer.wte.weight.detach(), atol=0, rtol=0)

    idx = random_tokens(2, 64, 50257)
    logits = our_logits(model, idx)
    assert logits.shape == (2, 64, 50304)
    torch.testing.assert_close(logits[..., :50257], hf_logits(hf, idx), atol=ATOL_LOGITS, rtol=0)
    assert torch.count_nonzero(logits[..., 50257:]) == 0

    save_pretrained(model, tmp_path / "back")  # padding dropped on export
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    assert back.config.vocab_size == 50257
    torch.testing.assert_close(hf_logits(back, idx), hf_logits(hf, idx), atol=ATOL_LOGITS, rtol=0)


# -- checkpoints -------------------------------------------------------------------------------------


def test_load_model_hf_folder_and_checkpoint_agree(tmp_path):
    torch.manual_seed(0)
    model = perturb_(GPT(tiny_config(vocab_size=50304))).eval()  # padded, as trained
    save_pretrained(model, tmp_path / "hf")
    ckpt = tmp_path / "model_00000.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "config": dataclasses.asdict(model.config), "step": 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model_00000.pt"]  # no temp file left

    raw = torch.load(ckpt, weights_only=True)  # plain data only
    assert raw["step"] == 0 and raw["config"] == dataclasses.asdict(model.config)
    assert load_checkpoint(ckpt)["config"]["vocab_size"] == 50304

    from_ckpt = load_model(str(ckpt))
    from_hf = load_model(str(tmp_path / "hf"))
    assert not from_ckpt.training and not from_hf.training
    assert from_ckpt.config.vocab_size == 50304 and from_hf.config.vocab_size == 50257
    idx = random_tokens(2, 64, 50257)
    want = our_logits(model, idx)
    torch.testing.assert_close(our_logits(from_ckpt, idx), want, atol=0, rtol=0)
    torch.testing.assert_close(our_logits(from_hf, idx), want[..., :50257], atol=ATOL_LOGITS, rtol=0)

    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "model_99999.pt"))


# -- forward -----------------------------------------------------------------------------------------


def test_forward_longer_than_block_size_is_a_value_error():
    model = GPT(tiny_config(block_size=16)).eval()
    model(random_tokens(1, 16, 1000))  # exactly block_size is fine
    with pytest.raises(ValueError, match="block_size=16"):
        model(random_tokens(1, 17, 1000))
    cache = KVCache(model.config, 1, 32, "cpu", torch.float32)  # a cache longer than block_size does not help
    model(random_tokens(1, 10, 1000), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size=16"):
        model(random_tokens(1, 7, 1000), kv_cache=cache)
