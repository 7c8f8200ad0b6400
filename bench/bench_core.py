"""
CORE's batched scoring (eval_suite.py: every option of every example a row, batched longest first, the output
layer only at the continuation's positions) against a one-example-at-a-time loop written as nanochat's core_eval.py
scores (an example's options padded into one batch, the logits and losses at every position): whether the answers
are the same (the run fails if not), seconds per 1,000 examples, and the speed-up.

    python bench/bench_core.py                                   # GPT-2 124M's shape, random weights, on the CPU
    python bench/bench_core.py -m log/model_19072.pt -d cuda -n 200

The tasks are a synthetic bundle in the real layout (write_bundle, which the tests use too): multiple choice,
schema and language modeling, 0-, 3- and 10-shot, with the delimiters and trailing spaces of the real data.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.machine import device_name  # noqa: E402
from eval_suite import GPTLM  # noqa: E402
from gpt2 import GPT, GPTConfig  # noqa: E402
from support import core  # noqa: E402
from support.distributed import Dist, autocast, resolve_device, setup_precision  # noqa: E402
from support.hf import load_model  # noqa: E402
from support.tokenizer import EOT_TOKEN, get_tokenizer  # noqa: E402

WORDS = ("the king queen lord lady sword crown castle river night morning letter friend enemy soldier horse ship "
         "garden tower bell storm fire gold silver bread wine song voice door window road field forest").split()
VERBS = "sees holds finds loses keeps sends takes brings hears seeks".split()

# (label, type, shots, delimiter or None for the default, random baseline %)
TASKS = [("mc_zeroshot", "multiple_choice", 0, None, 25.0), ("mc_tenshot", "multiple_choice", 10, None, 25.0),
         ("mc_delimited", "multiple_choice", 3, "\nAnswer: ", 25.0), ("schema_zeroshot", "schema", 0, None, 50.0),
         ("schema_threeshot", "schema", 3, " ", 50.0), ("lm_zeroshot", "language_modeling", 0, None, 0.0),
         ("lm_tenshot", "language_modeling", 10, " ", 0.0)]


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(f"{rng.choice(WORDS)} {rng.choice(VERBS)}" for _ in range(words // 2)).capitalize()


def example(rng: random.Random, task_type: str, long: bool) -> dict:
    """One example in the bundle's schema for its type; `long` makes contexts of ~200 words."""
    context = sentence(rng, 200 if long else rng.randint(6, 30))
    if task_type == "multiple_choice":
        choices = [sentence(rng, rng.randint(2, 8)) for _ in range(4)]
        if rng.random() < 0.25:  # one choice the start of every other ("light", "light energy", ...): its own
            choices = [choices[0]] + [f"{choices[0]} {rng.choice(WORDS)} {w}" for w in VERBS[:3]]  # span is empty
            rng.shuffle(choices)
        return {"query": context, "choices": choices, "gold": rng.randrange(4)}
    if task_type == "schema":
        options = [sentence(rng, rng.randint(4, 16)) for _ in range(2)]
        return {"context_options": options, "continuation": sentence(rng, rng.randint(2, 6)).lower(),
                "gold": rng.randrange(2)}
    return {"context": context + rng.choice(["", " ", "  "]), "continuation": sentence(rng, rng.randint(1, 4)).lower()}


def write_bundle(folder: Path, n: int = 24, seed: int = 0, long_every: int = 0) -> Path:
    """A bundle in eval_bundle.zip's layout (core.yaml, eval_meta_data.csv, eval_data/synthetic/*.jsonl): TASKS,
    n examples each; every long_every-th example has a long context (0: none). Returns folder."""
    import yaml

    rng = random.Random(seed)
    data = folder / "eval_data" / "synthetic"
    data.mkdir(parents=True, exist_ok=True)
    entries = []
    for label, task_type, shots, delimiter, _ in TASKS:
        rows = [example(rng, task_type, long_every > 0 and i % long_every == 0) for i in range(n)]
        (data / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        entry = dict(label=label, dataset_uri=f"synthetic/{label}.jsonl", num_fewshot=[shots], icl_task_type=task_type)
        entries.append(entry | ({"continuation_delimiter": delimiter} if delimiter is not None else {}))
    (folder / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}, sort_keys=False))
    with open(folder / "eval_meta_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Random baseline"])
        w.writerows([label, "synthetic", baseline] for label, *_, baseline in TASKS)
    return folder


