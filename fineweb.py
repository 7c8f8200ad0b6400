"""
FineWeb-Edu (or any text dataset) -> the GPT-2 token shards that train_gpt2.py reads.

    python fineweb.py                                           # FineWeb-Edu sample-10BT -> edu_fineweb10B/
    python fineweb.py --preset fineweb100B                      # FineWeb sample-100BT (gpt2-medium, gpt2-large)
    python fineweb.py --preset fineweb10B                       # FineWeb sample-10BT (train_gpt2.py's speedrun)
    python fineweb.py --streaming                               # no full download to disk first
    python fineweb.py --data-files corpus/*.jsonl --out-dir my_shards --shard-size 10000000

The format is build-nanogpt's fineweb.py's, byte for byte: every document becomes
[<|endoftext|>] + encode_ordinary(text), the token stream is cut into shards of exactly --shard-size
uint16 tokens (a document that does not fit continues in the next shard; the last shard holds the
remainder), saved with np.save as {prefix}_val_000000.npy, {prefix}_train_000001.npy, ...: shard 0
is the validation split. Same documents in the same order and the same shard size: same files.

Fast: every core tokenizes. The main process reads documents through `datasets` (prepared as Arrow
files first, or read as a stream with --streaming) and hands ~1 MB batches to worker processes; each
returns one uint16 array, copied into a shard buffer while a thread writes the previous shard. Memory
holds two shard buffers and a few batches, however large the dataset.

Restartable: a shard is written under a temporary name and renamed into place, then manifest.json
(written the same way) lists it with its documents, tokens and sha256. Interrupted, a rerun of the
same command verifies the listed shards, skips the documents they hold, and ends with exactly the
files an uninterrupted run writes. A folder holding another run's shards is refused (--overwrite).

Sections: config, tokenizing workers, dataset, output folder and manifest, shard writer, the main
loop, command line.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import multiprocessing as mp
import os
import queue
import signal
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from support.data import DATA_DIR, DATASETS, dataset_dir, is_shard, shard_name
from support.files import atomic_write, remove_stale_temp_files
from support.flags import add_dataclass_flags
from support.tokenizer import EOT_TOKEN, GPT2_BPE_FILES, get_tokenizer

# -----------------------------------------------------------------------------
# Config: every field is a --kebab-case flag; its comment is the --help text.

@dataclass
class Config:
    preset: str | None = None  # a recipe's dataset: sets --dataset, --name, --out-dir and --prefix (listed below)
    # what to read
    dataset: str = "HuggingFaceFW/fineweb-edu"  # a Hugging Face Hub dataset (ignored with --data-files)
    name: str | None = "sample-10BT"  # the dataset's config; sample-10BT is ~10B GPT-2 tokens
    revision: str | None = None  # a Hub commit or tag to read (default: newest); pinned, a resume reads the same docs
    split: str = "train"  # the split to read
    text_field: str = "text"  # the column that holds each document's text
    data_files: list[str] | None = None  # local .jsonl/.json/.parquet/.txt files or globs, instead of the Hub
    streaming: bool = False  # read as a stream: no full download, and no Arrow copy in datasets' cache
    cache_dir: str | None = None  # where datasets keeps downloads and Arrow files (default: its own)
    # what to write
    out_dir: str = str(DATA_DIR)  # the shard folder (default: edu_fineweb10B/ next to this script)
    prefix: str = "edufineweb"  # shard files are {prefix}_val_000000.npy, {prefix}_train_000001.npy, ...
    shard_size: int = 100_000_000  # tokens per shard (200 MB files); the last shard holds the remainder
    max_tokens: int | None = None  # stop after exactly this many tokens, cutting the last document (default: all)
    overwrite: bool = False  # delete the shards and manifest of another run in --out-dir instead of refusing
    # how
    num_proc: int | None = None  # tokenizing processes (default: every core, os.cpu_count())


TASK_BYTES = 1 << 20  # text shipped to a worker at once: ~1 MB in memory, ~0.1 s of work, many documents
READ_BATCH = 64  # documents read from datasets at a time
TASKS_IN_FLIGHT_PER_PROC = 3  # bounds memory, and keeps every worker busy while the main loop writes
MANIFEST = "manifest.json"


class FinewebError(Exception):
    """A problem the user can fix: main() prints it as one line and exits non-zero."""


def split_of(index: int) -> str:
    return "val" if index == 0 else "train"  # shard 0 is the validation split, as the reference


# -----------------------------------------------------------------------------
# Tokenizing workers: top-level functions, so the spawn start method (macOS, Windows) can import them.
# Documents come in batches and go back as one uint16 array per batch: cheap to pickle.

_enc = None  # this process's tokenizer
_eot = None
_inherited_fds: list[int] = []  # the main process's folder lock, which a forked worker must not hold


def _worker_main(tasks, results):
    """Encode each batch from `tasks` into `results`, in order, until None; exit if the main process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    for fd in _inherited_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    parent = os.getppid()
    _die_with_parent()
    try:
        _tokenizer()
    except Exception as e:  # reported with the first batch, as a result
        error = e
    else:
        error = None
    while True:
        try:
            texts = tasks.get(timeout=2)
        except queue.Empty:
            if os.getppid() != parent:  # orphaned (kill -9 of the main process) and not on Linux
                os._exit(1)
            continue
        if texts is None:
            break
        try:
            if error is not None:
                raise error
            results.put(encode_documents(texts))
        except Exception as e:
            results.put(RuntimeError(f"{type(e).__name__}: {_one_line(e)}"))  # picklable, whatever e was


