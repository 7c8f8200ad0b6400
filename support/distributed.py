"""
Devices and torch.distributed: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them we are one process.
NCCL on CUDA, Gloo on CPU (so DDP is testable on a laptop). The one place that knows this, and the one place
--device auto and --dtype auto are decided, for every script. Also the collectives every script shares: a
failure on one rank stops every rank (all_reduce_or_raise, on_every_rank), never leaves them waiting.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch


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


def resolve_dtype(dtype: str, device_type: str) -> torch.dtype | None:
    """--dtype -> the autocast dtype, or None for plain fp32 (auto: see auto_dtype)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    return AUTOCAST_DTYPES[auto_dtype(device_type) if dtype == "auto" else dtype]


def autocast(device_type: str, dtype: torch.dtype | None):
    """torch.autocast to dtype (resolve_dtype's), or a context that changes nothing for None (plain fp32)."""
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def use_tf32(device_type: str) -> None:
    """On CUDA, fp32 matmuls (and convolutions) on TF32 tensor cores: the lecture's
    torch.set_float32_matmul_precision("high"), through the fp32_precision settings that replace it (torch >= 2.9
    warns about the old call, on every rank)."""
    if device_type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"


@contextmanager
def deterministic_kernels(on: bool):
    """--deterministic: for its duration, kernels that give the same bits on every run, so that a resumed GPU run
    equals the uninterrupted one bitwise, as every run does on a CPU. torch.use_deterministic_algorithms (an op
    with no deterministic kernel is an error, never silently nondeterministic; SDPA's flash backward takes its
    deterministic path), cuBLAS's fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when cuBLAS starts: set before the
    first matmul), SDPA's cuDNN and memory-efficient kernels off (their backward is not deterministic), and
    Inductor's deterministic mode (no autotuning by timing). Slower; what it costs on a GPU is not measured here.
    Everything is as it was after."""
    if not on:
        yield
        return
    import torch._inductor.config as inductor

    cuda = torch.backends.cuda
    saved = (torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
             cuda.cudnn_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), inductor.deterministic)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    cuda.enable_cudnn_sdp(False)
    cuda.enable_mem_efficient_sdp(False)
    inductor.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        if saved[1] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        cuda.enable_cudnn_sdp(saved[2])
        cuda.enable_mem_efficient_sdp(saved[3])
        inductor.deterministic = saved[4]


def setup_precision(dtype: str, device_type: str) -> torch.dtype | None:
    """The evaluation scripts' precision: resolve_dtype, with TF32 for fp32 matmuls on CUDA as in training."""
    use_tf32(device_type)
    return resolve_dtype(dtype, device_type)


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


@contextmanager
def patient_collectives(dist_timeout: float):
    """While rank 0 writes a checkpoint or every rank reads one (a big file, a slow disk), collectives wait up to
    the set-up's timeout, not --dist-timeout; after it, --dist-timeout (dist_timeout seconds) again."""
    set_collective_timeout(PROCESS_GROUP_TIMEOUT_MINUTES * 60)
    try:
        yield
    finally:
        set_collective_timeout(dist_timeout)


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
