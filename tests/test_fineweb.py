"""fineweb.py: exact tokens, the reference's bytes, resume after kill -9 and Ctrl-C, spawn, errors, memory.

Every dataset is a small local file written here. datasets keeps its cache under tmp_path (--cache-dir,
and HF_HOME for subprocesses, which also run with Hugging Face offline): nothing touches the network or
~/.cache.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` puts tests/, not the repo root, on sys.path
    sys.path.insert(0, str(ROOT))

import fineweb  # noqa: E402
from support.tokenizer import EOT_TOKEN, GPT2_BPE_FILES, get_tokenizer  # noqa: E402

WORDS = ("the of and to in is was that for on with as by at from his her they which one you were all we "
         "language model token shard über café naïve 東京 データ 🙂 — 1984 3.14 #tag @user don't it's").split()
SEPARATORS = [" "] * 8 + [", ", ". ", "\n", "\n\n", "  ", "\t"]

# -----------------------------------------------------------------------------
# helpers


def make_docs(n: int, seed: int = 0, max_words: int = 300) -> list[str]:
    rng = random.Random(seed)
    docs = ["".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(rng.randint(1, max_words)))
            for _ in range(n)]
    docs[1] = ""  # an empty document is still its <|endoftext|>
    docs[2] = "special-token text <|endoftext|> inside a document is ordinary text"
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({field: d, "id": i}) + "\n")
    return path


def doc_tokens(docs: list[str]) -> list[np.ndarray]:
    """The reference's per-document encoding: <|endoftext|> then encode_ordinary."""
    enc = get_tokenizer()
    return [np.array([EOT_TOKEN] + enc.encode_ordinary(d), dtype=np.uint16) for d in docs]


def run(tmp_path: Path, data: Path, out: Path, *extra, num_proc: int | None = 2) -> Path:
    argv = ["--data-files", str(data), "--out-dir", str(out), "--cache-dir", str(tmp_path / "hf"),
            *(["--num-proc", str(num_proc)] if num_proc else []), *map(str, extra)]
    assert fineweb.main(argv) == 0
    return out


def shards(out: Path) -> list[Path]:
    return sorted(out.glob("*.npy"), key=lambda p: int(p.stem[-6:]))


def all_tokens(out: Path) -> np.ndarray:
    return np.concatenate([np.load(p) for p in shards(out)])


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def cli_env(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def cli(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "fineweb.py", *map(str, args)], cwd=ROOT, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("fineweb.py: error:")]
    assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def reference_shards(docs: list[str], shard_size: int, out: Path):
    """build-nanogpt's shard loop, re-stated: append while a document fits strictly, else fill the shard
    with its head, save, and start the next shard with its tail. (Its tails must fit in one shard.)"""
    out.mkdir()
    buf, count, index = np.empty(shard_size, dtype=np.uint16), 0, 0
    for tokens in doc_tokens(docs):
        if count + len(tokens) < shard_size:
            buf[count:count + len(tokens)] = tokens
            count += len(tokens)
            continue
        head = shard_size - count
        buf[count:] = tokens[:head]
        np.save(out / f"edufineweb_{'val' if index == 0 else 'train'}_{index:06d}", buf)
        index += 1
        count = len(tokens) - head
        buf[:count] = tokens[head:]
    if count:
        np.save(out / f"edufineweb_{'val' if index == 0 else 'train'}_{index:06d}", buf[:count])


# -----------------------------------------------------------------------------
# the tokens and the bytes


def test_encode_documents_is_eot_plus_encode_ordinary():
    texts = ["hello world", "", "<|endoftext|> as plain text", "naïve 東京 🙂\n\n  x", "lone surrogate \ud800 ok"]
    tokens, lengths = fineweb.encode_documents(texts)
    enc = get_tokenizer()
    expected = [[EOT_TOKEN] + enc.encode_ordinary(t) for t in texts]
    assert tokens.dtype == np.uint16
    assert lengths.tolist() == [len(e) for e in expected]
    assert tokens.tolist() == [t for e in expected for t in e]