def _die_with_parent():
    """Linux: a worker whose main process was killed (kill -9) exits at once rather than at its next poll."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _tokenizer():
    global _enc, _eot
    if _enc is None:
        enc = get_tokenizer()
        # the reference asserts each token < 2**16; a vocabulary that fits makes that true of every document
        if enc.max_token_value >= 2**16:
            raise ValueError(f"token ids up to {enc.max_token_value} do not fit in uint16")
        _enc, _eot = enc, EOT_TOKEN
    return _enc


def _encode(enc, text: str) -> np.ndarray:
    try:
        # encode_ordinary's tokens (special-token text is encoded as plain text), without building a list
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    except UnicodeEncodeError:  # lone surrogates: encode_ordinary knows how to repair them
        return np.asarray(enc.encode_ordinary(text), dtype=np.uint32)


class Workers:
    """num_proc tokenizing processes, each with its own queues. A batch goes to the least busy worker; results
    are read back in submission order, so shards fill in dataset order. (multiprocessing.Pool would do, but its
    worker-handler thread spins while large results wait in its pipe: ~3% of a core here.)"""

    def __init__(self, num_proc: int):
        ctx = mp.get_context()
        self.tasks = [ctx.Queue() for _ in range(num_proc)]
        self.results = [ctx.Queue() for _ in range(num_proc)]
        self.procs = [ctx.Process(target=_worker_main, args=(t, r), name=f"fineweb-worker-{i}", daemon=True)
                      for i, (t, r) in enumerate(zip(self.tasks, self.results))]
        for p in self.procs:
            p.start()
        self.busy = [0] * num_proc  # batches handed to each worker and not yet read back
        self.owners = deque()  # the worker of each pending batch, oldest first

    def __len__(self) -> int:
        return len(self.owners)

    def submit(self, texts: list[str]):
        w = min(range(len(self.busy)), key=self.busy.__getitem__)
        self.tasks[w].put(texts)  # pickled and sent by the queue's feeder thread
        self.busy[w] += 1
        self.owners.append(w)

    def next_result(self) -> tuple[np.ndarray, np.ndarray]:
        """The oldest pending batch's (tokens, lengths)."""
        w = self.owners.popleft()
        while True:
            try:
                result = self.results[w].get(timeout=1)
                break
            except queue.Empty:
                if not self.procs[w].is_alive():
                    raise FinewebError(f"tokenizing worker {w} died (exit code {self.procs[w].exitcode}; "
                                       "out of memory?)") from None
        self.busy[w] -= 1
        if isinstance(result, BaseException):
            raise FinewebError(f"tokenizing failed ({result})")
        return result

    def close(self):
        """Let idle workers exit; ones with batches still pending (--max-tokens reached) are killed."""
        if not self.owners:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        self.kill()

    def kill(self):
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join()
        for q in self.tasks + self.results:
            q.cancel_join_thread()  # don't wait to flush batches nobody will read
            q.close()


