"""
How close fineweb.py comes to the tokenizer's ceiling on this machine.

    python bench/bench_fineweb.py                         # a 200 MB corpus made from input.txt, 3 repeats
    python bench/bench_fineweb.py --size-mb 1000 --repeats 1
    python bench/bench_fineweb.py --data-files corpus.jsonl

On the same documents, each repeat measures:
  ceiling    N processes (N = --num-proc, default every core) doing nothing but enc.encode_ordinary on
             their share of the documents, pre-loaded in memory; only the encoding is timed (and, for
             reference, the same with enc.encode_to_numpy, which fineweb.py's workers call: same tokens)
  fineweb    fineweb.main([...]) end to end: loading the jsonl through datasets (which first copies it
             into Arrow files, in a fresh cold cache each repeat, so json -> Arrow is paid every time),
             tokenizing, writing shards + manifest
  streaming  the same with --streaming: the jsonl is read as a stream, no Arrow copy
  reference  build-nanogpt's approach re-created: a pool of cpu_count // 2, one document per task
             (imap, chunksize=16), a list -> np.array per document, the same shard loop and np.save
and prints the median (and best) tokens/s of each and its ratio to the encode_ordinary ceiling (the target
for fineweb: >= 0.80), and the CPU seconds each spent. Every rate uses the same token count (the shards'
total, <|endoftext|> included), so ratios are time ratios. Methods are interleaved in each repeat, so a
machine shared with other jobs slows them alike (the load average is printed: numbers are only clean near
an idle machine's). Finally `python fineweb.py --streaming` runs as a subprocess on a quarter, a half and
all of the corpus, and the peak resident memory of its largest process is printed for each: it should not
grow with the corpus.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fineweb  # noqa: E402
from support.data import shard_name  # noqa: E402
from support.tokenizer import EOT_TOKEN, get_tokenizer  # noqa: E402

# -----------------------------------------------------------------------------
# Corpus: documents of 2-5 KB, each a random run of input.txt's paragraphs


def find_input_txt() -> Path:
    for p in (ROOT / "input.txt", ROOT.parent / "shared" / "data" / "input.txt"):
        if p.is_file():
            return p
    sys.exit("bench_fineweb.py: no input.txt (tiny Shakespeare) in the repo or ../shared/data: pass --data-files")


def make_corpus(path: Path, size_mb: float, seed: int = 0):
    paragraphs = [p for p in find_input_txt().read_text().split("\n\n") if p.strip()]
    rng = random.Random(seed)
    target, written = int(size_mb * 2**20), 0
    with open(path, "w") as f:
        while written < target:
            length, doc = rng.randint(2000, 5000), []
            while sum(map(len, doc)) < length:
                doc.append(rng.choice(paragraphs))
            line = json.dumps({"text": "\n\n".join(doc), "id": written}) + "\n"
            f.write(line)
            written += len(line)


def read_texts(path: Path) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["text"] for line in f]


# -----------------------------------------------------------------------------
# Ceiling: N forked processes encode their pre-loaded share; timed from a common start

_docs: list[str] = []


def _ceiling_worker(rank: int, n: int, how: str, barrier, queue):
    enc = get_tokenizer()
    share = _docs[rank::n]  # interleaved: every share has the same mix of lengths
    encode = enc.encode_ordinary if how == "encode_ordinary" else \
        (lambda t: enc.encode_to_numpy(t, allowed_special=set(), disallowed_special=()))
    barrier.wait()
    t0, c0 = time.time(), time.process_time()
    tokens = sum(len(encode(t)) for t in share)
    queue.put((t0, time.time(), time.process_time() - c0, tokens))


def ceiling(n: int, how: str) -> tuple[float, float]:
    """Seconds from the common start to the last process done, and the CPU seconds spent encoding."""
    ctx = mp.get_context("fork")  # the children inherit the documents: nothing to load, nothing to ship
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_ceiling_worker, args=(r, n, how, barrier, queue)) for r in range(n)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return max(r[1] for r in results) - min(r[0] for r in results), sum(r[2] for r in results)


def cpu_seconds() -> float:
    """This process's CPU time and its reaped children's (a pool's workers are reaped when it closes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args) -> tuple[float, float]:
    t0, c0 = time.time(), cpu_seconds()
    fn(*args)
    return time.time() - t0, cpu_seconds() - c0


# -----------------------------------------------------------------------------
# Reference-style: one document per task to half the cores (re-created here, not copied)

_enc = None


def _ref_init():
    global _enc
    _enc = get_tokenizer()


def _ref_tokenize(row: dict) -> np.ndarray:
    tokens = np.array([EOT_TOKEN] + _enc.encode_ordinary(row["text"]))
    assert (tokens < 2**16).all()
    return tokens.astype(np.uint16)


def reference_style(corpus: Path, out: Path, shard_size: int, cache_dir: str):
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(corpus), split="train", cache_dir=cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf, fill, index = np.empty(shard_size, dtype=np.uint16), 0, 0
    with mp.get_context("fork").Pool(max(1, os.cpu_count() // 2), initializer=_ref_init) as pool:
        for tokens in pool.imap(_ref_tokenize, ds, chunksize=16):
            pos = 0
            while pos < len(tokens):
                take = min(shard_size - fill, len(tokens) - pos)
                buf[fill:fill + take] = tokens[pos:pos + take]
                fill, pos = fill + take, pos + take
                if fill == shard_size:
                    np.save(out / shard_name("ref", fineweb.split_of(index), index), buf)
                    fill, index = 0, index + 1
    if fill:
        np.save(out / shard_name("ref", fineweb.split_of(index), index), buf[:fill])


def peak_rss(cmd: list[str]) -> float:
    """MB: the largest peak RSS among cmd's processes, measured from a fresh parent (Linux: ru_maxrss is KiB)."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
             "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    return int(subprocess.run([sys.executable, "-c", probe] + cmd, check=True, capture_output=True,
                              text=True).stdout) / 1024


# -----------------------------------------------------------------------------
# Driver


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--size-mb", type=float, default=200, help="size of the synthesized jsonl corpus (default: 200)")
    p.add_argument("--data-files", help="a jsonl corpus (field 'text') to use instead of synthesizing one")
    p.add_argument("--repeats", type=int, default=3, help="runs of each method; medians are reported")
    p.add_argument("--num-proc", type=int, default=os.cpu_count(), help="processes (default: every core)")
    p.add_argument("--shard-size", type=int, default=10_000_000, help="tokens per shard (default: 10M)")
    p.add_argument("--no-streaming", action="store_true", help="skip the fineweb.py --streaming runs")
    p.add_argument("--no-reference", action="store_true", help="skip the reference-style runs")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-memory run")
    p.add_argument("--work-dir", help="where corpus, caches and shards go (default: a temporary folder)")
    return p


def run_repeats(args, corpus: Path, work: Path, n: int) -> tuple[dict, int]:
    """Every method --repeats times, interleaved (a busy machine slows them alike): (wall, CPU) seconds each."""
    runs: dict[str, list[tuple[float, float]]] = {"ceiling": [], "ceiling_np": [], "fineweb": [], "streaming": [],
                                                  "reference": []}
    tokens = None
    for r in range(args.repeats):
        runs["ceiling"].append(ceiling(n, "encode_ordinary"))
        runs["ceiling_np"].append(ceiling(n, "encode_to_numpy"))
        cache = work / f"hf_cache_{r}"
        argv = ["--data-files", str(corpus), "--out-dir", str(work / "out"), "--shard-size", str(args.shard_size),
                "--num-proc", str(n), "--cache-dir", str(cache), "--overwrite"]
        runs["fineweb"].append(timed(fineweb.main, argv))
        tokens = json.loads((work / "out" / "manifest.json").read_text())["tokens"]
        if not args.no_streaming:
            runs["streaming"].append(timed(fineweb.main, argv + ["--streaming"]))
        shutil.rmtree(cache, ignore_errors=True)
        if not args.no_reference:
            cache = work / f"hf_cache_ref_{r}"
            runs["reference"].append(timed(reference_style, corpus, work / "ref", args.shard_size, str(cache)))
            shutil.rmtree(cache, ignore_errors=True)
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.2f} s" for k, v in runs.items() if v)
              + f"; load average {os.getloadavg()[0]:.2f}", flush=True)
    return runs, tokens


def report(runs: dict, tokens: int, n: int, repeats: int) -> None:
    wall = {k: statistics.median(w for w, _ in v) for k, v in runs.items() if v}
    best = {k: min(w for w, _ in v) for k, v in runs.items() if v}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items() if v}
    names = {"ceiling": f"ceiling: {n} x encode_ordinary (encode only)",
             "ceiling_np": f"ceiling: {n} x encode_to_numpy",
             "fineweb": "fineweb.py end to end (cold cache)",
             "streaming": "fineweb.py end to end, --streaming",
             "reference": f"reference-style: {max(1, os.cpu_count() // 2)} procs, 1 doc/task"}
    print(f"\n{tokens:,} tokens, {repeats} repeats. tok/s: median (and best) run; CPU s: median CPU seconds of "
          "all the method's processes")
    print(f"{'method':<44} {'median tok/s':>12} {'vs ceiling':>10} {'best tok/s':>11} {'vs ceiling':>10} "
          f"{'CPU s':>6} {'vs ceiling':>10}")
    for k in wall:
        print(f"{names[k]:<44} {tokens / wall[k]:>12,.0f} {wall['ceiling'] / wall[k]:>9.2f}x "
              f"{tokens / best[k]:>11,.0f} {best['ceiling'] / best[k]:>9.2f}x {cpu[k]:>6.1f} "
              f"{cpu['ceiling'] / cpu[k]:>9.2f}x")
    for k in ("fineweb", "streaming"):
        if k in wall:
            print(f"{names[k]} / ceiling: median {wall['ceiling'] / wall[k]:.3f}, best {best['ceiling'] / best[k]:.3f} "
                  "(target >= 0.80)")


def rss_report(args, corpus: Path, work: Path, n: int) -> None:
    """Peak resident memory on a quarter, a half and all of the corpus."""
    sizes, peaks = [], []
    for frac in (4, 2, 1):
        part = work / f"corpus_1_{frac}.jsonl"
        with open(corpus) as f, open(part, "w") as g:
            g.writelines(line for i, line in enumerate(f) if i < max(1, len(_docs) // frac))
        sizes.append(part.stat().st_size / 2**20)
        # --streaming: a prepared dataset is memory-mapped, and its pages read (shared, reclaimable) count in RSS
        peaks.append(peak_rss([sys.executable, str(ROOT / "fineweb.py"), "--data-files", str(part), "--out-dir",
                               str(work / "out_rss"), "--shard-size", str(args.shard_size), "--num-proc", str(n),
                               "--overwrite", "--streaming", "--cache-dir", str(work / "hf_rss")]))
    print(f"peak RSS of the largest fineweb.py process (--streaming; shard buffers 2 x "
          f"{2 * args.shard_size / 2**20:,.0f} MB): " + ", ".join(f"{p:,.0f} MB on {s:,.0f} MB of jsonl"
                                                               for p, s in zip(peaks, sizes)))


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_fineweb_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.data_files:
        corpus = Path(args.data_files).resolve()
    else:
        corpus = work / f"corpus_{args.size_mb:g}mb.jsonl"
        if not corpus.exists():
            make_corpus(corpus, args.size_mb)
    global _docs
    _docs = read_texts(corpus)
    import datasets  # noqa: F401  (imports are a fixed cost, not a rate: paid here, before any timing)
    import tqdm  # noqa: F401
    n = args.num_proc
    print(f"corpus {corpus}: {corpus.stat().st_size / 2**20:.0f} MB, {len(_docs):,} documents; {n} processes "
          f"on {os.cpu_count()} cores; shard size {args.shard_size:,}; load average {os.getloadavg()[0]:.2f}")
    runs, tokens = run_repeats(args, corpus, work, n)
    if not args.no_reference:  # the re-created reference must agree with fineweb.py, or the comparison is moot
        ours, ref = sorted((work / "out").glob("*.npy")), sorted((work / "ref").glob("*.npy"))
        same = len(ours) == len(ref) and all(a.read_bytes() == b.read_bytes() for a, b in zip(ours, ref))
        print(f"reference-style shards identical to fineweb.py's: {same}")
    report(runs, tokens, n, args.repeats)
    if not args.no_rss:
        rss_report(args, corpus, work, n)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