def test_shards_are_the_per_document_encoding(tmp_path):
    docs = make_docs(300)
    shard_size = 7_777  # odd, so shard boundaries fall inside documents
    out = run(tmp_path, write_jsonl(tmp_path / "docs.jsonl", docs), tmp_path / "out", "--shard-size", shard_size)
    per_doc = doc_tokens(docs)
    expected = np.concatenate(per_doc)
    n = -(-len(expected) // shard_size)
    assert n >= 4
    assert [p.name for p in shards(out)] == ["edufineweb_val_000000.npy"] + \
        [f"edufineweb_train_{i:06d}.npy" for i in range(1, n)]
    sizes = [len(np.load(p)) for p in shards(out)]
    assert sizes[:-1] == [shard_size] * (n - 1) and 0 < sizes[-1] <= shard_size
    np.testing.assert_array_equal(all_tokens(out), expected)
    # some document really is split across a shard boundary
    starts = set(np.cumsum([len(t) for t in per_doc]) - [len(t) for t in per_doc])
    assert any(b not in starts for b in range(shard_size, len(expected), shard_size))
    m = manifest(out)
    assert m["complete"] and m["tokens"] == len(expected) and m["documents"] == len(docs)
    assert m["run"]["shard_size"] == shard_size and m["run"]["text_field"] == "text"
    assert m["run"]["tokenizer"]["sha256"] == GPT2_BPE_FILES
    for rec, p in zip(m["shards"], shards(out), strict=True):
        t = np.load(p)
        assert rec["file"] == p.name and rec["tokens"] == len(t)
        assert rec["documents"] == int((t == EOT_TOKEN).sum())  # the documents that begin in it
        assert rec["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert not list(out.glob(".*")), "temporary files left behind"


@pytest.mark.parametrize("shard_size", [1000, "exact"])
def test_bytes_match_the_reference_script(tmp_path, shard_size):
    docs = make_docs(200, seed=1, max_words=60)  # tails shorter than a shard: the reference can't do longer
    if shard_size == "exact":  # shard 0 ends exactly at a document's end: the reference's `<` branch
        shard_size = sum(len(t) for t in doc_tokens(docs[:5]))
    out = run(tmp_path, write_jsonl(tmp_path / "docs.jsonl", docs), tmp_path / "out", "--shard-size", shard_size)
    reference_shards(docs, shard_size, tmp_path / "ref")
    ours = {k: v for k, v in folder_bytes(out).items() if k != "manifest.json"}
    assert len(ours) >= 3 and ours == folder_bytes(tmp_path / "ref")


@pytest.mark.parametrize("streaming", [False, True])
def test_document_longer_than_several_shards_and_resume_inside_it(tmp_path, capsys, streaming):
    docs = make_docs(40, seed=2, max_words=50)
    docs[20] = " ".join(WORDS * 80)  # thousands of tokens: its tail spans several shards
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    run_ = lambda *a: run(tmp_path, *a, *(["--streaming"] if streaming else []))
    out = run_(data, tmp_path / "out", "--shard-size", 500)
    np.testing.assert_array_equal(all_tokens(out), np.concatenate(doc_tokens(docs)))
    m = manifest(out)
    inside = [r for r in m["shards"] if r["documents"] == 0]  # shards wholly inside the long document
    assert len(inside) >= 2
    before = folder_bytes(out)
    # as if killed right after the first of those shards: the rerun must continue mid-document
    k = inside[0]["index"] + 1
    assert m["shards"][k - 1]["next_document"] == 20 and m["shards"][k - 1]["next_offset"] > 500
    for p in shards(out)[k:]:
        p.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in shards(out)}
    (out / "manifest.json").write_text(json.dumps({**m, "complete": False, "shards": m["shards"][:k]}))
    capsys.readouterr()
    run_(data, out, "--shard-size", 500)
    assert f"resuming after {k} complete shards" in capsys.readouterr().out
    assert folder_bytes(out) == before
    assert {p.name: p.stat().st_mtime_ns for p in shards(out)[:k]} == kept  # skipped, not rewritten
    # a damaged shard is found by its sha256 and rebuilt with everything after it
    damaged = shards(out)[2]
    damaged.write_bytes(damaged.read_bytes()[:-2] + b"\x00\x00")
    m = manifest(out)
    (out / "manifest.json").write_text(json.dumps({**m, "complete": False}))
    run_(data, out, "--shard-size", 500)
    assert folder_bytes(out) == before
    # complete and intact: a rerun has nothing to do
    capsys.readouterr()
    run_(data, out, "--shard-size", 500)
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["txt", "parquet", "jsonl-streaming"])
def test_txt_parquet_streaming_and_text_field(tmp_path, kind):
    docs = [d.replace("\n", " ").replace("\t", " ") or "x" for d in make_docs(120, seed=3)]  # one line each
    if kind == "txt":
        data, extra = tmp_path / "docs.txt", []
        data.write_text("".join(d + "\n" for d in docs))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        data, extra = tmp_path / "docs.parquet", ["--text-field", "content", "--split", "validation", "--prefix", "pq"]
        pq.write_table(pa.table({"content": docs, "n": list(range(len(docs)))}), data)
    else:
        data, extra = write_jsonl(tmp_path / "docs.jsonl", docs), ["--streaming"]
    out = run(tmp_path, data, tmp_path / "out", "--shard-size", 3000, *extra)
    np.testing.assert_array_equal(all_tokens(out), np.concatenate(doc_tokens(docs)))
    assert manifest(out)["documents"] == len(docs)
    if kind == "parquet":
        assert shards(out)[0].name == "pq_val_000000.npy" and shards(out)[1].name == "pq_train_000001.npy"
        assert manifest(out)["run"]["split"] == "validation" and manifest(out)["run"]["text_field"] == "content"


