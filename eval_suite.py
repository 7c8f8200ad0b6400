"""
The standard suite through EleutherAI's lm-evaluation-harness (`lm-eval`), on our own GPT, with no export; CORE,
nanochat's measure of GPT-2 grade (support/core.py; no lm-eval needed); and a run's report card:

    python eval_suite.py -m log/model_19072.pt                        # one of our checkpoints, the gpt2-suite
    python eval_suite.py -m gpt2 --tasks hellaswag,lambada_openai     # OpenAI's GPT-2, through the Hub
    python eval_suite.py -m hf_out/ --tasks arc_easy --limit 100      # a local HF folder, a quick look
    python eval_suite.py -m model.pt --tasks my_task --include-path my_tasks/   # task YAMLs of your own
    torchrun --standalone --nproc_per_node=8 eval_suite.py -m gpt2-xl # documents split over 8 GPUs
    python eval_suite.py -m log/model_19072.pt --tasks core           # CORE, with a 95% interval
    python eval_suite.py -m log/model_19072.pt --report               # report.md beside the checkpoint

Prints a table (task, metric, value, stderr) and writes the harness's JSON results (--output; default beside
the checkpoint: log/model_19072.pt -> log/model_19072.eval_suite.json). `--tasks gpt2-suite` (the default) is
hellaswag, arc_easy, arc_challenge, piqa, winogrande and lambada_openai, zero-shot.

The harness asks a model three things, and `GPTLM` answers them with our GPT directly:
- loglikelihood(context, continuation): the log-probability of the continuation, and whether greedy decoding
  would produce it. Requests are tokenized by the harness's own code (TemplateLM: the same token ids as its
  `hf` backend), sorted longest first and batched, right-padded; the output layer runs only at the positions
  that score a continuation token, as in hellaswag.py.
- loglikelihood_rolling(text): perplexity tasks; the text is cut into windows of the block size by the
  harness's own windowing (each token predicted once, with as much context as fits).
- generate_until(context, until=...): greedy decoding with the KV cache, stopped at <|endoftext|>, at a stop
  string (the text is cut before it) or after max_gen_toks tokens.

Numbers equal the harness's `hf` backend on our export of the same model (tests/test_eval_suite.py checks
it). A request longer than the block size is truncated as that backend does: a context loses its oldest
tokens (a generation's context keeps block_size - max_gen_toks); a continuation longer than the block size,
or max_gen_toks >= block_size, is an error. A checkpoint padded for training (vocab 50304) is scored over
GPT-2's 50257 real tokens, as its export is.

Under torchrun each rank takes every world_size-th document (the harness's own split; so every task needs at
least world_size documents) and rank 0 gathers the metrics; a failure on one rank stops every rank.

Datasets come from the Hugging Face Hub through the `datasets` cache: offline, fill the cache on a machine with
network and set HF_DATASETS_OFFLINE=1, or define tasks over local files (--include-path).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

import hellaswag
from gpt2 import KVCache
from hellaswag import _logits, row_losses
from support import core
from support import report as report_card
from support.checkpoints import is_checkpoint, load_checkpoint
from support.distributed import (
    DTYPES,
    Dist,
    all_reduce_or_raise,
    autocast,
    on_every_rank,
    rank_0_first,
    setup_distributed,
    setup_precision,
    teardown_distributed,
)
from support.errors import one_line, report_error
from support.files import atomic_write
from support.flags import add_dataclass_flags
from support.hf import load_model
from support.metrics import read_log
from support.tokenizer import EOT_TOKEN, get_tokenizer

try:  # a dev/optional dependency: training never needs it; main() says how to install it
    from lm_eval.api.model import TemplateLM
except ImportError:
    TemplateLM = object

GPT2_SUITE = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai")
LM_EVAL_PIN = "lm-eval==0.4.13"  # as in requirements-dev.txt
NO_TASKS = "--tasks is empty: name harness tasks (e.g. hellaswag,arc_easy), gpt2-suite or core"
MAX_GEN_TOKS = 256  # the harness's default for generation tasks that do not say (its hf backend's too)
# the logits of this many scored positions per forward are 1.6 GB in fp32 (GPT-2's padded vocab): rolling
# windows score every position, so a batch of 1024-token windows holds 8 rows, not --batch-size
MAX_SCORED_POSITIONS = 8192
# off a GPU, an example's rows run their shared prefix once when that saves this many token-forwards (below it,
# batching rows across examples is faster: measured with bench/bench_core.py on a CPU)
SHARED_PREFIX_MIN = 256


class EvalSuiteError(ValueError):
    """Bad input, or a request the model cannot take. The message is one line, for the CLI."""


class OtherRankFailed(EvalSuiteError):
    """Heard in a collective: another rank failed (it printed why) and has stopped."""


def _other_rank_failed() -> OtherRankFailed:
    return OtherRankFailed("another rank failed (see its error)")


# -----------------------------------------------------------------------------
# Scoring: rows of context + continuation tokens, batched longest first


def _pack(rows: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, n_scored) rows -> tokens (n, L) right-padded with 0, and mask (n, L), 1 over each row's
    last n_scored tokens (the continuation). Padding sits after every real token: causal attention hides it."""
    L = max(len(t) for t, _ in rows)
    tokens = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, (t, n) in enumerate(rows):
        tokens[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, len(t) - n:len(t)] = 1
    return tokens, mask


