"""
HellaSwag, completion style, batched and distributed: how this project compares itself with GPT-2 and GPT-3.

    python hellaswag.py -m gpt2 -d cuda                               # OpenAI's GPT-2 124M, through the Hub
    python hellaswag.py -m log/model_19072.pt                         # one of our checkpoints
    python hellaswag.py -m hf_out/ --data-file hellaswag_val.jsonl    # a local HF folder, a local data file
    torchrun --standalone --nproc_per_node=8 hellaswag.py -m gpt2-xl  # examples split over 8 GPUs

Each example is a context and 4 endings; exactly one (`label`) is right. Every ending becomes a row
`context tokens + tokens of " " + ending`, and the row's score is the cross-entropy of its ending tokens:
summed over the ending it gives `acc`, averaged over the ending it gives `acc_norm` (the lowest loss is
the prediction). On the 10,042 validation examples, as reported by build-nanogpt and the GPT-3
paper (not measured by this repository):

    gpt2     (124M)   acc 0.2859  acc_norm 0.2955
    gpt2-xl  (1558M)  acc 0.3842  acc_norm 0.4893
    GPT-3 Small (125M) reported acc_norm 0.337

Speed: rows of many examples share one forward pass. Rows are sorted by length and right-padded;
with causal attention a padding token sits after every real position, so it cannot change them.
The output layer runs only at the positions that score an ending token (about a third of a row):
a vocab-sized matmul per position is a third of GPT-2 124M's work and most of a small model's.
`evaluate_unbatched` is the one-example-per-forward loop that `evaluate` is tested against.

Data: hellaswag_{train,val,test}.jsonl from rowanz/hellaswag, downloaded on first use into a cache
folder (rank 0 only; the other ranks wait), or any local file with --data-file. HELLASWAG_URL overrides
the download address (a template with {split}), e.g. for a mirror.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from support.distributed import (
    DTYPES,
    Dist,
    all_reduce_or_raise,
    autocast,
    rank_0_first,
    setup_distributed,
    setup_precision,
    teardown_distributed,
)
from support.errors import one_line, report_error
from support.files import download
from support.flags import add_dataclass_flags
from support.hf import load_model
from support.tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
# Data: download once into the cache, then validate every line (a bad line must fail loudly, with
# its line number, not be scored as garbage)

SPLITS = ("train", "val", "test")
URL_TEMPLATE = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
DATA_CACHE_DIR = Path(__file__).parent / "hellaswag"
NUM_ENDINGS = 4


class HellaSwagError(ValueError):
    """Bad data, no data, or data the model cannot take. The message is one line, for the CLI."""


def data_url(split: str) -> str:
    return os.environ.get("HELLASWAG_URL", URL_TEMPLATE).format(split=split)


def fetch(url: str, dest: Path) -> None:
    try:
        download(url, dest)
    except (OSError, ValueError) as e:  # URLError/HTTPError/timeouts are OSErrors; a malformed URL is a ValueError
        raise HellaSwagError(f"could not download {url} ({one_line(e)}): check the network connection, "
                             "or pass --data-file PATH to a local hellaswag jsonl") from e
    print(f"downloaded {url} to {dest} ({dest.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)


def _check_example(ex, where: str) -> dict:
    if not isinstance(ex, dict):
        raise HellaSwagError(f"{where}: expected a JSON object, got {type(ex).__name__}")
    ctx = ex.get("ctx")
    if not isinstance(ctx, str) or not ctx:
        raise HellaSwagError(f"{where}: 'ctx' must be a non-empty string")
    endings = ex.get("endings")
    if not isinstance(endings, list) or len(endings) != NUM_ENDINGS:
        got = f"{len(endings)} endings" if isinstance(endings, list) else f"'endings' = {one_line(endings)[:40]}"
        raise HellaSwagError(f"{where}: expected a list of {NUM_ENDINGS} endings, got {got}")
    if not all(isinstance(e, str) for e in endings):
        raise HellaSwagError(f"{where}: every ending must be a string")
    label = ex.get("label")
    if label is None:
        raise HellaSwagError(f"{where}: no 'label' (the test split's labels are hidden: evaluate on val)")
    if type(label) is not int or not 0 <= label < NUM_ENDINGS:  # bool is an int subclass: rejected too
        raise HellaSwagError(f"{where}: label {one_line(json.dumps(label))[:40]} is not an integer in 0..3")
    return ex


def read_examples(path) -> list[dict]:
    """Parse and validate a hellaswag jsonl file (blank lines are skipped)."""
    path = Path(path)
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    ex = json.loads(line)
                except json.JSONDecodeError as e:
                    raise HellaSwagError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
                examples.append(_check_example(ex, f"{path}:{lineno}"))
    except FileNotFoundError as e:
        raise HellaSwagError(f"data file {path} not found") from e
    except UnicodeDecodeError as e:
        raise HellaSwagError(f"{path}: not UTF-8 text ({one_line(e)})") from e
    if not examples:
        raise HellaSwagError(f"{path}: no examples")
    return examples


def load_examples(split: str = "val", data_file=None, cache_dir=None, dist=None) -> list[dict]:
    """All examples of a split (downloaded into cache_dir on first use) or of data_file, validated.

    Under torchrun pass the Dist: rank 0 downloads while the others wait; a failed download stops
    every rank, so it is an error, never a hang.
    """
    if data_file is not None:
        return read_examples(data_file)
    if split not in SPLITS:
        raise HellaSwagError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    path = Path(cache_dir if cache_dir is not None else DATA_CACHE_DIR) / f"hellaswag_{split}.jsonl"
    rank_0_first(lambda: path.is_file() or fetch(data_url(split), path), dist or Dist(),
                 HellaSwagError(f"rank 0 could not download {data_url(split)} (see its error)"))
    if not path.is_file():  # rank 0 failed: it says why; the others say what is missing
        raise HellaSwagError(f"{path} is missing (rank 0 could not download it): pass --data-file PATH "
                             "or check the network connection")
    return read_examples(path)


# -----------------------------------------------------------------------------
# Rendering: an example -> 4 rows of tokens and a mask over each row's ending


@lru_cache(maxsize=1 << 16)
def _encode_texts(enc, ctx: str, endings: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """Tokens of the context and of each " " + ending, read-only arrays (cached: training evaluates
    the same examples every few hundred steps, and tokenizing 10k examples takes about a second)."""
    # the space goes with the ending: GPT-2's BPE merges a leading space into the word's token
    arrays = tuple(np.array(enc.encode(t), dtype=np.int64) for t in (ctx, *(" " + e for e in endings)))
    for a in arrays:
        a.flags.writeable = False
    return arrays


class _Rows:
    """The 4 rows (context + one ending) of every example, as segments of one flat token array.

    Row 4*i + j is example i's context followed by its ending j; nothing is copied per row until
    a batch is packed, so sorting and batching tens of thousands of rows is cheap numpy work.
    """

    def __init__(self, examples: list[dict], enc):
        segs = [_encode_texts(enc, ex["ctx"], tuple(ex["endings"])) for ex in examples]
        seg_len = np.array([[len(a) for a in sg] for sg in segs], dtype=np.int64).reshape(-1, 1 + NUM_ENDINGS)
        seg_start = (np.cumsum(seg_len) - seg_len.reshape(-1)).reshape(seg_len.shape)  # (E, 5)
        self.flat = np.concatenate([a for sg in segs for a in sg]) if segs else np.zeros(0, np.int64)
        self.ctx_start = np.repeat(seg_start[:, 0], NUM_ENDINGS)  # (4E,)
        self.ctx_len = np.repeat(seg_len[:, 0], NUM_ENDINGS)  # (4E,)
        self.end_start = seg_start[:, 1:].reshape(-1)  # (4E,)
        self.end_len = seg_len[:, 1:].reshape(-1)  # (4E,)
        self.lens = self.ctx_len + self.end_len  # (4E,)

    def pack(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ids right-padded with 0: tokens (n, L) and mask (n, L), 1 over each row's ending."""
        ctx_len, lens = self.ctx_len[ids], self.lens[ids]  # (n,)
        n, L = len(ids), int(lens.max())
        row = np.repeat(np.arange(n), lens)  # the row of every real token
        col = np.arange(row.size) - np.repeat(np.cumsum(lens) - lens, lens)  # and its position in the row
        in_ctx = col < ctx_len[row]
        src = np.where(in_ctx, self.ctx_start[ids][row] + col, self.end_start[ids][row] + col - ctx_len[row])
        tokens = np.zeros((n, L), dtype=np.int64)
        tokens[row, col] = self.flat[src]
        mask = np.zeros((n, L), dtype=np.int64)
        mask[row, col] = ~in_ctx
        return torch.from_numpy(tokens), torch.from_numpy(mask)