@pytest.mark.parametrize("streaming", [False, True])
def test_several_files_and_globs_keep_their_order(tmp_path, streaming):
    docs = make_docs(150, seed=9)
    for i in range(3):  # prepared by several processes (--no-streaming), yet read back in file order
        write_jsonl(tmp_path / f"part{i}.jsonl", docs[50 * i:50 * (i + 1)])
    out = tmp_path / "out"
    assert fineweb.main(["--data-files", str(tmp_path / "part0.jsonl"), str(tmp_path / "part[12].jsonl"),
                         "--out-dir", str(out), "--shard-size", "2000", "--cache-dir", str(tmp_path / "hf"),
                         "--num-proc", "2", *(["--streaming"] if streaming else [])]) == 0
    np.testing.assert_array_equal(all_tokens(out), np.concatenate(doc_tokens(docs)))
    assert manifest(out)["run"]["data_files"] == [str(tmp_path / f"part{i}.jsonl") for i in range(3)]


def test_defaults(tmp_path, monkeypatch):
    cfg = fineweb.parse_args([])
    assert (cfg.dataset, cfg.name, cfg.split, cfg.text_field) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train",
                                                                  "text")
    assert (cfg.shard_size, cfg.prefix, cfg.streaming, cfg.max_tokens) == (100_000_000, "edufineweb", False, None)
    assert Path(cfg.out_dir) == ROOT / "edu_fineweb10B"  # next to the script, wherever it is run from
    started = []  # --num-proc defaults to every core
    init = fineweb.Workers.__init__
    monkeypatch.setattr(fineweb.Workers, "__init__", lambda self, n: started.append(n) or init(self, n))
    run(tmp_path, write_jsonl(tmp_path / "docs.jsonl", make_docs(20)), tmp_path / "out", num_proc=None)
    assert started == [os.cpu_count()]


def test_max_tokens_is_exact(tmp_path):
    docs = make_docs(100, seed=4)
    out = run(tmp_path, write_jsonl(tmp_path / "docs.jsonl", docs), tmp_path / "out",
              "--shard-size", 4000, "--max-tokens", 10_001)
    assert [len(np.load(p)) for p in shards(out)] == [4000, 4000, 2001]
    np.testing.assert_array_equal(all_tokens(out), np.concatenate(doc_tokens(docs))[:10_001])
    assert manifest(out)["tokens"] == 10_001 and manifest(out)["run"]["max_tokens"] == 10_001