def _batches(lengths: list[int], scored: list[int], batch_size: int) -> list[list[int]]:
    """Row indices, longest first, cut into batches of at most batch_size rows and MAX_SCORED_POSITIONS
    scored positions (a lone row may exceed it: it must be scored whole)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep request order
    batches, current, n_scored = [], [], 0
    for i in order:
        if current and (len(current) == batch_size or n_scored + scored[i] > MAX_SCORED_POSITIONS):
            batches.append(current)
            current, n_scored = [], 0
        current.append(i)
        n_scored += scored[i]
    return batches + ([current] if current else [])


@torch.no_grad()
def score_rows(model, tokens: torch.Tensor, mask: torch.Tensor, vocab: int, autocast_dtype=None, kv_cache=None):
    """Log-likelihood of each row's masked tokens (n,) in fp32, and whether each is the greedy choice at every
    masked position (n,) bool. The model sees tokens[:, :-1] (the last token is only predicted, so a row may
    be block_size + 1 long), after what kv_cache holds if given; logits over the first `vocab` entries only (a
    training checkpoint's padding rows are no tokens: its export drops them)."""
    shift_mask = mask[:, 1:].bool()  # (n, L-1): position t predicts token t+1
    if kv_cache is None:
        logits = _logits(model, tokens[:, :-1], autocast_dtype, logits_at=shift_mask)[:, :vocab]  # (M, vocab)
    else:
        with autocast(tokens.device.type, autocast_dtype):
            logits = model(tokens[:, :-1], kv_cache=kv_cache, logits_at=shift_mask)[0][:, :vocab]
    sum_loss, _ = row_losses(logits, tokens, mask)  # (n,)
    hit = logits.argmax(dim=-1) == tokens[:, 1:][shift_mask]  # (M,)
    row_of = shift_mask.nonzero()[:, 0]  # (M,) the row of each scored position, row-major like logits
    misses = torch.zeros(tokens.size(0), device=tokens.device).index_add_(0, row_of, (~hit).float())
    return -sum_loss, misses == 0


@torch.no_grad()
def score_sharing_prefix(model, rows: list[tuple[list[int], int]], prefix: int, vocab: int, autocast_dtype=None):
    """score_rows for rows (tokens, scored tail's length) that begin with the same `prefix` tokens, none of them a
    scored token's predictor: the prefix runs once, its keys and values cached and copied for every row, then the
    rows' rest in one batch (a multiple-choice example's options share their context: 4 forwards of it become 1)."""
    device, dtype = next(model.parameters()).device, autocast_dtype or model.lm_head.weight.dtype
    longest = max(len(t) for t, _ in rows)
    shared = KVCache(model.config, 1, longest, device, dtype)
    head = torch.tensor(rows[0][0][:prefix], device=device)[None]  # (1, prefix)
    with autocast(device.type, autocast_dtype):
        model(head, kv_cache=shared, logits_at=torch.zeros_like(head, dtype=torch.bool))  # no logits: keys, values
    cache = shared.repeat(len(rows), longest)  # the prefix's keys and values (and --smear's last embedding) per row
    tokens, mask = (t.to(device) for t in _pack([(t[prefix:], n) for t, n in rows]))
    return score_rows(model, tokens, mask, vocab, autocast_dtype, kv_cache=cache)


# -----------------------------------------------------------------------------
# The adapter: lm-eval's TemplateLM over our GPT (the harness tokenizes, we score)


class GPTLM(TemplateLM):
    """Our GPT as an lm-eval model. Pass a Dist under torchrun: the harness splits documents by rank and
    gathers through all_gather / gather_object / barrier, which run over torch.distributed here."""

    def __init__(self, model, dist: Dist | None = None, batch_size: int = 0, autocast_dtype=None,
                 progress: bool = True):
        super().__init__()
        self.model = model.eval()
        self.dist = dist or Dist(device=str(next(model.parameters()).device))
        self._rank, self._world_size = self.dist.rank, self.dist.world_size
        self._device = torch.device(self.dist.device)
        self.block_size = model.config.block_size
        self.vocab = model.real_vocab_size()  # GPT-2's real tokens, as the export keeps them
        self.batch_size = batch_size or (64 if self._device.type == "cuda" else 8)
        self.autocast_dtype = autocast_dtype
        self.progress = progress and self.dist.master
        self.enc = get_tokenizer()

    # -- what TemplateLM tokenizes with -------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return EOT_TOKEN  # also the prefix of an empty context and of each document's first rolling window

    @property
    def max_length(self) -> int:
        return self.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # "<|endoftext|>" in a text is the special token, as Hugging Face's GPT-2 tokenizer reads it
        return self.enc.encode(string, allowed_special="all")

    def tok_decode(self, tokens: list[int]) -> str:
        return self.enc.decode(tokens)

    # -- loglikelihood ------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _row(self, strings, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """The tokens a request is scored on: context + continuation, the context cut from the left to fit
        (the model sees all but the last token, so a row holds block_size + 1), as the hf backend does."""
        if len(continuation) > self.block_size:
            text = f" ({one_line(strings[1])[:40]!r}...)" if strings else ""
            raise EvalSuiteError(f"a continuation of {len(continuation)} tokens{text} is longer than the model's "
                                 f"block_size={self.block_size}: it cannot be scored (use a longer-context model)")
        return (context + continuation)[-(self.block_size + 1):], len(continuation)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, desc: str = "eval_suite loglikelihood",
                              **kwargs) -> list[tuple[float, bool]]:
        """requests: (strings, context tokens, continuation tokens) -> (log-likelihood, is greedy) each."""
        from tqdm import tqdm

        rows = [self._row(*request) for request in requests]
        out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        bar = tqdm(total=len(rows), desc=desc, unit="req", dynamic_ncols=True,
                   disable=disable_tqdm or not self.progress)
        for ids in _batches([len(t) for t, _ in rows], [n for _, n in rows], self.batch_size):
            tokens, mask = (t.to(self._device) for t in _pack([rows[i] for i in ids]))
            ll, greedy = score_rows(self.model, tokens, mask, self.vocab, self.autocast_dtype)
            for i, a, g in zip(ids, ll.tolist(), greedy.tolist()):
                out[i] = (a, g)
                if requests[i][0] is not None:  # rolling windows have no strings: their sum is cached
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], (a, g))
            bar.update(len(ids))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood, in windows of the block size, all windows of all texts batched."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.eot_token_id,
                    max_seq_len=self.block_size, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def core_correct(self, task: core.Task) -> int:
        """This rank's share of a CORE task (every world_size-th example, as nanochat splits them): how many it
        gets right. Every option's row is one request, batched longest first with the other examples'. Off a GPU,
        where a forward's cost is its arithmetic, an example whose options share a long prefix (the context of a
        few-shot multiple choice) runs it once instead (score_sharing_prefix)."""
        mine = range(self._rank, len(task.data), self._world_size)
        rows = {i: core.rows(task, i, self.enc.encode_ordinary, self.block_size) for i in mine}
        sharing = {i: self._shared_prefix(rows[i]) for i in mine}
        requests = [(None, t[:s], t[s:]) for i in mine if not sharing[i] for t, s in rows[i]]
        batched = iter(self._loglikelihood_tokens(requests, desc=f"CORE {task.label}"))
        right = 0
        for i in mine:
            if sharing[i]:
                lls, greedy = score_sharing_prefix(self.model, [(t, len(t) - s) for t, s in rows[i]], sharing[i],
                                                   self.vocab, self.autocast_dtype)
                scores = zip(lls.tolist(), greedy.tolist())
            else:
                scores = (next(batched) for _ in rows[i])
            right += core.is_correct(task, i, [(ll, len(t) - s, g) for (t, s), (ll, g) in zip(rows[i], scores)])
        return right

    def _shared_prefix(self, rows: list[tuple[list[int], int]]) -> int:
        """The tokens an example's rows share before their first scored token's predictor, if running them once
        saves at least SHARED_PREFIX_MIN token-forwards off a GPU; else 0 (the rows batch with the others)."""
        tokens = [t for t, _ in rows]
        prefix = min(core.common_length(tokens), min(s for _, s in rows)) - 1
        return prefix if self._device.type != "cuda" and (len(rows) - 1) * prefix >= SHARED_PREFIX_MIN else 0

    # -- generate_until -----------------------------------------------------------------------

    def _generation_settings(self, gen_kwargs: dict, task: str | None) -> tuple[list[str], int]:
        """(stop strings, max new tokens) from a request's generation kwargs, read as the hf backend reads them."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        kwargs = normalize_gen_kwargs(gen_kwargs, MAX_GEN_TOKS)
        if kwargs.get("do_sample"):
            raise EvalSuiteError(f"task {task} asks for sampling (do_sample=True): eval_suite.py decodes greedily")
        max_gen_toks = kwargs["max_gen_toks"]
        if max_gen_toks >= self.block_size:
            raise EvalSuiteError(f"task {task} asks for up to {max_gen_toks} new tokens, which leaves no room for a "
                                 f"context in the model's block_size={self.block_size} (set max_gen_toks lower "
                                 "in the task's generation_kwargs)")
        return handle_stop_sequences(kwargs["until"], eos=self.enc.decode([EOT_TOKEN])), max_gen_toks

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, batched: requests with the same settings and context length share a forward."""
        from tqdm import tqdm

        jobs = []  # (context tokens, stop strings, max new tokens) per request
        for req in requests:
            context, gen_kwargs = req.args
            until, max_new = self._generation_settings(gen_kwargs, req.task_name)
            tokens = self.tok_encode(context)[-(self.block_size - max_new):] if context else [EOT_TOKEN]
            jobs.append((tokens, until, max_new))
        groups: dict = {}
        for i in sorted(range(len(jobs)), key=lambda i: -len(jobs[i][0])):  # longest first
            groups.setdefault((len(jobs[i][0]), tuple(jobs[i][1]), jobs[i][2]), []).append(i)
        out = [""] * len(jobs)
        bar = tqdm(total=len(jobs), desc="eval_suite generate_until", unit="req", dynamic_ncols=True,
                   disable=disable_tqdm or not self.progress)
        for (_, until, max_new), ids in groups.items():
            for start in range(0, len(ids), self.batch_size):
                batch = ids[start:start + self.batch_size]
                for i, text in zip(batch, self._greedy([jobs[i][0] for i in batch], list(until), max_new)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out

    @torch.no_grad()
    def _greedy(self, prompts: list[list[int]], until: list[str], max_new: int) -> list[str]:
        """Greedy decoding of prompts of one length, KV-cached, until each row has made <|endoftext|> or a stop
        string, or max_new tokens; each text cut before its first stop string (the harness's own cut)."""
        from lm_eval.models.utils import postprocess_generated_text

        idx = torch.tensor(prompts, dtype=torch.long, device=self._device)  # (B, T)
        B, T = idx.shape
        # keys and values in the dtype attention computes in (autocast's, else the weights'): no cast of the prefix
        dtype = self.autocast_dtype or self.model.lm_head.weight.dtype
        cache = KVCache(self.model.config, B, T + max_new, self._device, dtype)
        made: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        last = torch.zeros(B, T, dtype=torch.bool, device=self._device)
        last[:, -1] = True  # the prompt's logits are needed at its last position only
        step_in, logits_at = idx, last
        for _ in range(max_new):
            with autocast(self._device.type, self.autocast_dtype):
                logits, _ = self.model(step_in, kv_cache=cache, logits_at=logits_at)
            nxt = logits.reshape(B, -1)[:, :self.vocab].argmax(dim=-1)  # (B,)
            for b, tok in enumerate(nxt.tolist()):
                if done[b]:
                    continue
                if tok == EOT_TOKEN:
                    done[b] = True
                    continue
                made[b].append(tok)
                done[b] = any(s in self.tok_decode(made[b]) for s in until)
            if all(done):
                break
            step_in, logits_at = nxt[:, None], None
        return [postprocess_generated_text(self.tok_decode(m), until, None) for m in made]

    # -- distributed: what the harness's evaluator calls between ranks ----------------------

    def _healthy(self) -> None:
        """Every collective starts with this one-number all-reduce; a rank that failed sends its error flag
        in the same slot (run_on_every_rank), so this raises on every other rank instead of waiting forever."""
        all_reduce_or_raise(None, None, self.dist, _other_rank_failed())

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor, concatenated in rank order (a scalar becomes (world_size,))."""
        import torch.distributed as tdist

        if self.world_size == 1:
            return tensor
        self._healthy()
        flat = tensor.reshape(-1)
        parts = [torch.empty_like(flat) for _ in range(self.world_size)]
        tdist.all_gather(parts, flat)
        return torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        import torch.distributed as tdist

        if self.world_size == 1:
            return [obj]
        self._healthy()
        gathered = [None] * self.world_size if self.rank == dst else None
        tdist.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            self._healthy()  # an all-reduce is a barrier


def run_on_every_rank(work, dist: Dist):
    """work() on every rank, ending in one all-reduce of whether it failed. A rank that fails sends its flag at
    once; the others hear it in their next collective (GPTLM._healthy, or this final one) and stop too."""
    try:
        result = work()
    except OtherRankFailed:
        raise  # heard in a collective: the failed rank has said why and stopped; no further collective
    except Exception as e:
        if dist.world_size == 1:
            raise
        all_reduce_or_raise(None, e, dist, _other_rank_failed())  # raises e
    all_reduce_or_raise(None, None, dist, _other_rank_failed())
    return result


# -----------------------------------------------------------------------------
# Tasks: names (or globs) the harness knows, the gpt2-suite shorthand, task YAMLs of the user's own


@cache
def task_manager(include_path: str = ""):
    """The harness's index of its tasks (and of include_path's YAMLs): a few seconds to build, so once."""
    from lm_eval.tasks import TaskManager

    if include_path and not Path(include_path).is_dir():
        raise EvalSuiteError(f"--include-path {include_path}: not a folder (it should hold task YAML files)")
    return TaskManager(include_path=include_path or None)


def resolve_tasks(spec: str, manager) -> list[str]:
    """--tasks -> harness task names: comma-separated names, globs (arc_*), YAML files, or gpt2-suite.
    An unknown name is an error listing the close matches."""
    import difflib
    import fnmatch

    names = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "gpt2-suite":
            names += GPT2_SUITE
        elif any(c in item for c in "*?["):
            matched = fnmatch.filter(manager.all_tasks, item)
            if not matched:
                raise EvalSuiteError(f"--tasks {item}: no task matches this pattern")
            names += matched
        elif item in manager.all_tasks or (item.endswith((".yaml", ".yml")) and Path(item).is_file()):
            names.append(item)
        else:
            close = difflib.get_close_matches(item, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "no close match"
            raise EvalSuiteError(f"--tasks: unknown task {item!r} ({hint}); task YAMLs of your own: --include-path "
                                 "DIR; all names: python -m lm_eval ls tasks")
    if not names:
        raise EvalSuiteError(NO_TASKS)
    return list(dict.fromkeys(names))  # each once, in the order given


def dataset_error(e: ConnectionError) -> EvalSuiteError:
    """datasets' error for "not in the cache, and the Hub unreachable (or offline mode)", as what to do."""
    return EvalSuiteError(
        f"could not load a task's dataset ({one_line(e)}): with no network the harness reads datasets from the "
        "Hugging Face cache (HF_HOME, default ~/.cache/huggingface): run once where the Hub is reachable (or copy "
        "that cache folder over), then run with HF_DATASETS_OFFLINE=1; or define tasks over local files with "
        "--include-path DIR")


