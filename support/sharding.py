"""
Sharding (--shard fsdp): FSDP2 splits every parameter, its gradient and its AdamW state over the ranks.
Each block is one unit: its weights are all-gathered just before its forward (and again for its backward)
and freed after, its gradients reduce-scattered as soon as they are complete. The root unit holds the
embeddings, the tied lm_head and ln_f. Checkpoints stay whole (gathered to rank 0), in the same format as
under DDP, so a run can change from one to the other on resume.

MemoryConfig holds the options that trade memory for time or traffic (--shard and the levers beside it); the
planner (support/planner.py) counts what each of them saves.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from gpt2 import GPT
from support.distributed import Dist
from support.errors import TrainError


@dataclass
class MemoryConfig:
    shard: str = "ddp"  # ddp: every rank holds all weights, gradients, AdamW state; fsdp: each 1/N of them (FSDP2)
    activation_checkpointing: bool = False  # recompute blocks' activations in backward: less memory, ~1/3 more compute
    reduce_every_micro_step: bool = False  # fsdp, accumulating: gradients stay sharded (4/N B a weight), at N x traffic
    loss_chunk: int = 0  # >0: output layer + loss this many tokens at a time, never all the logits at once (memory)

    def check(self, world_size: int) -> None:
        if self.loss_chunk < 0:
            raise TrainError(f"--loss-chunk {self.loss_chunk}: give a number of tokens, or 0 for one matmul")
        if self.reduce_every_micro_step and self.shard != "fsdp":
            raise TrainError("--reduce-every-micro-step keeps fsdp's gradients sharded: it needs --shard fsdp")
        if self.shard == "fsdp" and world_size == 1:
            raise TrainError("--shard fsdp splits the model over ranks: launch with torchrun --nproc_per_node N "
                             "(N >= 2), or use --shard ddp in one process")


def shard_model(model: GPT, dist: Dist, use_compile: bool) -> None:
    """fully_shard each block, then the root (in place). Master weights and gradient reduction are fp32; the
    weights are gathered in fp32 too, and autocast casts them for the matmuls exactly as under DDP: the same
    numerics (bf16 matmuls, fp32 residual stream and LayerNorms). Gathering in bf16 (param_dtype) would halve
    the traffic, but would also round the LayerNorm weights and cast every block's input, putting the
    residual stream in bf16.

    With compile, each block's forward is compiled before it is sharded: FSDP's hooks then run around the
    compiled code (a whole-model compile would break its graph at every hook and fall back to eager)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(dist.device_type, (dist.world_size,))
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for block in model.transformer.h:
        if use_compile:
            block.forward = torch.compile(block.forward)  # names and state dict unchanged
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # the root's weights are needed again at once by the backward pass: kept gathered after the forward
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (DTensor) gathered whole on every rank, which must all call this, in the same order."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def whole_state(state: dict, keep: bool, errors: list) -> dict:
    """A state dict (the model's, or the optimizer's nested one) with every tensor gathered whole, one at a
    time: on the CPU where keep (rank 0, for the checkpoint), dropped at once elsewhere (None). A copy that
    fails (host memory) goes to errors and the gathers go on, so that no other rank waits in one forever."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            v = whole_state(v, keep, errors)
        elif isinstance(v, torch.Tensor):
            v = whole(v)  # every rank takes part in every gather
            try:
                v = v.cpu() if keep and not errors else None
            except (RuntimeError, MemoryError) as e:
                errors.append(e)
                v = None
        out[k] = v
    return out


def this_ranks_shard(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor (a checkpoint's) cut as `like` is sharded: a DTensor holding this rank's piece, cut from
    the rank's own copy (no communication). Other tensors (`like` not sharded) come back as they are."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return t
    return distribute_tensor(t.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A whole optimizer state (a checkpoint's) cut into this rank's shards of the sharded parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's numbering
    shard = lambda v, p: this_ranks_shard(v, p) if v.shape == p.shape else v  # the moments, not the step count
    return {**state, "state": {i: {k: shard(v, params[i]) for k, v in s.items()} for i, s in state["state"].items()}}


def load_weights(model: nn.Module, weights: dict) -> None:
    """Whole weights (a checkpoint's) copied into the model's parameters in place, so that the optimizer and the
    DDP / compiled wrappers keep holding them; under fsdp each rank copies in its own shard."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for name, p in model.state_dict(keep_vars=True).items():  # the tied matrix twice: harmless
            w = this_ranks_shard(weights[name], p)
            if isinstance(p, DTensor):
                p, w = p.to_local(), w.to_local()
            p.copy_(w)


@contextmanager
def gathered(model: nn.Module):
    """Under FSDP, every weight gathered on every rank for the duration, and no collective in the forward
    passes: each rank may then run forwards of its own (HellaSwag's uneven shares, sampling), where a sharded
    forward would wait for the other ranks' all-gathers. Costs one whole fp32 copy of the weights while it
    lasts. Nothing to do under DDP."""
    if not is_sharded(model):
        yield
        return
    units = [m for m in model.modules() if is_sharded(m)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # as shard_model set them


def gradient_sync(model: nn.Module, sync: bool):
    """Gradient accumulation under FSDP: reduce-scatter the gradients only when sync (the last micro-step), whole
    gradients adding up on each rank before it. A context, as DDP's no_sync() is (this one is set, not entered)."""
    model.set_requires_gradient_sync(sync)
    return nullcontext()


def grad_scaler(device_type: str):
    """float16's loss scaler under FSDP: each rank sees a shard of the gradients, so an overflow anywhere skips the
    step on every rank."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler(device_type)