def test_spawn_start_method(tmp_path):
    docs = make_docs(200, seed=5)
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    fork = run(tmp_path, data, tmp_path / "fork", "--shard-size", 5000)
    script = tmp_path / "spawned.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing as mp, sys
        sys.path.insert(0, {str(ROOT)!r})
        import fineweb

        if __name__ == "__main__":
            mp.set_start_method("spawn")  # macOS's and Windows' default: workers import, never inherit
            sys.exit(fineweb.main(sys.argv[1:]))
    """))
    r = subprocess.run([sys.executable, str(script), "--data-files", data, "--out-dir", tmp_path / "spawn",
                        "--shard-size", "5000", "--num-proc", "2", "--cache-dir", tmp_path / "hf"],
                       env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert folder_bytes(tmp_path / "spawn") == folder_bytes(fork)
    # the progress bar over tokens (stderr) and the summary (stdout)
    assert "tokenizing" in r.stderr and "tok/s" in r.stderr
    n_tokens = sum(len(t) for t in doc_tokens(docs))
    assert f"{len(docs):,} documents, {n_tokens:,} tokens, {len(shards(fork))} shards in" in r.stdout
    assert "tokens/s" in r.stdout


# -----------------------------------------------------------------------------
# interrupted runs: kill -9 and Ctrl-C, then a rerun


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A corpus that takes a few seconds on one core, and its uninterrupted shards."""
    tmp = tmp_path_factory.mktemp("big")
    rng = random.Random(6)
    paragraphs = make_docs(400, seed=6)
    docs = ["".join(rng.choice(paragraphs) for _ in range(8)) for _ in range(4000)]
    data = write_jsonl(tmp / "big.jsonl", docs)
    args = ["--data-files", str(data), "--shard-size", "200000", "--cache-dir", str(tmp / "hf")]
    assert fineweb.main(args + ["--out-dir", str(tmp / "clean"), "--num-proc", "2"]) == 0
    return tmp, data, args, folder_bytes(tmp / "clean")


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def interrupt_midrun(tmp_path, args, out: Path, sig: int) -> subprocess.Popen:
    """Start fineweb.py and send `sig` once its first shard is complete (listed in the manifest)."""
    log = open(tmp_path / "log.txt", "w+")
    proc = subprocess.Popen([sys.executable, "fineweb.py", *args, "--out-dir", str(out), "--num-proc", "1"],
                            cwd=ROOT, env=cli_env(tmp_path), stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if manifest(out)["shards"]:
                    break
            except (OSError, ValueError):
                pass
            assert proc.poll() is None, "fineweb.py ended before it could be interrupted"
            time.sleep(0.005)
        workers = children(proc.pid)
        assert workers or not Path(f"/proc/{proc.pid}/task").exists(), "no worker processes seen"
        assert proc.poll() is None, "fineweb.py ended before it could be interrupted"
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # as Ctrl-C in a terminal: the whole process group
        else:
            os.kill(proc.pid, sig)  # kill -9 of the main process: its workers must not outlive it
        proc.wait(timeout=60)
        # no worker outlives the main process
        deadline = time.time() + 10
        while any(Path(f"/proc/{w}").exists() and "zombie" not in _state(w) for w in workers) \
                and time.time() < deadline:
            time.sleep(0.05)
        assert not any(Path(f"/proc/{w}").exists() and "zombie" not in _state(w) for w in workers)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.seek(0)
        proc.log = log.read()
        log.close()
    return proc


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]
    except (OSError, IndexError):
        return "zombie"