def encode_documents(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """[EOT] + encode_ordinary(text) for every text, concatenated as uint16, and each document's token count."""
    enc = _tokenizer()
    pieces = [_encode(enc, t) for t in texts]
    lengths = np.fromiter((len(p) + 1 for p in pieces), dtype=np.int64, count=len(pieces))
    out = np.empty(int(lengths.sum()), dtype=np.uint16)
    pos = 0
    for p in pieces:
        out[pos] = _eot
        out[pos + 1:pos + 1 + len(p)] = p
        pos += len(p) + 1
    return out, lengths


# -----------------------------------------------------------------------------
# Dataset: the Hub, or local files, through `datasets`; read in batches of documents

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")  # datasets reads these transparently


def resolve_data_files(patterns: list[str]) -> tuple[str, list[str]]:
    """The datasets builder (json, parquet or text) and the files, in a fixed order."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FinewebError(f"--data-files {pattern}: no such file")
        files += [os.path.abspath(m) for m in matches if os.path.abspath(m) not in files]
    builders = set()
    for f in files:
        name = f.lower()
        for c in COMPRESSIONS:
            name = name.removesuffix(c)
        builder = BUILDERS.get(os.path.splitext(name)[1])
        if builder is None:
            raise FinewebError(f"--data-files {f}: unknown format (use .jsonl, .json, .parquet or .txt)")
        builders.add(builder)
    if len(builders) > 1:
        raise FinewebError(f"--data-files mixes formats ({', '.join(sorted(builders))}): give one kind")
    return builders.pop(), files


def _one_line(e: BaseException) -> str:
    """The first line of an error's message, and of its root cause's (datasets wraps the useful one)."""
    first = lambda x: (str(x).strip().splitlines() or [type(x).__name__])[0]
    root = e
    while root.__cause__ is not None:  # `raise ... from cause`: the explicit chain only
        root = root.__cause__
    text = first(e) if root is e or first(root) in first(e) else f"{first(e)}: {first(root)}"
    return text[:400]


def _no_rows(builder: str, files: list[str]) -> bool:
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            return sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 0
        except Exception:  # not parquet after all: datasets will say so
            return False
    return all(os.path.getsize(f) == 0 for f in files)


def load_documents(cfg: Config, builder: str | None, files: list[str]):
    """A datasets Dataset (memory-mapped Arrow) or IterableDataset (--streaming), checked for the text field."""
    import datasets

    kw = dict(split=cfg.split, streaming=cfg.streaming, cache_dir=cfg.cache_dir)
    if not cfg.streaming and len(files) != 1:  # many files (FineWeb has dozens): download and prepare in parallel
        kw["num_proc"] = cfg.num_proc or os.cpu_count()
    if files and _no_rows(builder, files):  # datasets has no good message for these
        raise FinewebError("the dataset is empty: no documents to tokenize")
    try:
        if files:
            ds = datasets.load_dataset(builder, data_files={cfg.split: files}, **kw)
        else:
            ds = datasets.load_dataset(cfg.dataset, name=cfg.name or None, revision=cfg.revision, **kw)
        columns = ds.column_names
        if columns is None:  # a stream whose schema is only known once read
            first = next(iter(ds), None)
            columns = list(first) if first is not None else [cfg.text_field]
    except StopIteration:  # what datasets raises for files with no rows at all
        raise FinewebError("the dataset is empty: no documents to tokenize") from None
    except Exception as e:
        if files:
            raise FinewebError(f"could not read --data-files: {_one_line(e)}") from None
        config = f", config {cfg.name}" if cfg.name else ""
        raise FinewebError(f"could not load dataset {cfg.dataset}{config} (offline?): {_one_line(e)}; "
                           "for local files use --data-files path/to/*.jsonl") from None
    if cfg.text_field not in columns:
        raise FinewebError(f"the dataset has no field '{cfg.text_field}'; its fields are: {', '.join(columns)} "
                           "(choose one with --text-field)")
    if not cfg.streaming and len(ds) == 0:
        raise FinewebError("the dataset is empty: no documents to tokenize")
    return ds


def iter_batches(ds, cfg: Config, start_doc: int):
    """(index of the batch's first document, its texts): ~TASK_BYTES of text each, from start_doc on, in order."""
    if start_doc:
        ds = ds.skip(start_doc)  # documents of shards already complete: read past, never tokenized
    base, texts, size = start_doc, [], 0
    try:
        for batch in ds.select_columns([cfg.text_field]).iter(batch_size=READ_BATCH):
            for t in batch[cfg.text_field]:
                if type(t) is not str:  # exactly str: what tiktoken takes
                    raise FinewebError(f"document {base + len(texts)}: field '{cfg.text_field}' holds "
                                       f"{type(t).__name__}, not text")
                texts.append(t)
                size += sys.getsizeof(t)  # memory, not characters: 1 to 4 bytes a character
            if size >= TASK_BYTES:
                yield base, texts
                base, texts, size = base + len(texts), [], 0
    except FinewebError:
        raise
    except Exception as e:
        raise FinewebError(f"reading the dataset failed after document {base + len(texts)} ({_one_line(e)})") \
            from None
    if texts:
        yield base, texts


# -----------------------------------------------------------------------------
# Output folder and manifest


def run_identity(cfg: Config, builder: str | None, files: list[str]) -> dict:
    """What the shards depend on: a folder holding shards with another identity is refused."""
    return {
        "dataset": builder if files else cfg.dataset,
        "name": None if files else cfg.name,
        "revision": None if files else cfg.revision,
        "split": cfg.split,
        "data_files": files or None,
        "text_field": cfg.text_field,
        "shard_size": cfg.shard_size,
        "prefix": cfg.prefix,
        "max_tokens": cfg.max_tokens,
        "tokenizer": {"encoding": "gpt2", "eot_token": EOT_TOKEN, "sha256": dict(GPT2_BPE_FILES)},
    }


def prepare_out_dir(out: Path) -> bool:
    """Create the folder and prove it writable, before any work. True if we created it."""
    if out.exists() and not out.is_dir():
        raise FinewebError(f"--out-dir {out} is a file, not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", suffix=".tmp0", dir=out)  # a stale temp name if left
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise FinewebError(f"output folder {out} is not writable ({e.strerror or e})") from None
    return created


def lock_out_dir(out: Path) -> int | None:
    """An exclusive lock on the folder itself (no lock file to leave behind): one run per folder."""
    try:
        import fcntl
    except ImportError:  # Windows: no locking
        return None
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FinewebError(f"another fineweb.py is writing to {out}") from None
    except OSError:  # a filesystem without locks (some network ones): go on unlocked
        os.close(fd)
        return None
    return fd


def write_manifest(out: Path, manifest: dict):
    with atomic_write(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        assert isinstance(manifest.get("run"), dict) and isinstance(manifest.get("shards"), list)
        return manifest
    except (OSError, ValueError, AssertionError):
        raise FinewebError(f"{path} is unreadable: use --overwrite to start {out} afresh") from None


def check_folder(out: Path, identity: dict, overwrite: bool) -> dict | None:
    """The manifest of a run we may resume, or None to start afresh; refuses to mix runs."""
    shards = sorted(p.name for p in out.iterdir() if is_shard(p.name))  # anyone's shards, ours or the reference's
    if overwrite:
        for name in shards + [MANIFEST]:
            (out / name).unlink(missing_ok=True)
        return None
    manifest = read_manifest(out)
    if manifest is None:
        if shards:
            raise FinewebError(f"{out} holds .npy shards ({shards[0]}, ...) but no {MANIFEST} (written by another "
                               "script?): use --overwrite to replace them, or another --out-dir")
        return None
    old = manifest["run"]
    if any(old.get(k) != v for k, v in identity.items()):  # a key an older manifest lacks counts as None
        if not shards and not manifest["shards"]:
            return None  # a run that stopped before its first shard: nothing to mix with
        diff = "; ".join(f"{k} {old.get(k)!r} there, {v!r} now" for k, v in identity.items() if old.get(k) != v)
        raise FinewebError(f"{out} holds the shards of another run ({diff}): use --overwrite to replace them, "
                           "or another --out-dir")
    return manifest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def verified_shards(out: Path, records: list[dict]) -> list[dict]:
    """The listed shards, up to the first one that is missing or not what was written."""
    good = []
    for i, r in enumerate(records):
        path = out / r["file"]
        if r.get("index") != i or not path.is_file() or path.stat().st_size != r["bytes"] \
                or file_sha256(path) != r["sha256"]:
            break
        good.append(r)
    return good


# -----------------------------------------------------------------------------
# Shard writer: a background thread saves one full buffer while the main loop fills the other.


class ShardWriter:
    def __init__(self, out: Path, manifest: dict):
        from concurrent.futures import ThreadPoolExecutor

        self.out, self.manifest = out, manifest
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="fineweb-writer")
        self.pending = None

    def submit(self, tokens: np.ndarray, record: dict):
        self.wait()  # one write at a time: two shard buffers in all
        self.pending = self.executor.submit(self._write, tokens, record)

    def wait(self):
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self):
        try:
            self.wait()
        finally:
            self.executor.shutdown()

    def _write(self, tokens: np.ndarray, record: dict):
        try:
            with atomic_write(self.out / record["file"]) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, tokens)  # numpy's standard header for a 1-D uint16 array: the reference's bytes
                record["bytes"] = tmp.stat().st_size
                record["sha256"] = file_sha256(tmp)
            # listed only once complete and in place: the manifest never names a partial shard
            self.manifest["shards"].append(record)
            write_manifest(self.out, self.manifest)
        except OSError as e:  # disk full, folder gone, ...
            raise FinewebError(f"could not write {self.out / record['file']} ({e.strerror or e})") from None


