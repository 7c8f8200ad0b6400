"""
CORE, the DCLM paper's in-context benchmark and nanochat's measure of "GPT-2 grade": 22 tasks (HellaSwag 0- and
10-shot, ARC, PIQA, COPA, Winograd, Winogrande, LAMBADA, SQuAD, CoQA, BoolQ, Jeopardy, BigBench tasks, AGIEval
LSAT-AR, ...), each accuracy centered against its random baseline, averaged. This module holds the data side,
as nanochat's core_eval.py and base_eval.py define it: the eval bundle, the prompts, the token rows each example
is scored on, and the results with their uncertainty; eval_suite.py scores the rows, batched.

    python eval_suite.py -m log/model_19072.pt --tasks core        # the bundle is downloaded once

The definition, to the letter: each task's examples shuffled with random.Random(1337) (--max-per-task N keeps the
first N); the few-shot examples of example i drawn with random.Random(1234 + i) from the others; the prompts
rendered as nanochat's templates render them; <|endoftext|> first, as the BOS token; a row longer than the
model's block size keeps its last tokens. Multiple choice and schema tasks are right when the option with the
lowest mean loss over its continuation's tokens is the gold one; a language-modeling example is right when greedy
decoding gives every continuation token. centered = (accuracy - b) / (1 - b), b the random baseline (a percentage
in the bundle, divided by 100); CORE = the mean of the centered accuracies.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from support.distributed import Dist, rank_0_first
from support.errors import one_line
from support.files import download, fsync_folder
from support.tokenizer import EOT_TOKEN

CORE_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # nanochat's
BUNDLE_DIR = Path(__file__).resolve().parent.parent / "eval_bundle"  # the download's default place, beside the scripts
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FIELDS = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
          "language_modeling": ("context", "continuation")}  # what each type's examples must have
# CORE of OpenAI's GPT-2 checkpoints as nanochat reports them (its dev/estimate_gpt3_core.ipynb)
GPT2_CORE = {"gpt2 (124M)": 0.1139, "gpt2-medium (355M)": 0.1849, "gpt2-large (774M)": 0.2146,
             "gpt2-xl (1558M)": 0.2565}


class CoreError(ValueError):
    """A bundle or task file that cannot be used: one line, naming the file and the fix."""


@dataclass
class Task:
    label: str
    task_type: str  # one of TASK_TYPES
    shots: int  # few-shot examples before each example
    delimiter: str  # between a context and its continuation
    baseline: float  # the accuracy of random guessing, a fraction
    data: list[dict]  # shuffled, cut to --max-per-task


# -----------------------------------------------------------------------------
# The bundle: core.yaml (the tasks), eval_meta_data.csv (their random baselines), eval_data/**.jsonl


def bundle_url() -> str:
    return os.environ.get("CORE_BUNDLE_URL", CORE_BUNDLE_URL)


def fetch_bundle(url: str, folder: Path) -> None:
    """Download the zip beside `folder` (through a temporary name), check every member's CRC, unpack it under
    a temporary name and rename its eval_bundle/ into place: a damaged or partial download is named, deleted,
    and fetched again by the next run; `folder` never exists half-made."""
    zip_path = folder.with_name(f".{folder.name}.{os.getpid()}.zip")  # this process's own: none deletes another's
    try:
        download(url, zip_path)
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts; a malformed URL
        raise CoreError(f"could not download CORE's eval bundle from {url} ({one_line(e)}): put the unzipped bundle "
                        f"at {folder}, or pass --core-bundle DIR") from e
    unpacked = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(zip_path) as z:
            bad = z.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"member {bad} fails its CRC")
            z.extractall(unpacked)
        inner = unpacked / "eval_bundle" if (unpacked / "eval_bundle").is_dir() else unpacked
        if not (inner / "core.yaml").is_file():
            raise zipfile.BadZipFile("no eval_bundle/core.yaml in it")
        place(inner, folder)
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # zlib: a member corrupt inside its compressed data
        raise CoreError(f"{zip_path} (from {url}) is damaged ({e}): deleted; run again to download it afresh") from e
    finally:
        zip_path.unlink(missing_ok=True)
        shutil.rmtree(unpacked, ignore_errors=True)


def place(unpacked: Path, folder: Path) -> None:
    """Rename the unpacked bundle to `folder`, unless another process has put its copy there meanwhile; an empty
    folder there is replaced, one with other files is an error naming it (nothing of the user's is deleted)."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    try:
        os.replace(unpacked, folder)
    except OSError as e:
        if not (folder / "core.yaml").is_file():
            raise CoreError(f"{folder} is in the way of CORE's eval bundle ({one_line(e)}): move it, or give "
                            "--core-cache another folder") from e
    fsync_folder(folder.parent)


def find_bundle(core_bundle: str | None, cache: Path, dist: Dist) -> Path:
    """--core-bundle DIR (a local copy), or the bundle downloaded once into `cache` (rank 0 fetches it, the others
    wait; a later run finds it there)."""
    if core_bundle:
        folder = Path(core_bundle)
        if not (folder / "core.yaml").is_file():
            raise CoreError(f"--core-bundle {folder}: no core.yaml there (the layout of nanochat's eval_bundle.zip: "
                            "core.yaml, eval_meta_data.csv, eval_data/)")
        return folder
    rank_0_first(lambda: (cache / "core.yaml").is_file() or fetch_bundle(bundle_url(), cache), dist,
                 CoreError("rank 0 could not download CORE's eval bundle (see its error)"))
    return cache


def load_tasks(folder: Path, max_per_task: int = 0) -> list[Task]:
    """The bundle's tasks in core.yaml's order, each checked: its type, its baseline, every line of its data (JSON,
    with the fields its type reads)."""
    import yaml

    config_path, meta_path = folder / "core.yaml", folder / "eval_meta_data.csv"
    if not config_path.is_file():  # e.g. a node of a multi-node run that does not share rank 0's disk
        raise CoreError(f"{config_path} not found: give --core-bundle a copy of the bundle (on every node), or "
                        "--core-cache a folder every node shares")
    try:
        entries = yaml.safe_load(config_path.read_text(encoding="utf-8"))["icl_tasks"]
        with open(meta_path, encoding="utf-8", newline="") as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as e:
        raise CoreError(f"{folder}: not a CORE bundle ({type(e).__name__}: {one_line(e)}): it needs core.yaml with "
                        "icl_tasks and eval_meta_data.csv with 'Eval Task' and 'Random baseline'") from e
    tasks = []
    for entry in entries:
        missing = [k for k in ("label", "icl_task_type", "dataset_uri", "num_fewshot") if k not in entry]
        if missing:
            raise CoreError(f"{config_path}: the task {entry.get('label', '?')} has no {', '.join(missing)}")
        label, task_type = entry["label"], entry["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise CoreError(f"{config_path}: task {label} has icl_task_type {task_type!r}: CORE scores "
                            f"{', '.join(TASK_TYPES)}")
        if label not in baselines:
            raise CoreError(f"{meta_path}: no 'Random baseline' for task {label}")
        data = read_task_data(folder / "eval_data" / entry["dataset_uri"], FIELDS[task_type])
        random.Random(1337).shuffle(data)  # nanochat's order: --max-per-task takes the same first N
        data = data[:max_per_task] if max_per_task > 0 else data
        shots = int(entry["num_fewshot"][0] if isinstance(entry["num_fewshot"], list) else entry["num_fewshot"])
        if len(data) <= shots:
            raise CoreError(f"CORE task {label} draws {shots} few-shot examples from the others, but has "
                            f"{len(data)} examples: give --max-per-task {shots + 1} or more")
        tasks.append(Task(label, task_type, shots, entry.get("continuation_delimiter", " "), baselines[label] / 100,
                          data))
    return tasks


def read_task_data(path: Path, fields: tuple[str, ...]) -> list[dict]:
    """A task's examples, one JSON object a line, each with `fields`."""
    if not path.is_file():
        raise CoreError(f"{path}: missing from the bundle (re-download it, or fix --core-bundle)")
    data = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                item = json.loads(line.strip())
            except json.JSONDecodeError as e:
                raise CoreError(f"{path} line {n} is not JSON ({e.msg}): the bundle is damaged; delete it to "
                                "download it again") from None
            missing = [k for k in fields if not isinstance(item, dict) or k not in item]
            if missing:
                raise CoreError(f"{path} line {n} has no {', '.join(missing)}: the bundle is damaged; delete it to "
                                "download it again")
            data.append(item)
    return data


# -----------------------------------------------------------------------------
# Prompts, as nanochat's templates render them: the few-shot examples, each followed by a blank line, then the
# example, once per option (multiple choice: per choice; schema: per context), or without and with the
# continuation (language modeling, whose contexts are stripped of surrounding whitespace)


def fewshot(data: list[dict], i: int, k: int) -> list[dict]:
    """Example i's k few-shot examples: random.Random(1234 + i) draws them from the others."""
    if k == 0:
        return []
    return [data[j] for j in random.Random(1234 + i).sample([j for j in range(len(data)) if j != i], k)]


def prompts(task: Task, i: int) -> list[str]:
    item, d, shots = task.data[i], task.delimiter, fewshot(task.data, i, task.shots)
    if task.task_type == "multiple_choice":
        before = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in shots)
        return [f"{before}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.task_type == "schema":
        before = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in shots)
        return [f"{before}{context}{d}{item['continuation']}" for context in item["context_options"]]
    before = "".join(f"{str(ex['context']).strip()}{d}{ex['continuation']}\n\n" for ex in shots)
    prompt = f"{before}{str(item['context']).strip()}{d}"
    return [prompt.strip(), prompt + str(item["continuation"])]  # without the continuation: stripped, as nanochat