def load_tasks(manager, names: list[str]) -> dict:
    """The tasks and their data (downloaded into the datasets cache on first use)."""
    try:
        return manager.load(names)
    except ConnectionError as e:
        raise dataset_error(e) from e


def check_shares(loaded: dict, limit: int, world_size: int) -> None:
    """Each rank must get a document of every task: the harness's evaluator waits for a rank with none in a
    collective that rank never reaches."""
    for name, task in loaded["tasks"].items():
        docs = len(task.eval_docs)
        n = min(docs, limit) if limit else docs
        if n < world_size:
            raise EvalSuiteError(f"task {name} has {n} documents{' (--limit)' if n < docs else ''}, fewer than the "
                                 f"{world_size} ranks, and every rank needs one: use fewer ranks or more documents")


# -----------------------------------------------------------------------------
# Results: the table, the JSON


def default_output(model: str) -> Path:
    """Beside the model: log/model_19072.pt -> log/model_19072.eval_suite.json, hf_out/ -> hf_out.eval_suite.json;
    a Hub name (openai-community/gpt2) -> ./openai-community__gpt2.eval_suite.json."""
    path = Path(model)
    if is_checkpoint(model):
        return path.with_suffix(".eval_suite.json")
    if path.is_dir():
        return path.resolve().with_name(path.resolve().name + ".eval_suite.json")
    return Path(model.replace("/", "__") + ".eval_suite.json")