@pytest.mark.parametrize("how", ["kill -9", "ctrl-c"])
def test_interrupted_then_rerun_gives_identical_files(tmp_path, big, capsys, how):
    tmp, data, args, clean = big
    out = tmp_path / "out"
    proc = interrupt_midrun(tmp_path, args, out, signal.SIGKILL if how == "kill -9" else signal.SIGINT)
    if how == "kill -9":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, proc.log
        assert "interrupted" in proc.log and "Traceback" not in proc.log
        assert not list(out.glob(".*.tmp*")), "Ctrl-C left a temporary file"
    m = manifest(out)
    assert not m["complete"] and 1 <= len(m["shards"]) < len(clean) - 1
    kept = {r["file"]: (out / r["file"]).stat().st_mtime_ns for r in m["shards"]}
    (out / ".edufineweb_train_000099.npy.tmp4242").write_bytes(b"half a shard")  # as a kill during a write leaves
    capsys.readouterr()
    assert fineweb.main(args + ["--out-dir", str(out), "--num-proc", "2"]) == 0
    assert f"resuming after {len(m['shards'])} complete shards" in capsys.readouterr().out
    assert folder_bytes(out) == clean  # the same files, byte for byte, manifest included
    assert {f: (out / f).stat().st_mtime_ns for f in kept} == kept  # the complete shards were skipped


# -----------------------------------------------------------------------------
# memory


@pytest.mark.parametrize("mode", ["--streaming", "--no-streaming"])
def test_memory_stays_bounded(tmp_path, big, mode):
    """The main process holds two shard buffers, a few batches in flight and whatever datasets reads at a time:
    its peak does not grow with the dataset (traced Python and numpy allocations; the workers' are their own)."""
    tmp, data, args, clean = big
    n_tokens = manifest(tmp / "clean")["tokens"]
    peaks = []
    for max_tokens in (n_tokens // 4, n_tokens):
        tracemalloc.start()
        try:
            assert fineweb.main(args + ["--out-dir", str(tmp_path / f"out{max_tokens}"), "--num-proc", "2", mode,
                                        "--max-tokens", str(max_tokens)]) == 0
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert manifest(tmp_path / f"out{n_tokens}")["tokens"] == n_tokens
    # holding the extra 3/4 of the tokens would add > 10 MiB, of the text > 15 MiB
    assert 2 * n_tokens * 3 / 4 > 10 * 2**20 and data.stat().st_size * 3 / 4 > 15 * 2**20
    grown = (peaks[1] - peaks[0]) / 2**20
    assert grown < 4, f"peak grew by {grown:.1f} MiB for 4x the data ({[p / 2**20 for p in peaks]} MiB)"


# -----------------------------------------------------------------------------
# errors: one line on stderr, a non-zero exit, nothing half-written


def test_error_dataset_unreachable(tmp_path):
    r = cli(tmp_path, "--dataset", "nobody/no-such-dataset", "--out-dir", tmp_path / "out")
    assert_one_line_error(r, "could not load dataset nobody/no-such-dataset", "offline", "--data-files")
    assert not (tmp_path / "out").exists()


def test_error_missing_text_field(tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", make_docs(10), field="body")
    r = cli(tmp_path, "--data-files", data, "--out-dir", tmp_path / "out", "--cache-dir", tmp_path / "hf")
    assert_one_line_error(r, "no field 'text'", "body, id", "--text-field")
    assert not (tmp_path / "out").exists()


def test_error_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    r = cli(tmp_path, "--data-files", tmp_path / "empty.jsonl", "--out-dir", tmp_path / "out",
            "--cache-dir", tmp_path / "hf")
    assert_one_line_error(r, "empty")
    assert not (tmp_path / "out").exists()
    # rows of nothing (a parquet file with a schema and no rows), in-process this time
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit, match="empty"):
        run(tmp_path, tmp_path / "empty.parquet", tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_error_unwritable_out_dir_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    # a dataset that could not load either: the folder is checked first, before anything slow
    r = cli(tmp_path, "--dataset", "nobody/no-such-dataset", "--out-dir", tmp_path / "a_file" / "shards")
    assert_one_line_error(r, "not writable")
    r = cli(tmp_path, "--dataset", "nobody/no-such-dataset", "--out-dir", tmp_path / "a_file")
    assert_one_line_error(r, "is a file")


def test_refuses_to_mix_with_another_run(tmp_path):
    docs = make_docs(60, seed=7)
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = run(tmp_path, data, tmp_path / "out", "--shard-size", 1000)
    before = folder_bytes(out)
    r = cli(tmp_path, "--data-files", data, "--out-dir", out, "--shard-size", 2000, "--cache-dir", tmp_path / "hf")
    assert_one_line_error(r, "another run", "shard_size 1000 there, 2000 now", "--overwrite")
    other = write_jsonl(tmp_path / "other.jsonl", docs[:30])
    with pytest.raises(SystemExit, match="data_files"):
        run(tmp_path, other, out, "--shard-size", 1000)
    with pytest.raises(SystemExit, match="prefix"):
        run(tmp_path, data, out, "--shard-size", 1000, "--prefix", "mine")
    assert folder_bytes(out) == before
    run(tmp_path, data, out, "--shard-size", 2000, "--overwrite")
    assert manifest(out)["run"]["shard_size"] == 2000
    assert all(len(np.load(p)) == 2000 for p in shards(out)[:-1])
    np.testing.assert_array_equal(all_tokens(out), np.concatenate(doc_tokens(docs)))


def test_hub_revision_is_passed_and_pinned_in_the_manifest(tmp_path, monkeypatch):
    import datasets

    docs = make_docs(40, seed=9)
    calls = []

    def fake_hub(path, name=None, revision=None, **kw):  # the Hub, offline: what it was asked for, local rows
        calls.append((path, name, revision, kw["split"]))
        return datasets.Dataset.from_dict({"text": docs})

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    out = tmp_path / "out"
    hub = ["--out-dir", str(out), "--num-proc", "1", "--shard-size", "1000"]
    assert fineweb.main(hub + ["--revision", "v1.2"]) == 0
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "v1.2", "train")]
    assert manifest(out)["run"]["revision"] == "v1.2"
    np.testing.assert_array_equal(all_tokens(out), np.concatenate(doc_tokens(docs)))
    with pytest.raises(SystemExit, match="revision 'v1.2' there, 'v2.0' now"):  # other data: never mixed in
        fineweb.main(hub + ["--revision", "v2.0"])


