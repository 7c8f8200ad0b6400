"""
The modern recipe's optimizer and schedule (--optimizer muon, --schedule wsd), beside GPT-2's AdamW with warmup
and cosine (train_gpt2.py): Muon on the blocks' matrices with a momentum warmup, AdamW groups with their own
learning rates for the embeddings, an untied head and the vectors, and a warmup-stable-decay schedule.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# torch.optim.Muon's settings, every one given (its defaults are not Keller Jordan's): the quintic Newton-Schulz
# iteration's coefficients and 5 steps (his muon.py's, which torch's also takes), its epsilon, Nesterov momentum,
# and the update scaled by sqrt(max(1, rows / cols)) ("original": modded-nanogpt's `max(1, g.size(0)/g.size(1))**0.5`)
MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
MUON_NS_STEPS = 5
MUON_EPS = 1e-7
MUON_ADJUST_LR = "original"


def muon_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """--optimizer muon's groups: muon, every 2-D parameter inside the blocks (q, k, v, the projections, the MLP);
    then AdamW's: embed, the other matrices (wte, wpe; with tied embeddings the head too), head (an untied
    lm_head), scalar (every vector: biases, norms' weights). Empty groups are left out."""
    in_blocks = {id(p) for p in model.transformer.h.parameters()}
    groups = {"muon": [], "embed": [], "head": [], "scalar": []}
    for name, p in model.named_parameters():  # tied weights appear once, as transformer.wte.weight
        if not p.requires_grad:
            continue
        kind = ("muon" if id(p) in in_blocks and p.dim() == 2 else "head" if name == "lm_head.weight"
                else "embed" if p.dim() >= 2 else "scalar")
        groups[kind].append(p)
    return {k: v for k, v in groups.items() if v}


def configure_muon(model: nn.Module, cfg, device_type: str) -> tuple[torch.optim.AdamW, torch.optim.Muon]:
    """--optimizer muon's pair: Muon on the blocks' matrices, AdamW on the other groups (muon_groups). Each group
    carries its name (base_lr reads its lr by it); the lrs and Muon's momentum are set at every step."""
    groups = muon_groups(model)
    decay = {"embed": cfg.weight_decay, "head": cfg.weight_decay, "scalar": 0.0}  # as AdamW's: not on vectors
    adamw = torch.optim.AdamW([{"params": ps, "weight_decay": decay[k], "name": k} for k, ps in groups.items()
                               if k != "muon"], lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                              fused=device_type == "cuda")
    muon = torch.optim.Muon([{"params": groups.get("muon", []), "name": "muon"}], lr=cfg.muon_lr,
                            weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum_start, nesterov=True,
                            ns_coefficients=MUON_NS_COEFFICIENTS, eps=MUON_EPS, ns_steps=MUON_NS_STEPS,
                            adjust_lr_fn=MUON_ADJUST_LR)
    return adamw, muon


def cooldown_steps(max_steps: int, cooldown_frac: float) -> int:
    """--cooldown-frac of the steps, at least one."""
    return max(1, round(cooldown_frac * max_steps))


def get_wsd_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int, cooldown: int) -> float:
    """Warmup-stable-decay (trapezoidal): linear warmup to max_lr, constant, then over the last `cooldown` steps
    linearly down to min_lr, reached at max_steps (the last step trains at 1/cooldown of the way above it), then
    min_lr. As modded-nanogpt's: with min_lr 0 its record 11 (3000 steps, 900 of cooldown) has 1.0 at step 2100
    and 1/900 at step 2999."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    decay_ratio = min(1.0, (max_steps - step) / cooldown)  # 1 until the cooldown, then -> 0
    return min_lr + decay_ratio * (max_lr - min_lr)


def muon_momentum(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Muon's momentum, linear from start to end over the first warmup_steps steps (modded-nanogpt's warmup)."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


def base_lr(cfg, group: dict) -> float:
    """A param group's peak lr, which the schedule scales: --max-lr for every AdamW group (GPT-2's recipe); under
    muon, each group's own flag (its default --max-lr), Muon's --muon-lr. Read from the flags at every step, so
    that a resumed run takes the lrs it was given."""
    if cfg.optimizer == "adamw":
        return cfg.max_lr
    own = {"muon": cfg.muon_lr, "embed": cfg.embed_lr, "head": cfg.head_lr, "scalar": cfg.scalar_lr}[group["name"]]
    return cfg.max_lr if own is None else own


def optimizer_lines(cfg, optimizer: torch.optim.Optimizer, muon: torch.optim.Muon | None) -> list[str]:
    """What trains which parameters, at which peak lr, and the schedule: for the run's first lines."""
    count = lambda group: f"{sum(p.numel() for p in group['params']):,}"
    name = lambda group: group.get("name", "decay" if group["weight_decay"] else "no decay")
    groups = ", ".join(f"{name(g)} ({count(g)} parameters, lr {base_lr(cfg, g):g}, weight decay {g['weight_decay']:g})"
                       for g in optimizer.param_groups)
    lines = [f"optimizer {cfg.optimizer}: AdamW (betas {cfg.beta1}, {cfg.beta2}, eps {cfg.eps:g}) on {groups}"]
    if muon is not None:
        g = muon.param_groups[0]
        lines[0] += (f"; Muon on the blocks' {len(g['params'])} matrices ({count(g)} parameters, lr {cfg.muon_lr:g} x "
                     f"sqrt(max(1, rows/cols)), Nesterov momentum {cfg.muon_momentum_start:g} -> {cfg.muon_momentum:g} "
                     f"over {cfg.muon_momentum_warmup} steps, weight decay {cfg.muon_weight_decay:g}, "
                     f"{MUON_NS_STEPS} Newton-Schulz steps)")
    if cfg.schedule == "wsd":
        n = cooldown_steps(cfg.max_steps, cfg.cooldown_frac)
        shape = f"constant, then linear over the last {n:,} steps (--cooldown-frac {cfg.cooldown_frac:g})"
    else:
        shape = "cosine"
    lines.append(f"schedule {cfg.schedule}: warmup {cfg.warmup_steps:,} steps, {shape} to {cfg.min_lr_ratio:g}x the "
                 f"peak lrs at step {cfg.max_steps:,}")
    return lines