# -----------------------------------------------------------------------------
# Rows: each option's tokens, <|endoftext|> first, and the span [start, end) of its continuation, the tokens it
# is scored on (always its last ones); cropped to the block size from the left


def common_length(rows: list[list[int]], from_end: bool = False) -> int:
    """The length of the rows' common prefix (or suffix)."""
    n = 0
    for column in zip(*(reversed(r) if from_end else r for r in rows)):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def rows(task: Task, i: int, encode, block_size: int) -> list[tuple[list[int], int]]:
    """Example i's rows: (tokens, start of the scored continuation). encode: text -> token ids."""
    tokens = [[EOT_TOKEN] + encode(p) for p in prompts(task, i)]
    if task.task_type == "multiple_choice":  # the options share their context: the continuation starts after it
        starts = [common_length(tokens)] * len(tokens)
    elif task.task_type == "schema":  # the options share their continuation: the common suffix
        suffix = common_length(tokens, from_end=True)
        starts = [len(t) - suffix for t in tokens]
    else:  # language modeling: one row, scored past the prompt without its continuation
        without, full = tokens
        if not (len(without) < len(full) and full[:len(without)] == without):
            raise CoreError(f"CORE task {task.label}, example {i}: its prompt's tokens are not a prefix of the "
                            "prompt with the continuation")
        tokens, starts = [full], [len(without)]
    out = []
    for t, s in zip(tokens, starts):
        crop = max(0, len(t) - block_size)
        if s - crop < 1:
            raise CoreError(f"CORE task {task.label}, example {i}: a continuation of {len(t) - s} tokens does not fit "
                            f"the block size {block_size}")
        out.append((t[crop:], s - crop))
    return out


