"""
Token data on disk, as train_gpt2.py's loader reads it: uint16 shards (fineweb.py writes them; build-nanogpt's
names and format) or one .txt file, tokenized once into a cache beside it (tiny Shakespeare is downloaded when
missing). Every shard is checked (format, token range) before step 0.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from support.distributed import Dist, on_every_rank, rank_0_first
from support.errors import TrainError
from support.files import atomic_write, download
from support.tokenizer import get_tokenizer

# the datasets the recipes train on, by the folder `python fineweb.py --preset NAME` writes beside the scripts
DATASETS = {
    "edu_fineweb10B": dict(dataset="HuggingFaceFW/fineweb-edu", name="sample-10BT", prefix="edufineweb"),  # 124M
    "fineweb10B": dict(dataset="HuggingFaceFW/fineweb", name="sample-10BT", prefix="fineweb"),  # the speedrun
    "fineweb100B": dict(dataset="HuggingFaceFW/fineweb", name="sample-100BT", prefix="fineweb"),  # 350M, 774M
    "edu_fineweb100B": dict(dataset="HuggingFaceFW/fineweb-edu", name="sample-100BT", prefix="edufineweb"),  # 1.5B
}


def dataset_dir(name: str) -> Path:
    """A DATASETS entry's folder, beside the scripts whatever the cwd."""
    return Path(__file__).resolve().parent.parent / name


DATA_DIR = dataset_dir("edu_fineweb10B")  # both scripts' default


def shard_name(prefix: str, split: str, index: int) -> str:
    return f"{prefix}_{split}_{index:06d}.npy"


def is_shard(name: str, split: str | None = None) -> bool:
    """Whether a file name is a shard (of that split): PREFIX_{split}_NNNNNN.npy, matched whole, so a prefix
    such as "fw_eval" never makes train shards val."""
    return re.fullmatch(rf".+_(?:{split or 'train|val'})_\d{{6}}\.npy", name) is not None


TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


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
    cache = rank_0_first(lambda: _prepare_text_file(path), dist,
                         TrainError(f"--data {path}: rank 0 could not prepare it (see its error above)"))
    # the others hash the text to find the cache; a node that does not see rank 0's files (no shared file
    # system) fails here, and every rank must hear of it
    return on_every_rank(lambda: np.load(cache or _read_text_file(path)[1]), dist,
                         TrainError(f"--data {path}: another rank could not read its tokens (see its error)"))


def build_command(data_dir: Path) -> str:
    """The command that writes this shard folder (a recipe's dataset), or the general one."""
    if data_dir.name in DATASETS and data_dir.resolve() == dataset_dir(data_dir.name):
        return "python fineweb.py" + ("" if data_dir.name == DATA_DIR.name else f" --preset {data_dir.name}")
    return f"python fineweb.py --out-dir {data_dir} (see its --help for the dataset)"


def find_shards(data_dir: Path, split: str) -> list[Path]:
    if not data_dir.is_dir():
        raise TrainError(f"--data {data_dir}: no such folder: run `{build_command(data_dir)}` to build the shards "
                         "(or pass --data input.txt)")
    shards = sorted(p for p in data_dir.iterdir() if is_shard(p.name, split))
    if not shards:
        raise TrainError(f"--data {data_dir}: no {split} shards (*_{split}_NNNNNN.npy): run "
                         f"`{build_command(data_dir)}`")
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


def text_splits(data: Path, val_fraction: float, dist: Dist) -> dict:
    """A .txt file's tokens, its last val_fraction the val split: {"train": [tokens], "val": [tokens]}."""
    tokens = tokenize_text_file(data, dist)
    n_val = int(len(tokens) * val_fraction)
    return {"train": [tokens[: len(tokens) - n_val]], "val": [tokens[len(tokens) - n_val:]]}


def open_val_split(data: Path, val_fraction: float, vocab_size: int) -> tuple[list, list[str]]:
    """The val split alone (as open_splits, one process): its shards (or a .txt file's tokens) and names, checked."""
    if data.suffix == ".txt" or data.is_file():
        shards, names = text_splits(data, val_fraction, Dist())["val"], [f"{data} (val split)"]
    else:
        shards = find_shards(data, "val")
        names = [str(p) for p in shards]
    for name, shard in zip(names, shards):
        check_tokens(name, shard_tokens(shard), vocab_size)
    return shards, names


def open_splits(data: Path, val_fraction: float, need_val: bool, vocab_size: int, dist: Dist) -> tuple[dict, dict]:
    """The train and val splits ({"train": [...], "val": [...]}: shard paths, or a .txt file's token arrays) and
    their names, every shard checked (format, token range) before step 0. Each rank checks its share of the
    shards; one bad (or unreadable) shard stops every rank."""
    if data.suffix == ".txt" or data.is_file():
        splits = text_splits(data, val_fraction, dist)
        names = {k: [f"{data} ({k} split)"] for k in splits}
    else:
        splits = {"train": find_shards(data, "train"), "val": find_shards(data, "val") if need_val else []}
        names = {k: [str(p) for p in v] for k, v in splits.items()}
    mine = list(zip(names["train"] + names["val"], splits["train"] + splits["val"]))[dist.rank::dist.world_size]
    on_every_rank(lambda: [check_tokens(name, shard_tokens(shard), vocab_size) for name, shard in mine], dist,
                  TrainError("another rank found a bad shard (see its error above)"))
    return splits, names