@torch.no_grad()
def correct_one_at_a_time(model: GPT, task: core.Task, device, autocast_dtype=None) -> int:
    """nanochat's way: per example, its options padded with <|endoftext|> into one batch, logits and losses at
    every position, the mean loss over each continuation (or greedy decoding's tokens)."""
    enc, vocab, right = get_tokenizer(), model.real_vocab_size(), 0
    for i in range(len(task.data)):
        rows = core.rows(task, i, enc.encode_ordinary, model.config.block_size)
        ids = torch.full((len(rows), max(len(t) for t, _ in rows)), EOT_TOKEN, dtype=torch.long)
        for r, (t, _) in enumerate(rows):
            ids[r, :len(t)] = torch.tensor(t)
        ids = ids.to(device)
        with autocast(ids.device.type, autocast_dtype):
            logits = model(ids)[0][..., :vocab].float()  # (n, L, vocab)
        targets = torch.roll(ids, -1, dims=1)
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(ids.shape)
        greedy = logits.argmax(dim=-1)
        scores = [(-losses[r, s - 1:len(t) - 1].sum().item(), len(t) - s,
                   bool((greedy[r, s - 1:len(t) - 1] == ids[r, s:len(t)]).all())) for r, (t, s) in enumerate(rows)]
        right += core.is_correct(task, i, scores)
    return right


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default="", help="a model (our .pt, an HF folder or name); default: a random "
                   "GPT-2 124M")
    p.add_argument("-d", "--device", default="auto")
    p.add_argument("-n", type=int, default=16, help="examples per task (7 tasks)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", help="float32, or bfloat16 (autocast) on a GPU")
    p.add_argument("--batch-size", type=int, default=0, help="rows per forward (0: eval_suite.py's default)")
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    torch.manual_seed(0)
    model = load_model(a.model, device) if a.model else GPT(GPTConfig(vocab_size=50304)).to(device).eval()
    autocast_dtype = setup_precision(a.dtype, device.split(":")[0])
    lm = GPTLM(model, Dist(device=device), a.batch_size, autocast_dtype, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = core.load_tasks(write_bundle(Path(tmp), n=a.n))
    print(f"{device_name(device)} | torch {torch.__version__} | {model.num_parameters():,} parameters | "
          f"{len(tasks)} tasks x {a.n} examples | {a.dtype}")
    paths = {"batched": lm.core_correct,
             "one at a time": lambda task: correct_one_at_a_time(model, task, device, autocast_dtype)}
    times = {(path, t.task_type): [0.0] * a.repeats for path in paths for t in tasks}  # seconds, by path and type
    for r in range(a.repeats):  # interleaved: both paths see the same machine load
        answers = {}
        for t in tasks:
            for path, score in paths.items():
                t0 = time.perf_counter()
                answers[path, t.label] = score(t)
                times[path, t.task_type][r] += time.perf_counter() - t0
        print(f"repeat {r}: " + ", ".join(f"{path} {sum(v[r] for (p, _), v in times.items() if p == path):.2f} s"
                                          for path in paths))
        same = all(answers["batched", t.label] == answers["one at a time", t.label] for t in tasks)
        if not same:
            raise SystemExit(f"bench_core.py: the two paths disagree: {answers}")
        print("same answers: yes")
    print(f"seconds per 1,000 examples (median of {a.repeats}):")
    print("| tasks | examples | batched | one at a time | speed-up |\n| --- | --- | --- | --- | --- |")
    for kind in [*core.TASK_TYPES, "all"]:
        n = sum(len(t.data) for t in tasks if kind in ("all", t.task_type))
        secs = {path: statistics.median(sum(v[r] for (p, k), v in times.items() if p == path and kind in ("all", k))
                                        for r in range(a.repeats)) / n * 1000 for path in paths}
        print(f"| {kind} | {n} | {secs['batched']:.1f} | {secs['one at a time']:.1f} | "
              f"{secs['one at a time'] / secs['batched']:.2f}x |")


if __name__ == "__main__":
    main()