def is_correct(task: Task, i: int, scores: list[tuple[float, int, bool]]) -> bool:
    """Whether example i is right, from its rows' (log-likelihood of the continuation, its token count, whether
    greedy decoding gives every one of its tokens)."""
    if task.task_type == "language_modeling":
        return scores[0][2]
    # An option whose continuation has no tokens of its own (a choice that is the prefix of another, "light" and
    # "light energy") has no mean: nan, as nanochat's mean over an empty span. min() then keeps it only where it
    # comes first (nan compares false both ways), and index() finds that same object: nanochat's answer, no crash
    mean_losses = [-ll / n if n else math.nan for ll, n, _ in scores]
    return mean_losses.index(min(mean_losses)) == task.data[i]["gold"]  # ties: the first, as nanochat


# -----------------------------------------------------------------------------
# Results: accuracy, centered accuracy and their standard errors per task; CORE and its 95% interval


def summarize(tasks: list[Task], correct: dict[str, float]) -> dict:
    """correct: each task's number of right examples. The standard errors are binomial, sqrt(p (1 - p) / n),
    centered as the accuracy is (divided by 1 - b); CORE's is the root of their squares' sum over the number of
    tasks (the tasks are independent samples)."""
    results, centered, errors, centered_errors = {}, {}, {}, {}
    for task in tasks:
        n, b = len(task.data), task.baseline
        p = correct[task.label] / n
        results[task.label], errors[task.label] = p, math.sqrt(p * (1 - p) / n)
        centered[task.label] = (p - b) / (1 - b)
        centered_errors[task.label] = errors[task.label] / (1 - b)
    core = sum(centered.values()) / len(centered)
    core_error = math.sqrt(sum(e * e for e in centered_errors.values())) / len(centered)
    return {"results": results, "centered_results": centered, "core_metric": core, "stderr": errors,
            "centered_stderr": centered_errors, "core_stderr": core_error,
            "core_interval_95": [core - 1.96 * core_error, core + 1.96 * core_error],
            "tasks": {t.label: {"task_type": t.task_type, "num_fewshot": t.shots, "n": len(t.data),
                                "random_baseline": t.baseline} for t in tasks}}


def format_core(summary: dict) -> str:
    """The table (task, shots, type, n, accuracy, centered, stderr), CORE with its interval, GPT-2's beside it."""
    head = ("task", "shots", "type", "n", "accuracy", "centered", "stderr")
    cells = [head] + [(label, str(t["num_fewshot"]), t["task_type"], str(t["n"]),
                       f"{summary['results'][label]:.4f}", f"{summary['centered_results'][label]:.4f}",
                       f"{summary['stderr'][label]:.4f}") for label, t in summary["tasks"].items()]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    low, high = summary["core_interval_95"]
    gpt2 = ", ".join(f"{name} {value:.4f}" for name, value in GPT2_CORE.items())
    return "\n".join([lines[0], "-+-".join("-" * w for w in widths), *lines[1:],
                      f"CORE {summary['core_metric']:.4f} (95% interval {low:.4f} to {high:.4f}); "
                      f"OpenAI's GPT-2, as nanochat reports: {gpt2}"])