# -----------------------------------------------------------------------------
# The main loop: cut the token stream into shards of exactly shard_size tokens


class Sharder:
    """Fills shard buffers from batches of documents; tracks where each shard ends (document, offset)."""

    def __init__(self, cfg: Config, writer: ShardWriter, index: int, tokens: int, doc: int, offset: int, bar):
        self.size, self.max_tokens, self.prefix = cfg.shard_size, cfg.max_tokens, cfg.prefix
        self.writer, self.bar = writer, bar
        self.buffers = [np.empty(self.size, dtype=np.uint16) for _ in range(2)]  # untouched pages cost no RAM
        self.fill = 0
        self.index = index  # of the shard being filled
        self.tokens = tokens  # written or buffered, this run and the ones before
        self.started = doc + (offset > 0)  # documents whose first token is written or buffered
        self.shard_first = self.started  # self.started when the current shard began
        self.next_doc, self.next_offset = doc, offset

    @property
    def done(self) -> bool:
        return self.max_tokens is not None and self.tokens >= self.max_tokens

    def add(self, base: int, tokens: np.ndarray, lengths: np.ndarray, skip: int = 0):
        """Documents base, base+1, ...: their tokens, of which the first `skip` are already in earlier shards."""
        ends = np.cumsum(lengths)
        pos, stop = skip, len(tokens)
        if self.max_tokens is not None:
            stop = min(stop, pos + self.max_tokens - self.tokens)
        while pos < stop:
            buf = self.buffers[self.index % 2]
            take = min(self.size - self.fill, stop - pos)
            buf[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.fill += take
            pos += take
            self.tokens += take
            self.bar.update(take)
            self._mark(base, ends, pos)
            if self.fill == self.size:  # full: a document that did not fit continues in the next shard
                self.flush()
        self._mark(base, ends, pos)

    def _mark(self, base: int, ends: np.ndarray, pos: int):
        j = int(np.searchsorted(ends, pos, side="right"))  # documents wholly before pos
        self.next_doc = base + j
        self.next_offset = pos - int(ends[j - 1]) if j > 0 else pos
        if j == len(ends):
            self.next_offset = 0
        self.started = self.next_doc + (self.next_offset > 0)

    def flush(self):
        if self.fill == 0:
            return
        split = split_of(self.index)
        record = {"index": self.index, "file": shard_name(self.prefix, split, self.index), "split": split,
                  "tokens": self.fill,
                  "documents": self.started - self.shard_first,  # documents that begin in this shard
                  "next_document": self.next_doc, "next_offset": self.next_offset}  # where the next shard begins
        self.writer.submit(self.buffers[self.index % 2][:self.fill], record)
        self.index += 1
        self.fill = 0
        self.shard_first = self.started


def build_shards(cfg: Config) -> dict:
    """Tokenize the dataset into shards in cfg.out_dir; returns the run's summary."""
    t0 = time.time()
    builder, files = resolve_data_files(cfg.data_files) if cfg.data_files else (None, [])
    out = Path(cfg.out_dir)
    created = prepare_out_dir(out)
    lock = lock_out_dir(out)
    writer, fresh = None, False
    try:
        remove_stale_temp_files(out)  # left by a run that was killed
        identity = run_identity(cfg, builder, files)
        manifest = check_folder(out, identity, cfg.overwrite)
        fresh = manifest is None
        done = verified_shards(out, manifest["shards"]) if manifest else []
        if manifest and manifest.get("complete") and len(done) == len(manifest["shards"]):
            print(f"fineweb.py: {out} is already complete ({len(done)} shards): nothing to do")
            return {"documents": manifest["documents"], "tokens": manifest["tokens"], "shards": len(done),
                    "seconds": time.time() - t0, "new_tokens": 0, "out_dir": str(out)}
        doc, offset = (done[-1]["next_document"], done[-1]["next_offset"]) if done else (0, 0)
        tokens_done = sum(r["tokens"] for r in done)
        if done:
            print(f"fineweb.py: resuming after {len(done)} complete shards ({tokens_done:,} tokens), "
                  f"at document {doc:,}")

        num_proc = cfg.num_proc or os.cpu_count() or 1
        _inherited_fds[:] = [lock] if lock is not None else []
        # started before the dataset loads: the workers build their tokenizers meanwhile
        workers = Workers(num_proc)
        try:
            ds = load_documents(cfg, builder, files)
            batches = iter_batches(ds, cfg, doc)
            first = next(batches, None)
            if first is None and doc == 0:
                raise FinewebError("the dataset is empty: no documents to tokenize")
            manifest = {"format": "uint16 .npy shards of [<|endoftext|>] + encode_ordinary(text) per document",
                        "run": identity, "complete": False, "documents": None, "tokens": None, "shards": list(done)}
            write_manifest(out, manifest)  # claims the folder before the first shard lands in it
            writer = ShardWriter(out, manifest)
            summary = _tokenize(cfg, workers, first, batches, writer, len(done), tokens_done, doc, offset)
            workers.close()
        finally:
            workers.kill()
        writer.close()
        manifest.update(complete=True, documents=summary["documents"], tokens=summary["tokens"])
        write_manifest(out, manifest)
        summary.update(seconds=time.time() - t0, out_dir=str(out))
        return summary
    except BaseException:
        _clean_up_failed_run(out, writer, fresh, created)
        raise
    finally:
        _inherited_fds.clear()
        if lock is not None:
            os.close(lock)


def _clean_up_failed_run(out: Path, writer: ShardWriter | None, fresh: bool, created: bool) -> None:
    """What a failed or interrupted run leaves: its complete shards, and nothing else of its own."""
    if writer is not None:
        try:
            writer.close()  # let a shard being written land (or be removed): never leave half of one
        except BaseException:
            pass
    remove_stale_temp_files(out)
    if fresh and writer is not None and not writer.manifest["shards"]:
        (out / MANIFEST).unlink(missing_ok=True)  # ours, and naming no shard: leave the folder as it was
    if created and not any(out.iterdir()):
        out.rmdir()


def _tokenize(cfg, workers, first, batches, writer, index, tokens_done, doc, offset) -> dict:
    """Batches go to the workers, a bounded number at a time; results come back in order into the shards."""
    from tqdm import tqdm

    # the bar after the workers start: its monitor thread stays out of forked processes
    bar = tqdm(total=cfg.max_tokens, initial=tokens_done, unit="tok", unit_scale=True, desc="tokenizing",
               dynamic_ncols=True)
    try:
        sharder = Sharder(cfg, writer, index, tokens_done, doc, offset, bar)
        bases = deque()  # the first document of each pending batch
        pending = first
        while not sharder.done:
            while pending is not None and len(workers) < TASKS_IN_FLIGHT_PER_PROC * len(workers.procs):
                bases.append(pending[0])
                workers.submit(pending[1])
                pending = next(batches, None)
            if not bases:
                break
            base = bases.popleft()
            tokens, lengths = workers.next_result()
            sharder.add(base, tokens, lengths, skip=offset if base == doc else 0)
        sharder.flush()  # the remainder
    finally:
        bar.close()
    return {"documents": sharder.started, "tokens": sharder.tokens, "shards": sharder.index,
            "new_tokens": sharder.tokens - tokens_done}


# -----------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fineweb.py", description="Tokenize a text dataset (default: FineWeb-Edu sample-10BT) into GPT-2 "
        "uint16 .npy shards for train_gpt2.py, in build-nanogpt's format.",
        epilog="--data-files: .jsonl/.json (one JSON object per line, the text in --text-field), .parquet, or "
        ".txt (one document per line, field 'text'). Interrupted? Rerun the same command: complete shards are "
        "kept and the run continues after them.")
    add_dataclass_flags(p, Config, unset_is_absent=True, extra={"data_files": dict(metavar="FILE"),
                                                                "preset": dict(choices=sorted(DATASETS))})
    p.epilog += " Presets: " + "; ".join(f"{k}: {v}" for k, v in DATASETS.items()) + "."
    return p


def parse_args(argv: list[str] | None = None) -> Config:
    p = build_parser()
    given = vars(p.parse_args(argv))  # only the flags on the command line: they override the preset's
    preset = given.get("preset")
    cfg = Config(**{**(dict(DATASETS[preset], out_dir=str(dataset_dir(preset))) if preset else {}), **given})
    for name in ("shard_size", "max_tokens", "num_proc"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        s = build_shards(cfg)
    except FinewebError as e:
        sys.exit(f"fineweb.py: error: {e}")
    except KeyboardInterrupt:
        print("\nfineweb.py: interrupted: the complete shards are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    rate = s["new_tokens"] / max(s["seconds"], 1e-9)
    print(f"fineweb.py: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['shards']} shards "
          f"in {s['seconds']:.1f} s ({rate:,.0f} tokens/s) -> {s['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