def render_example(example: dict, enc=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """tokens (4, L) and mask (4, L) LongTensors, right-padded with 0, and the label."""
    tokens, mask = _Rows([example], enc or get_tokenizer()).pack(np.arange(NUM_ENDINGS))
    return tokens, mask, example["label"]


# -----------------------------------------------------------------------------
# Scoring: the one place that turns logits into the per-row losses both evaluation paths compare


def row_losses(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and mean cross-entropy of each row's ending tokens: (N,), (N,), in fp32.

    Position t predicts token t+1, so logits and mask shift against each other: the first scored
    logit is the one at the last context token. logits are either (N, L, V), every position, or
    (M, V), only the M scored positions in row-major order (what _scored_logits returns).
    Cross-entropy uses the full logits row (padded vocab included, as in the reference), in fp32;
    only scored positions are cast, to keep the fp32 copy small.
    """
    shift_tokens = tokens[:, 1:]  # (N, L-1)
    shift_mask = mask[:, 1:].bool()  # (N, L-1)
    if logits.dim() == 3:
        logits = logits[:, :-1][shift_mask]  # (M, V)
    losses = torch.zeros(shift_mask.shape, dtype=torch.float32, device=logits.device)  # (N, L-1)
    losses[shift_mask] = F.cross_entropy(logits.float(), shift_tokens[shift_mask], reduction="none")
    sum_loss = losses.sum(dim=1)  # (N,)
    return sum_loss, sum_loss / shift_mask.sum(dim=1)


def _logits(model, tokens: torch.Tensor, autocast_dtype, logits_at=None) -> torch.Tensor:
    device_type = tokens.device.type
    with autocast(device_type, autocast_dtype):
        out = model(tokens) if logits_at is None else model(tokens, logits_at=logits_at)
    if isinstance(out, tuple):  # our GPT: (logits, loss)
        out = out[0]
    return getattr(out, "logits", out)  # a transformers model's output, or plain logits


def takes_logits_at(model) -> bool:
    """Whether model(tokens, logits_at=mask) computes logits at the masked positions only, as our GPT does.

    Read from the forward's signature, not from the model's class, so any model that offers it is scored
    this way (and none silently loses it to a second copy of a class, as when a script was imported twice).
    """
    import inspect

    try:
        return "logits_at" in inspect.signature(model.forward).parameters
    except (AttributeError, TypeError, ValueError):  # no forward, or one inspect cannot read
        return False


def _scored_logits(model, tokens: torch.Tensor, mask: torch.Tensor, autocast_dtype) -> torch.Tensor:
    """Logits (M, V) at just the positions that score an ending token, where the model can (takes_logits_at).

    The output layer is a third of GPT-2 124M's matmul work per token and most of a small model's, yet
    only the ending positions (a third of a row, or less) are scored. Other models give full (N, L, V)
    logits; row_losses takes either.
    """
    if not takes_logits_at(model):
        return _logits(model, tokens, autocast_dtype)
    logits_at = torch.zeros_like(mask, dtype=torch.bool)  # (N, L)
    logits_at[:, :-1] = mask[:, 1:].bool()  # position t scores token t+1
    return _logits(model, tokens, autocast_dtype, logits_at)


def _block_size(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "block_size", None) or getattr(config, "n_positions", None)


def _check_lengths(lens: np.ndarray, block_size: int | None, examples: list[dict]) -> None:
    """Error on the first example with a row (of lens, 4 per example) longer than block_size."""
    if block_size is None or lens.size == 0 or lens.max() <= block_size:
        return
    r = int(np.argmax(lens > block_size))
    raise HellaSwagError(f"example ind={examples[r // NUM_ENDINGS].get('ind', '?')}: a row of {lens[r]} tokens is "
                         f"longer than the model's block_size={block_size}")


def check_fits(examples: list[dict], block_size: int) -> None:
    """HellaSwagError unless every row of every example fits a model of that block size."""
    _check_lengths(_Rows(examples, get_tokenizer()).lens, block_size, examples)


def default_batch_size(device) -> int:
    """Examples per forward: 64 (256 rows) fills a GPU; a CPU is faster with small batches, because
    each scored position costs a vocab-sized logits row and big batches spill out of the caches."""
    return 64 if torch.device(device).type == "cuda" else 4


@torch.no_grad()
def score_batched(model, examples: list[dict], device, batch_size: int | None = None, autocast_dtype=None,
                  progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-ending sum and mean losses, (E, 4) each, on the CPU; batch_size examples' rows per forward.

    All 4*E rows are sorted by length (longest first, so an out-of-memory shows at once) and cut into
    batches of 4*batch_size rows: an example's rows may land in different batches, which is fine,
    since rows never interact. Batches are built and moved to the device up front, and results stay
    there until the end, so the loop is one forward + one scoring per batch, no per-example work.
    """
    batch_size = batch_size or default_batch_size(device)
    if batch_size < 1:
        raise HellaSwagError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    rows = _Rows(examples, get_tokenizer())
    _check_lengths(rows.lens, _block_size(model), examples)
    order = np.argsort(-rows.lens, kind="stable")  # longest first; ties keep example order
    per_batch = NUM_ENDINGS * batch_size
    batches = []
    for start in range(0, len(order), per_batch):
        ids = order[start:start + per_batch]
        tokens, mask = rows.pack(ids)  # (n, L), (n, L)
        batches.append(tuple(t.to(device) for t in (torch.from_numpy(ids), tokens, mask)))

    sum_loss = torch.zeros(len(order), dtype=torch.float32, device=device)  # (4E,) in example-major order
    avg_loss = torch.zeros(len(order), dtype=torch.float32, device=device)  # (4E,)
    bar = _progress(len(order), "row", progress)
    for ids, tokens, mask in batches:
        s, a = row_losses(_scored_logits(model, tokens, mask, autocast_dtype), tokens, mask)
        sum_loss[ids], avg_loss[ids] = s, a
        bar.update(len(ids))
    bar.close()
    return sum_loss.view(-1, NUM_ENDINGS).cpu(), avg_loss.view(-1, NUM_ENDINGS).cpu()


@torch.no_grad()
def score_unbatched(model, examples: list[dict], device, autocast_dtype=None,
                    progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference loop: one example (its 4 rows) per forward. Same outputs as score_batched."""
    device = torch.device(device)
    enc = get_tokenizer()
    sums, avgs = [], []
    for ex in _progress_iter(examples, progress):
        tokens, mask, _ = render_example(ex, enc)
        _check_lengths(np.array([tokens.size(1)]), _block_size(model), [ex])
        tokens, mask = tokens.to(device), mask.to(device)
        s, a = row_losses(_logits(model, tokens, autocast_dtype), tokens, mask)
        sums.append(s.cpu())
        avgs.append(a.cpu())
    if not sums:
        return torch.zeros(0, NUM_ENDINGS), torch.zeros(0, NUM_ENDINGS)
    return torch.stack(sums), torch.stack(avgs)


def _progress(total: int, unit: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc="hellaswag", disable=not enabled, dynamic_ncols=True)


def _progress_iter(items, enabled: bool):
    bar = _progress(len(items), "ex", enabled)
    for item in items:
        yield item
        bar.update(1)
    bar.close()


# -----------------------------------------------------------------------------
# Evaluation: each rank scores its share and counts; the counts are summed over ranks


def _counts(sum_loss: torch.Tensor, avg_loss: torch.Tensor, examples: list[dict]) -> torch.Tensor:
    """(3,) in fp32 (exact below 2**24): examples, right by acc (summed loss), right by acc_norm (mean loss)."""
    labels = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)  # (E,)
    pred = sum_loss.argmin(dim=1)  # (E,) first lowest on ties, like the reference
    pred_norm = avg_loss.argmin(dim=1)
    return torch.tensor([len(examples), (pred == labels).sum().item(), (pred_norm == labels).sum().item()],
                        dtype=torch.float32)


def results(counts: torch.Tensor) -> dict:
    """{num_total, num_correct, num_correct_norm, acc, acc_norm} from _counts (or their sum over ranks)."""
    num_total, num_correct, num_correct_norm = (round(c) for c in counts.tolist())
    return dict(num_total=num_total, num_correct=num_correct, num_correct_norm=num_correct_norm,
                acc=num_correct / max(num_total, 1), acc_norm=num_correct_norm / max(num_total, 1))


def _count_share(score, model, examples: list[dict], rank: int, world_size: int, device, progress: bool):
    """This rank's share (examples r, r + world_size, ...) through score(examples, progress), in eval mode:
    its counts (3,) on the device. No collective."""
    mine = examples[rank::world_size]
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        sum_loss, avg_loss = score(mine, progress and rank == 0)
    finally:
        model.train(was_training)
    return _counts(sum_loss, avg_loss, mine).to(device)


def count_correct(model, examples: list[dict], device, batch_size: int | None = None, rank: int = 0,
                  world_size: int = 1, autocast_dtype=None, progress: bool = False) -> torch.Tensor:
    """This rank's share of examples, batched: its counts (3,) on the device, to be summed over ranks (results()
    reads the sum). Training sums them in the collective of its own evaluation; evaluate() does it here."""
    score = lambda mine, bar: score_batched(model, mine, device, batch_size, autocast_dtype, progress=bar)
    return _count_share(score, model, examples, rank, world_size, device, progress)


def _evaluate(count, rank: int, world_size: int, device) -> dict:
    """count() on every rank, then the sum over ranks; a failure on any rank stops every rank."""
    counts, error = torch.zeros(3), None
    try:
        counts = count()
    except Exception as e:  # the other ranks must hear of it, not wait for this one in the all-reduce
        error = e
    dist = Dist(rank=rank, world_size=world_size, device=str(device))
    return results(all_reduce_or_raise(counts, error, dist, HellaSwagError("another rank failed (see its error)")))


def evaluate(model, examples: list[dict], device, batch_size: int | None = None, rank: int = 0, world_size: int = 1,
             autocast_dtype=None, progress: bool = False) -> dict:
    """acc and acc_norm of model on examples: {num_total, num_correct, num_correct_norm, acc, acc_norm}.

    batch_size counts examples: each forward pass holds 4*batch_size rows (of mixed examples);
    None: 64 on CUDA, 4 on CPU (default_batch_size).
    With world_size > 1, rank r scores examples r, r+world_size, ... and the counts are summed over
    ranks, so every rank returns the totals. Every rank must call this (it all-reduces).
    autocast_dtype=torch.bfloat16 wraps forwards in autocast; the losses are computed in fp32 either way.
    """
    count = lambda: count_correct(model, examples, device, batch_size, rank, world_size, autocast_dtype, progress)
    return _evaluate(count, rank, world_size, device)


def evaluate_unbatched(model, examples: list[dict], device, rank: int = 0, world_size: int = 1,
                       autocast_dtype=None, progress: bool = False) -> dict:
    """evaluate() through the one-example-per-forward loop: the reference the batched path must equal."""
    score = lambda mine, bar: score_unbatched(model, mine, device, autocast_dtype, progress=bar)
    return _evaluate(lambda: _count_share(score, model, examples, rank, world_size, device, progress),
                     rank, world_size, device)


# -----------------------------------------------------------------------------
# Command line: one dataclass of settings; every field is a --kebab-case flag


@dataclass
class EvalConfig:
    model: str = ""  # an HF name (gpt2, gpt2-xl, ...), a local HF folder, or one of our .pt checkpoints
    device: str = "auto"  # cuda, cuda:1, cpu, mps; auto: cuda if available (under torchrun cuda:LOCAL_RANK), else cpu
    batch_size: int = 0  # examples per forward pass (4 rows each); 0: 64 on cuda, 4 on cpu
    limit: int = 0  # evaluate only the first N examples (0: all)
    data_file: str = ""  # a local hellaswag jsonl instead of the download
    split: str = "val"  # which file to download
    dtype: str = "auto"  # auto: bfloat16 autocast on cuda, else float32; float32 (TF32) is how the reference ran
    cache_dir: str = str(DATA_CACHE_DIR)  # where downloads are kept


def parse_args(argv=None) -> EvalConfig:
    parser = argparse.ArgumentParser(prog="hellaswag.py", description="HellaSwag accuracy of a GPT-2 style model")
    add_dataclass_flags(parser, EvalConfig, extra={
        "model": dict(aliases=["-m"], required=True), "device": dict(aliases=["-d"]),
        "split": dict(choices=SPLITS), "dtype": dict(choices=DTYPES),
    })
    return EvalConfig(**vars(parser.parse_args(argv)))


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        if cfg.batch_size < 0 or cfg.limit < 0:
            raise HellaSwagError("--batch-size and --limit must be >= 0")
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise HellaSwagError(f"device {cfg.device!r} asked for, but CUDA is not available")
        dist = setup_distributed(cfg.device)
        examples = load_examples(cfg.split, cfg.data_file or None, cfg.cache_dir, dist)
        if cfg.limit:
            examples = examples[:cfg.limit]
        model = load_model(cfg.model, dist.device)
        autocast_dtype = setup_precision(cfg.dtype, dist.device_type)
        dtype = "bfloat16" if autocast_dtype == torch.bfloat16 else "float32"
        # start-up, kept out of the timing: the BPE tables, and a first forward (CUDA context, cuBLAS)
        get_tokenizer()
        with torch.no_grad():
            _logits(model, torch.zeros(1, 8, dtype=torch.long, device=dist.device), autocast_dtype)
        t0 = time.time()
        res = evaluate(model, examples, dist.device, cfg.batch_size or None, dist.rank, dist.world_size,
                       autocast_dtype, progress=dist.master)
        dt = time.time() - t0
        if dist.master:
            print(f"{cfg.model} on {dist.device} x{dist.world_size} ({dtype}): num_total {res['num_total']} | "
                  f"num_correct {res['num_correct']} | num_correct_norm {res['num_correct_norm']} | "
                  f"{dt:.1f}s, {res['num_total'] / dt:.0f} examples/s")
            print(f"hellaswag {cfg.split}: {res['num_total']} examples | acc {res['acc']:.4f} | "
                  f"acc_norm {res['acc_norm']:.4f}")
        return 0
    except (HellaSwagError, OSError, ValueError, RuntimeError) as e:  # missing checkpoint, unknown model, OOM, ...
        report_error("hellaswag.py", e)
        return 2
    finally:
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
