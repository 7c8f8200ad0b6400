"""
Planning (`train_gpt2.py plan`): before renting GPUs, what one GPU holds for a configuration, the largest
micro-batch that fits, and what the run costs. Arithmetic on the model's shape; the activations' count is
checked against what autograd actually saves (tests/test_plan.py), the rest follows from the dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2 import GPT, SMEAR_CHANNELS, GPTConfig
from support.metrics import flops_per_token, peak_for_name
from support.modern_optim import muon_groups

GIB = 2**30
GPU_MEMORY_GIB = {"H200": 141, "H100-80GB": 80, "A100-80GB": 80, "A100-40GB": 40, "L40S": 48, "A10": 24, "L4": 24,
                  "RTX-4090": 24, "RTX-3090": 24, "V100-32GB": 32, "V100-16GB": 16, "T4": 16}  # as sold
# what CUDA reports a GPU holds (torch.cuda.get_device_properties(d).total_memory): 79.1 GiB of an H100's 80, 139.8
# of an H200's 141; the others, as sold x 79.1/80 (an estimate: --gpu-memory gives the exact figure)
USABLE_GIB = {"H100-80GB": 79.1, "H200": 139.8}


def usable_gib(gpu: str) -> float:
    return USABLE_GIB.get(gpu, round(GPU_MEMORY_GIB[gpu] * 79.1 / 80, 1))


CUDA_ALLOWANCE_GIB = 1.5  # the CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation (an assumption)


@dataclass
class PlanConfig:
    gpus: int = 8  # GPUs the run uses, all nodes together
    gpu: str = "H100-80GB"  # the GPU: its memory and, where known, its peak FLOP/s (names listed below)
    gpu_memory: float | None = None  # GiB per GPU, instead of --gpu's
    tokens_per_sec: float | None = None  # the run's measured speed, all GPUs together (a short run's tok/sec)
    mfu: float = 0.4  # without --tokens-per-sec: the model FLOPs utilization assumed for the time and cost
    price: float = 2.5  # price of one GPU-hour, in dollars (an assumption: pass your provider's)


def block_activation_bytes(c: GPTConfig, dtype_bytes: int) -> int:
    """What autograd keeps of one block for the backward pass, per token: the two LayerNorms' fp32 inputs
    (the residual stream, 2 x 4C bytes), 14C values in the autocast dtype (LayerNorm outputs, q/k/v, attention
    output, the MLP's 4C-wide input and GELU output), and LayerNorm/attention statistics ((4 + n_head) fp32)."""
    return 8 * c.n_embd + 14 * c.n_embd * dtype_bytes + 4 * (4 + c.n_head)


def option_activation_bytes(c: GPTConfig) -> int:
    """What nanochat's options add per token (fp32), with or without checkpointing: under --layer-scalars each
    block's unmixed stream (4C a layer); each value embedding (4C; a checkpointed block's input too); --smear's
    shifted copy (4C) and its gate's input. The back-out's middle stream is the next block's input, kept anyway
    (tests/test_plan.py measures each)."""
    C = c.n_embd
    return (4 * C * (c.n_layer * c.layer_scalars + len(c.value_embed_layers()) + c.smear)
            + 4 * SMEAR_CHANNELS * c.smear)


def saved_activation_bytes(c: GPTConfig, tokens: int, dtype_bytes: int, checkpointing: bool) -> int:
    """What autograd keeps for the backward pass at the end of the forward, but the logits: each block's
    activations, or with checkpointing only each block's input (4C a token) plus the one block recomputed
    during the backward pass at a time; then ln_f and lm_head's input; and what the options keep."""
    C, block = c.n_embd, block_activation_bytes(c, dtype_bytes)
    per_token = c.n_layer * (4 * C if checkpointing else block) + 8 * C + option_activation_bytes(c)
    return tokens * per_token + (tokens * block if checkpointing else 0)  # + the block being recomputed


def logits_bytes(c: GPTConfig, tokens: int, dtype_bytes: int, loss_chunk: int) -> int:
    """The output layer and loss: the log-probabilities kept for backward (fp32), the logits and their fp32
    copy while the loss is computed. Chunked (--loss-chunk), only a chunk's worth at a time, plus lm_head's
    weight gradient computed in the same pass."""
    rows = min(loss_chunk, tokens) if loss_chunk > 0 else tokens
    return rows * c.vocab_size * (8 + dtype_bytes) + (c.vocab_size * c.n_embd * 4 if loss_chunk > 0 else 0)


def optimizer_state_bytes(cfg, n: int) -> dict[str, int]:
    """The optimizer state one GPU holds (n: the GPUs FSDP splits it over): AdamW's two fp32 moments a parameter;
    under muon, Muon's one fp32 momentum buffer for the blocks' matrices (and, nanochat's variant, NorMuon's second
    moment: a vector a matrix) and AdamW's two for each of its groups, counted on the model the run builds (made on
    the meta device: no memory)."""
    if cfg.optimizer == "adamw":
        return {"AdamW state (fp32 m, v)": 8 * cfg.model_config().num_parameters() // n}
    with torch.device("meta"):
        params = muon_groups(GPT(cfg.model_config()))
    groups = {k: sum(p.numel() for p in ps) for k, ps in params.items()}
    parts = {"Muon momentum (fp32): block matrices": 4 * groups.pop("muon", 0) // n}
    if cfg.muon_variant == "nanochat":  # NorMuon's second moment: one a neuron, along each matrix's longer side
        parts["NorMuon second moments (fp32)"] = 4 * sum(max(p.shape) for p in params.get("muon", [])) // n
    return parts | {f"AdamW state (fp32 m, v): {k}": 8 * size // n for k, size in groups.items()}


def plan_memory(cfg, gpus: int, B: int, dtype_bytes: int) -> dict[str, int]:
    """Bytes one GPU holds at its peak, by what they are."""
    c, P = cfg.model_config(), cfg.model_config().num_parameters()
    fsdp = cfg.memory.shard == "fsdp"
    accumulating = cfg.total_batch_size > B * cfg.seq_len * gpus and not cfg.memory.reduce_every_micro_step
    n = gpus if fsdp else 1  # FSDP splits the model states over the GPUs
    parts = {"weights (fp32)": 4 * P // n, "gradients (fp32)": 4 * P // n, **optimizer_state_bytes(cfg, n)}
    if fsdp:  # gathered (fp32): the root unit (embeddings, ln_f) and two blocks (this one and the next,
        block = c.block_parameters()  # prefetched); the root's gradients before their reduction
        root = P - c.n_layer * block
        parts["gathered weights, the root's gradients"] = 4 * (2 * root + 2 * block)
        parts["whole gradients between micro-steps"] = 4 * P if accumulating else 0
    else:
        parts["DDP's gradient buckets"] = 4 * P if gpus > 1 else 0
    parts["autocast's weight copies"] = 2 * P if dtype_bytes == 2 else 0  # bf16 casts kept for the backward pass
    tokens = B * cfg.seq_len
    parts["activations"] = saved_activation_bytes(c, tokens, dtype_bytes, cfg.memory.activation_checkpointing)
    parts["logits and loss"] = logits_bytes(c, tokens, dtype_bytes, cfg.memory.loss_chunk)
    parts["CUDA context and workspaces (assumed)"] = int(CUDA_ALLOWANCE_GIB * GIB)
    return parts


def largest_micro_batch(cfg, gpus: int, memory: float, dtype_bytes: int) -> int | None:
    """The largest micro-batch that fits and divides the total batch (accumulation computed); None if none."""
    per_step = cfg.total_batch_size // (cfg.seq_len * gpus)
    fits = [b for b in range(1, per_step + 1) if per_step % b == 0
            and sum(plan_memory(cfg, gpus, b, dtype_bytes).values()) <= memory]
    return max(fits) if fits else None


def plan_report(cfg, plan: PlanConfig) -> list[str]:
    """The plan, as printed."""
    c, gpus = cfg.model_config(), plan.gpus
    memory = (plan.gpu_memory or usable_gib(plan.gpu)) * GIB
    dtype_bytes = 4 if cfg.dtype == "float32" else 2  # auto: bf16 (or fp16) on CUDA
    dtype = {"auto": "bf16", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[cfg.dtype]
    parts = plan_memory(cfg, gpus, cfg.micro_batch_size, dtype_bytes)
    total, accum = sum(parts.values()), cfg.total_batch_size // (cfg.micro_batch_size * cfg.seq_len * gpus)
    lines = [f"{c.num_parameters():,} parameters ({c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide) on {gpus} x "
             f"{plan.gpu} ({memory / GIB:.1f} GiB usable) | --shard {cfg.memory.shard} | activation checkpointing "
             f"{'on' if cfg.memory.activation_checkpointing else 'off'} | {dtype} autocast | "
             f"--optimizer {cfg.optimizer}",
             f"micro-batch {cfg.micro_batch_size} x {cfg.seq_len} tokens, gradient accumulation {accum}", "per GPU:"]
    lines += [f"  {name:<40} {v / GIB:8.2f} GiB" for name, v in parts.items() if v]
    verdict = "fits" if total <= memory else "does NOT fit"
    lines.append(f"  {'total':<40} {total / GIB:8.2f} GiB of {memory / GIB:.1f}: {verdict}")
    best = largest_micro_batch(cfg, gpus, memory, dtype_bytes)
    lines.append(f"largest micro-batch that fits: {best}" if best else "no micro-batch fits: add --shard fsdp, "
                 "--activation-checkpointing, --loss-chunk 8192 or GPUs")
    return lines + plan_cost(cfg, plan)


def plan_cost(cfg, plan: PlanConfig) -> list[str]:
    tokens = cfg.max_steps * cfg.total_batch_size
    peak = peak_for_name(plan.gpu.replace("-", " "), bf16=cfg.dtype != "float32")
    if plan.tokens_per_sec:
        speed, source = plan.tokens_per_sec, "measured (--tokens-per-sec)"
    elif peak:
        speed = plan.mfu * peak * plan.gpus / flops_per_token(cfg.model_config(), cfg.seq_len)
        source = f"assumed: {plan.mfu:.0%} MFU of {peak / 1e12:.0f} TFLOP/s a GPU (--mfu; or --tokens-per-sec)"
    else:
        return [f"run: {cfg.max_steps:,} steps x {cfg.total_batch_size:,} tokens = {tokens / 1e9:.1f}B tokens; "
                f"time and cost: pass --tokens-per-sec (no peak FLOP/s known for {plan.gpu})"]
    hours = tokens / speed / 3600
    return [f"run: {cfg.max_steps:,} steps x {cfg.total_batch_size:,} tokens = {tokens / 1e9:.1f}B tokens",
            f"at {speed:,.0f} tokens/s ({source}): {hours:,.1f} hours, {hours * plan.gpus:,.0f} GPU-hours, "
            f"${hours * plan.gpus * plan.price:,.0f} at ${plan.price:.2f} a GPU-hour (--price)"]


def logits_warning(c: GPTConfig, tokens: int, dtype_bytes: int, gpu_memory: float) -> str | None:
    """--shard fsdp with --loss-chunk 0: only the blocks are compiled, so the output layer and its loss run
    eagerly, with all of a micro-batch's logits at once. A one-line warning where they would take more than a
    quarter of the GPU's memory (gpu_memory, bytes), by this planner's count (logits_bytes); else None."""
    need = logits_bytes(c, tokens, dtype_bytes, 0)
    if need <= gpu_memory / 4:
        return None
    return (f"warning: under --shard fsdp the output layer runs eagerly: a micro-batch's {tokens:,} tokens of logits "
            f"take {need / GIB:.1f} GiB of this GPU's {gpu_memory / GIB:.1f}; --loss-chunk 8192 computes them 8,192 "
            "tokens at a time")