def metric_rows(results: dict) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) for every metric of every task and group, in the harness's order; the
    filter is named when it is not the default ("none"). stderr None where the harness has none."""
    rows = []
    for section in ("results", "groups"):
        for task, metrics in results.get(section, {}).items():
            if section == "groups" and task in results["results"]:
                continue  # a group's aggregate is already among the results
            for key, value in metrics.items():
                if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                    continue
                metric, filt = key.split(",", 1)
                stderr = metrics.get(f"{metric}_stderr,{filt}")
                name = metric if filt == "none" else f"{metric} ({filt})"
                rows.append((task, name, float(value), stderr if isinstance(stderr, (int, float)) else None))
    return rows


def format_table(rows) -> str:
    head = ("task", "metric", "value", "stderr")
    cells = [head] + [(t, m, f"{v:.4f}", "—" if s is None else f"{s:.4f}") for t, m, v, s in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(4)]
    lines = [" | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    return "\n".join([lines[0], "-+-".join("-" * w for w in widths), *lines[1:]])


def write_results(results: dict, path: Path) -> None:
    """The results as JSON, written whole or not: the harness's through its own serializer (numpy values, sets);
    CORE's alone are plain numbers and need no lm-eval."""
    try:
        from lm_eval.utils import handle_non_serializable
    except ImportError:
        handle_non_serializable = None
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))