def test_refuses_shards_without_manifest(tmp_path):
    docs = make_docs(60, seed=8)
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    reference_shards(docs, 1000, tmp_path / "out")  # a folder the original script wrote
    before = folder_bytes(tmp_path / "out")
    with pytest.raises(SystemExit, match="no manifest.json.*--overwrite"):
        run(tmp_path, data, tmp_path / "out", "--shard-size", 1000)
    assert folder_bytes(tmp_path / "out") == before
    run(tmp_path, data, tmp_path / "out", "--shard-size", 1000, "--overwrite")
    assert {k: v for k, v in folder_bytes(tmp_path / "out").items() if k != "manifest.json"} == before


@pytest.mark.skipif(mp.get_start_method() != "fork", reason="the workers must inherit the patched module")
def test_worker_failures_are_one_line_errors(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "docs.jsonl", make_docs(20))
    with monkeypatch.context() as m:  # a tokenizer that cannot load: reported, not respawned forever
        m.setattr(fineweb, "_tokenizer", lambda: (_ for _ in ()).throw(RuntimeError("GPT-2 BPE files not found")))
        with pytest.raises(SystemExit, match="tokenizing failed .*BPE files not found"):
            run(tmp_path, data, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with monkeypatch.context() as m:  # a worker killed (out of memory): reported, not waited for forever
        m.setattr(fineweb, "encode_documents", lambda texts: os._exit(3))
        with pytest.raises(SystemExit, match=r"worker 0 died \(exit code 3"):
            run(tmp_path, data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_one_run_per_folder(tmp_path):
    import fcntl

    data = write_jsonl(tmp_path / "docs.jsonl", make_docs(10))
    (tmp_path / "out").mkdir()
    fd = os.open(tmp_path / "out", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as another fineweb.py writing there holds it
        with pytest.raises(SystemExit, match="another fineweb.py is writing"):
            run(tmp_path, data, tmp_path / "out")
    finally:
        os.close(fd)
