"""The sample and export commands of train_gpt2.py, end to end on one of our checkpoints."""

import dataclasses

import pytest
import torch
from transformers import GPT2LMHeadModel

import gpt2
import train_gpt2 as tg
from support.checkpoints import save_checkpoint
from support.sampling import SampleConfig, sample_text
from support.tokenizer import EOT_TOKEN, get_tokenizer


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = gpt2.GPT(gpt2.GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    path = tmp_path / "model_00007.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": dataclasses.asdict(model.config), "step": 7})
    return model.eval(), path


def test_sample_command_is_seeded_and_matches_sample_text(checkpoint, capsys):
    model, path = checkpoint
    args = ["sample", "-m", str(path), "--prompt", "Hello", "--num-return-sequences", "3", "--max-new-tokens", "10",
            "--seed", "5", "--device", "cpu"]
    tg.main(args)
    first = capsys.readouterr().out.splitlines()
    tg.main(args)
    assert capsys.readouterr().out.splitlines() == first  # the same seed, the same text
    expected = sample_text(model, SampleConfig("Hello", 3, 10), seed=5)
    assert first == [f"sample {i}: {t}" for i, t in enumerate(expected)]


def test_sample_command_prompt_too_long_is_one_line_error(checkpoint, capsys):
    _, path = checkpoint
    with pytest.raises(SystemExit) as e:
        tg.main(["sample", "-m", str(path), "--prompt", "word " * 60, "--max-new-tokens", "10", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_gpt2.py: error: prompt of") and "block_size=64" in err and "\n" not in err


def test_export_command_writes_a_folder_transformers_loads(checkpoint, tmp_path, capsys):
    model, path = checkpoint
    out = tmp_path / "hf"
    tg.main(["export", str(path), str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.vocab_size == 50257  # the padded rows are dropped
    idx = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(theirs, ours[..., :50257], rtol=0, atol=1e-4)


def test_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tg.main(["sample", "-m", str(tmp_path / "model_00001.pt")])
    assert e.value.code == 2
    assert "model_00001.pt not found" in capsys.readouterr().err


def test_exported_folder_has_gpt2s_tokenizer_offline(checkpoint, tmp_path):
    from test_tokenizer import TRICKY
    from transformers import AutoTokenizer, pipeline

    model, path = checkpoint
    tg.main(["export", str(path), str(tmp_path / "hf")])
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")  # from the folder alone: no Hub here
    enc = get_tokenizer()
    for text in [*TRICKY, "text <|endoftext|> more"]:
        assert tok(text)["input_ids"] == enc.encode(text, allowed_special={"<|endoftext|>"}), repr(text)
        assert tok.decode(enc.encode_ordinary(text)) == text
    assert tok.eos_token_id == EOT_TOKEN and tok.model_max_length == 64
    # a transformers pipeline on the folder continues a prompt as our greedy decoding does
    generate = pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    theirs = generate("Hello", max_new_tokens=10, do_sample=False)[0]["generated_text"]
    ours = sample_text(model, SampleConfig("Hello", num_samples=1, max_new_tokens=10, temperature=0))[0]
    assert theirs == ours