# -----------------------------------------------------------------------------
# Command line: one dataclass of settings; every field is a --kebab-case flag


@dataclass
class SuiteConfig:
    model: str = ""  # one of our .pt checkpoints, a local HF folder, or an HF name (gpt2, gpt2-xl, ...)
    tasks: str = "gpt2-suite"  # harness tasks, globs (arc_*), YAML files, gpt2-suite (the README's six), core: CORE
    include_path: str = ""  # a folder of task YAMLs of your own (the harness's --include_path)
    limit: int = 0  # only the first N documents of each task, for a quick look (0: all)
    num_fewshot: int = -1  # examples in each prompt; -1: each task's default (0 for the gpt2-suite)
    output: str = ""  # the harness's JSON results; default: beside the model (log/model_19072.eval_suite.json)
    log_samples: bool = False  # also keep every document's requests and responses in the JSON
    device: str = "auto"  # cuda, cuda:1, cpu, mps; auto: cuda if available (under torchrun cuda:LOCAL_RANK), else cpu
    dtype: str = "float32"  # float32: as the harness's hf backend runs GPT-2; bfloat16: autocast, faster on GPUs
    batch_size: int = 0  # requests per forward pass; 0: 64 on cuda, 8 on cpu
    bootstrap_iters: int = 100000  # the harness's resamples for the stderr of metrics that are not means (0: none)
    core_bundle: str = ""  # CORE: a local copy of nanochat's eval bundle (core.yaml, eval_meta_data.csv, eval_data/)
    core_cache: str = str(core.BUNDLE_DIR)  # CORE: where the bundle is downloaded to once, without --core-bundle
    max_per_task: int = 0  # CORE: the first N examples of each task (after nanochat's shuffle), a quick look; 0: all
    report: bool = False  # a run's report card beside its checkpoint: val loss, HellaSwag, CORE (not --tasks), curves
    hellaswag_file: str = ""  # --report: a local hellaswag_val.jsonl (default: downloaded once, as hellaswag.py does)


