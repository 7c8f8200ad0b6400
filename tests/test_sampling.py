"""Sampling: the KV cache changes speed, never tokens; seeds reproduce; limits and padding are respected."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` puts tests/, not the repo root, on sys.path
    sys.path.insert(0, str(ROOT))

from gpt2 import GPT, GPTConfig, KVCache  # noqa: E402
from support.sampling import SampleConfig, sample_text  # noqa: E402
from support.tokenizer import get_tokenizer  # noqa: E402

PROMPT = "Hello, I'm a language model,"


def make_model(vocab_size=1000, block_size=64, n_layer=2, n_head=4, n_embd=64, seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    with torch.no_grad():  # sharpen the near-uniform init a little, so sampling has something to follow
        model.transformer.wte.weight.mul_(10)
    return model.eval()


def prompt_ids(B=2, T=7, vocab_size=1000, seed=1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model()


# -- the KV cache ---------------------------------------------------------------------------------


def test_greedy_cached_equals_uncached(model):
    idx = prompt_ids()
    cached = model.generate(idx, 40, temperature=0, use_cache=True)
    uncached = model.generate(idx, 40, temperature=0, use_cache=False)
    assert cached.shape == (2, 7 + 40)
    assert torch.equal(cached[:, :7], idx)  # the prompt comes back unchanged
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached[0, 7:], cached[1, 7:])  # the rows really decode separately


@pytest.mark.parametrize("top_k", [None, 1, 20])
def test_sampling_cached_equals_uncached(model, top_k):
    idx = prompt_ids()
    outs = [model.generate(idx, 30, temperature=0.8, top_k=top_k, use_cache=use_cache,
                           generator=torch.Generator().manual_seed(123))
            for use_cache in (True, False)]
    assert torch.equal(outs[0], outs[1])
    if top_k == 1:  # top_k=1 is greedy decoding whatever the temperature
        assert torch.equal(outs[0], model.generate(idx, 30, temperature=0))


def test_top_k_restricts_to_the_k_best(model):
    """With top_k=3, every sampled token is one of the 3 most likely next tokens."""
    idx = prompt_ids(B=4)
    out = model.generate(idx, 20, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    top3 = logits[:, idx.size(1) - 1:].topk(3, dim=-1).indices  # predictions for each new token
    assert (top3 == out[:, idx.size(1):, None]).any(-1).all()
    assert (top3[..., 0] != out[:, idx.size(1):]).any()  # and it is sampling, not greedy


def test_cache_logits_equal_full_forward(model):
    """Prefill 5 tokens, then a chunk of 3 (several queries over a cached prefix), then one at a time."""
    idx = prompt_ids(B=2, T=16)
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config, 2, 16, "cpu", torch.float32)
        chunks = [idx[:, :5], idx[:, 5:8]] + [idx[:, t:t + 1] for t in range(8, 16)]
        parts = []
        for chunk in chunks:
            logits, _ = model(chunk, kv_cache=cache)
            parts.append(logits)
    assert cache.pos == 16
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_cache_chunks_after_single_tokens(model):
    """The other order: one token, then chunks of 4 and 2 over the cached prefix."""
    idx = prompt_ids(B=1, T=12)
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config, 1, 12, "cpu", torch.float32)
        parts = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in [(0, 1), (1, 5), (5, 7), (7, 12)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_cache_holds_keys_in_the_autocast_dtype(model, monkeypatch):
    """Under bf16 autocast the keys and values are bf16: a cache in the weights' fp32 would cast the whole prefix
    back to bf16 at every new token. The tokens are the uncached ones, as in fp32."""
    import gpt2

    made = []
    monkeypatch.setattr(gpt2, "KVCache", lambda *a: made.append(a[-1]) or KVCache(*a))
    idx = prompt_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached = model.generate(idx, 8, temperature=0)
        uncached = model.generate(idx, 8, temperature=0, use_cache=False)
    model.generate(idx, 2, temperature=0)
    assert made == [torch.bfloat16, torch.float32] and torch.equal(cached, uncached)


def test_cache_overflow_is_a_value_error(model):
    cache = KVCache(model.config, 1, 8, "cpu", torch.float32)
    with torch.no_grad():
        model(prompt_ids(B=1, T=6), kv_cache=cache)
        with pytest.raises(ValueError, match="8"):
            model(prompt_ids(B=1, T=3), kv_cache=cache)


# -- sample_text ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_vocab_model() -> GPT:
    return make_model(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=32)


def test_sample_text_seeds(gpt2_vocab_model):
    a = sample_text(gpt2_vocab_model, SampleConfig(PROMPT, num_samples=3, max_new_tokens=16), seed=7)
    b = sample_text(gpt2_vocab_model, SampleConfig(PROMPT, num_samples=3, max_new_tokens=16), seed=7)
    c = sample_text(gpt2_vocab_model, SampleConfig(PROMPT, num_samples=3, max_new_tokens=16), seed=8)
    assert len(a) == len(c) == 3
    assert all(isinstance(s, str) and s.startswith(PROMPT) and len(s) > len(PROMPT) for s in a)
    assert a == b
    assert a != c
    assert len(set(a)) == 3  # the rows are sampled independently
    enc = get_tokenizer()
    assert all(len(enc.encode(s[len(PROMPT):], allowed_special="all")) >= 1 for s in a)


def test_sample_text_without_cache_is_the_same(gpt2_vocab_model):
    settings = SampleConfig(PROMPT, num_samples=2, max_new_tokens=12)
    assert sample_text(gpt2_vocab_model, settings, seed=3, use_cache=True) == \
        sample_text(gpt2_vocab_model, settings, seed=3, use_cache=False)


def test_sample_text_greedy_rows_agree(gpt2_vocab_model):
    out = sample_text(gpt2_vocab_model, SampleConfig(PROMPT, num_samples=2, max_new_tokens=10, temperature=0), seed=1)
    assert out[0] == out[1]  # greedy decoding of one prompt: every row the same


# -- limits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
def test_too_long_is_a_value_error(model, use_cache):
    idx = prompt_ids(B=1, T=50)
    model.generate(idx, 14, temperature=0, use_cache=use_cache)  # 50 + 14 = block_size: fine
    with pytest.raises(ValueError, match="block_size=64") as err:
        model.generate(idx, 15, temperature=0, use_cache=use_cache)
    assert "50" in str(err.value) and "15" in str(err.value)  # names the prompt length and the ask


def test_sample_text_too_long_is_a_value_error(gpt2_vocab_model):
    with pytest.raises(ValueError, match="block_size=64"):
        sample_text(gpt2_vocab_model, SampleConfig(PROMPT, num_samples=1, max_new_tokens=60))


@pytest.mark.parametrize("temperature,top_k", [(0, None), (1.0, None), (1.0, 50), (5.0, None)])
def test_never_samples_padding(temperature, top_k):
    """A model padded to 50304 whose padding logits are the largest still only emits real tokens."""
    model = make_model(vocab_size=50304, block_size=64, n_layer=1, n_head=2, n_embd=32)
    with torch.no_grad():
        ln_f = model.transformer.ln_f
        ln_f.weight.zero_()  # the final hidden state is ln_f.bias, whatever the input
        ln_f.bias.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
        model.lm_head.weight[50257:] = 100 * ln_f.bias / ln_f.bias.norm()  # padding logits = 100 * |bias|
        logits, _ = model(prompt_ids(B=2, T=4, vocab_size=50257))
    assert (logits.argmax(-1) >= 50257).all()  # unmasked, padding would win every time
    out = model.generate(prompt_ids(B=2, T=4, vocab_size=50257), 24, temperature=temperature, top_k=top_k,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 28)
    assert (out < 50257).all()


def test_top_k_zero_means_no_top_k(model):
    """`train_gpt2.py sample --top-k 0` means all tokens; generate(top_k=0) should too, not crash in topk."""
    idx = prompt_ids()
    outs = [model.generate(idx, 10, temperature=1.0, top_k=k, generator=torch.Generator().manual_seed(5))
            for k in (0, None)]
    assert torch.equal(outs[0], outs[1])