def parse_args(argv=None) -> SuiteConfig:
    parser = argparse.ArgumentParser(prog="eval_suite.py", description="lm-evaluation-harness tasks on a GPT-2 "
                                     "style model: our checkpoints, HF folders and HF names")
    add_dataclass_flags(parser, SuiteConfig, extra={
        "model": dict(aliases=["-m"], required=True), "device": dict(aliases=["-d"]), "dtype": dict(choices=DTYPES),
        "tasks": dict(aliases=["-t"]),
    })
    return SuiteConfig(**vars(parser.parse_args(argv)))


def split_tasks(spec: str) -> tuple[bool, str]:
    """--tasks: whether CORE is asked for, and the harness's tasks beside it ("" for none)."""
    names = [t.strip() for t in spec.split(",") if t.strip()]
    return "core" in names, ",".join(t for t in names if t != "core")


def check_config(cfg: SuiteConfig, wants_core: bool, harness: str) -> None:
    """Bad flags, before any process group or model: the same error on every rank. lm-eval is needed for the
    harness's tasks only (harness: their names, "" for none)."""
    if not (wants_core or harness or cfg.report):
        raise EvalSuiteError(NO_TASKS)
    if harness and TemplateLM is object:
        raise EvalSuiteError(f"--tasks {harness}: the harness's tasks need the lm-eval package: pip install "
                             f"{LM_EVAL_PIN} (or pip install -r requirements-dev.txt); --tasks core does not")
    for flag, value in (("--limit", cfg.limit), ("--batch-size", cfg.batch_size),
                        ("--bootstrap-iters", cfg.bootstrap_iters), ("--max-per-task", cfg.max_per_task)):
        if value < 0:
            raise EvalSuiteError(f"{flag} must be >= 0, got {value}")
    if cfg.report and not is_checkpoint(cfg.model):
        raise EvalSuiteError(f"--report -m {cfg.model}: give one of our checkpoints (model_NNNNN.pt): the card reads "
                             "its run's arguments and log.txt")
    if cfg.num_fewshot < -1:
        raise EvalSuiteError(f"--num-fewshot must be >= 0 (or -1: each task's default), got {cfg.num_fewshot}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalSuiteError(f"--device {cfg.device}: CUDA is not available")


def evaluate(lm: GPTLM, cfg: SuiteConfig, names: list[str]) -> dict | None:
    """The harness's simple_evaluate on lm: the results dict on rank 0, None on the others."""
    from lm_eval import simple_evaluate

    try:
        return simple_evaluate(
            model=lm, tasks=names, task_manager=task_manager(cfg.include_path), limit=cfg.limit or None,
            num_fewshot=None if cfg.num_fewshot < 0 else cfg.num_fewshot, log_samples=cfg.log_samples,
            bootstrap_iters=cfg.bootstrap_iters)  # the harness's default seeds: its few-shot examples
    except ConnectionError as e:
        raise dataset_error(e) from e


def run_core(lm: GPTLM, cfg: SuiteConfig, dist: Dist) -> dict:
    """CORE on every rank: the bundle (rank 0 downloads it once), each task's share scored on each rank, the
    right answers summed over the ranks; the summary (core.summarize) on every rank."""
    bundle = core.find_bundle(cfg.core_bundle, Path(cfg.core_cache), dist)
    tasks = on_every_rank(lambda: core.load_tasks(bundle, cfg.max_per_task), dist, _other_rank_failed())
    correct = {}
    for task in tasks:
        right = run_on_every_rank(lambda task=task: lm.core_correct(task), dist)
        correct[task.label] = all_reduce_or_raise(torch.tensor([float(right)]), None, dist, _other_rank_failed())
    return core.summarize(tasks, {label: int(total.item()) for label, total in correct.items()})


def report(results: dict | None, core_summary: dict | None, cfg: SuiteConfig, dist: Dist, seconds: float) -> Path:
    """Rank 0: the tables on stdout, the JSON on disk (where it went on stderr): the harness's results with CORE's
    under "core", or CORE's alone (nanochat's keys at the top)."""
    config = dict(model=cfg.model, device=dist.device, world_size=dist.world_size, dtype=cfg.dtype,
                  batch_size=cfg.batch_size or None)
    if results is not None:
        results["config"].update(config)  # the harness writes the adapter's class name as the model
        if core_summary is not None:
            results["core"] = core_summary
    else:
        results = {**core_summary, "config": {**config, "max_per_task": cfg.max_per_task or None}}
    path = Path(cfg.output) if cfg.output else default_output(cfg.model)
    write_results(results, path)
    limit = f", first {cfg.limit} documents per task" if cfg.limit else ""
    print(f"{cfg.model} on {dist.device} x{dist.world_size} ({cfg.dtype}{limit}): {seconds:.1f}s")
    if "versions" in results or "configs" in results:  # the harness's
        print(format_table(metric_rows(results)))
    if core_summary is not None:
        print(core.format_core(core_summary))
    print(f"results written to {path}", file=sys.stderr)
    return path


def run_report(lm: GPTLM, cfg: SuiteConfig, dist: Dist) -> None:
    """--report: the card's measurements on every rank (HellaSwag over all its validation examples, CORE), then
    rank 0 adds the run's own numbers (support/report.py) and writes the card beside the checkpoint. Each part
    stops every rank if one fails (none is nested in another: a rank that has told the others of its error
    enters no further collective)."""
    examples = hellaswag.load_examples("val", data_file=cfg.hellaswag_file or None, dist=dist)
    hella = hellaswag.evaluate(lm.model, examples, dist.device, None, dist.rank, dist.world_size, lm.autocast_dtype,
                               progress=dist.master)
    core_summary = run_core(lm, cfg, dist)

    def card():
        if not dist.master:
            return
        path = Path(cfg.model)
        card = report_card.make_card(path, load_checkpoint(path, mmap=True), lm.model, hella, core_summary,
                                     dist.device, cfg.max_per_task)
        paths = report_card.write_card(card, path.parent, read_log(path.parent / "log.txt")[0])
        print(report_card.render_markdown(card))
        print(f"report card written to {', '.join(map(str, paths))}", file=sys.stderr)

    run_on_every_rank(card, dist)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        wants_core, harness = split_tasks(cfg.tasks) if not cfg.report else (False, "")
        check_config(cfg, wants_core, harness)
        dist = setup_distributed(cfg.device)
        # every rank reads the task index and the model; if one fails, all stop (no rank waits in a collective)
        names, model = on_every_rank(lambda: (resolve_tasks(harness, task_manager(cfg.include_path)) if harness
                                              else [], load_model(cfg.model, dist.device)), dist, _other_rank_failed())
        if names and dist.world_size > 1:  # rank 0 fills the datasets cache while the others wait: no double download
            rank_0_first(lambda: check_shares(load_tasks(task_manager(cfg.include_path), names), cfg.limit,
                                              dist.world_size),
                         dist, EvalSuiteError("rank 0 could not prepare the tasks (see its error)"))
        lm = GPTLM(model, dist, cfg.batch_size, setup_precision(cfg.dtype, dist.device_type))
        if cfg.report:
            run_report(lm, cfg, dist)
            return 0
        t0 = time.time()
        core_summary = run_core(lm, cfg, dist) if wants_core else None

        def work():
            results = evaluate(lm, cfg, names) if names else None
            if dist.master:
                report(results, core_summary, cfg, dist, time.time() - t0)

        run_on_every_rank(work, dist)
        return 0
    except (EvalSuiteError, core.CoreError, OSError, ValueError, RuntimeError, KeyError) as e:  # OOM, bad task YAML
        report_error("eval_suite.py", e)
        return 2
    finally:
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
