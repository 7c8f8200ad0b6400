"""
The modern recipe's optimizer and schedule (--optimizer muon, --schedule wsd), beside GPT-2's AdamW with warmup
and cosine (train_gpt2.py): Muon on the blocks' matrices with a momentum warmup, AdamW groups with their own
learning rates for the embeddings, an untied head and the vectors, and a warmup-stable-decay schedule.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

# torch.optim.Muon's settings, every one given (its defaults are not Keller Jordan's): the quintic Newton-Schulz
# iteration's coefficients and 5 steps (his muon.py's, which torch's also takes), its epsilon, Nesterov momentum,
# and the update scaled by sqrt(max(1, rows / cols)) ("original": modded-nanogpt's `max(1, g.size(0)/g.size(1))**0.5`)
MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
MUON_NS_STEPS = 5
MUON_EPS = 1e-7
MUON_ADJUST_LR = "original"


# --muon-variant nanochat: nanochat's Muon (its optim.py), written here from its description. Polar Express's
# coefficients (Amsel et al. 2025, arXiv:2505.16932: num_iters=5, safety factor 2e-2, cushion 2), one pair of
# (a, b, c) per iteration, in place of Newton-Schulz's one fixed triple
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
NORMUON_BETA2 = 0.9  # the decay of NorMuon's second moment (per row or column of the update)


def polar_express(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The update's nearest semi-orthogonal matrix, roughly (its singular values pushed towards 1), in `dtype`:
    rows first rescaled to the mean row norm (MuonEq), then the polar iteration on X (or X^T, for a tall X)."""
    x = g.float()
    target = x.norm() / x.size(0) ** 0.5
    x = (x * (target / x.norm(dim=1, keepdim=True).clamp_min(1e-6))).to(dtype)  # every row the mean row's norm
    tall = x.size(0) > x.size(1)
    x = x.mT if tall else x  # (short, long): A below is the smaller Gram matrix
    x = x / (x.norm() * 1.01 + 1e-6)  # singular values within (0, 1)
    for a, b, c in POLAR_EXPRESS:
        A = x @ x.mT
        x = a * x + (b * A + c * (A @ A)) @ x
    return x.mT if tall else x


class NorMuon(torch.optim.Optimizer):
    """nanochat's Muon on 2-D parameters: Nesterov momentum; the update orthogonalised (polar_express) and its
    Frobenius norm set to sqrt(min(rows, cols)), a semi-orthogonal matrix's (Muon+); NorMuon's per-neuron
    normalisation (each row, or each column of a wide matrix, scaled by the root of a running mean of its squared
    entries, the whole keeping its norm); lr x sqrt(max(1, rows / cols)); cautious weight decay (only where the
    update and the weight agree in sign). The orthogonalisation runs in bfloat16 on CUDA, fp32 elsewhere."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float = 0.0, beta2: float = NORMUON_BETA2):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, beta2=beta2))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)

    def _update(self, p: torch.Tensor, group: dict) -> None:
        state, m = self.state[p], group["momentum"]
        dim = 1 if p.size(0) >= p.size(1) else 0  # the longer side's neurons: averaged within each row (or column)
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
            state["second_moment"] = p.new_zeros((p.size(0), 1) if dim == 1 else (1, p.size(1)))
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - m)
        g = p.grad.lerp(buf, m)  # Nesterov
        dtype = torch.bfloat16 if p.device.type == "cuda" else torch.float32
        g = polar_express(g, dtype).to(p.dtype)
        g = g * (min(g.shape) ** 0.5 / g.float().norm().clamp_min(1e-6))  # Muon+: a semi-orthogonal matrix's norm
        v = g.float().square().mean(dim=dim, keepdim=True)  # (rows, 1) or (1, cols)
        state["second_moment"].lerp_(v.to(p.dtype), 1 - group["beta2"])
        scale = state["second_moment"].clamp_min(1e-10).rsqrt()
        norm_before = (v.sum() * g.size(dim)).sqrt()
        norm_after = ((v * g.size(dim)) * scale.float().square()).sum().sqrt()
        g = g * (scale * (norm_before / norm_after.clamp_min(1e-10))).to(g.dtype)  # per neuron, the norm kept
        lr = group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5
        agree = (g * p) >= 0  # cautious weight decay
        p.sub_(lr * g + lr * group["weight_decay"] * p * agree)


# The AdamW groups of --optimizer muon, by parameter: their lr flag, and the multiple of it nanochat gives them.
# --adamw-groups nanochat gives each its (betas, weight decay) too; shared: --beta1/--beta2 for all, --weight-decay
# on embed and head only, as before.
GROUP_LRS = {"embed": ("embed_lr", 1.0), "value_embed": ("embed_lr", 0.5), "head": ("head_lr", 1.0),
             "scalar": ("scalar_lr", 1.0), "x0": ("scalar_lr", 1.0), "resid": ("scalar_lr", 0.01),
             "gate": ("gate_lr", 1.0)}
NANOCHAT_GROUPS = {"embed": ((0.8, 0.995), 0.001), "value_embed": ((0.8, 0.995), 0.01), "head": ((0.8, 0.96), 0.01),
                   "scalar": ((0.8, 0.95), 0.0), "x0": ((0.96, 0.95), 0.0), "resid": ((0.8, 0.95), 0.05),
                   "gate": ((0.8, 0.95), 0.0)}
WIDTH_SCALED = ("embed", "value_embed", "head")  # --lr-width-scale: lr x sqrt(768 / n_embd), nanochat's rule
REFERENCE_WIDTH = 768  # nanochat's d12, where its lrs were tuned (--lr-width-scale; support/recipes.py's rules)
MUON_VARIANTS = ("keller", "nanochat")  # --muon-variant's choices
ADAMW_GROUPS = ("shared", "nanochat")  # --adamw-groups'
WEIGHT_DECAY_SCHEDULES = ("constant", "cosine")  # --muon-weight-decay-schedule's


def group_of(name: str, p: nn.Parameter, in_blocks: bool) -> str:
    """A parameter's group under --optimizer muon: muon (a 2-D parameter inside the blocks: q, k, v, the
    projections, the MLP, a value embedding's gate), or AdamW's embed (wte, wpe; tied, the head too), value_embed,
    head (an untied lm_head), x0 and resid (--layer-scalars), gate (--smear's and --backout's), scalar (every other
    vector: biases, norms' weights)."""
    if in_blocks and p.dim() == 2:
        return "muon"
    named = {"lm_head.weight": "head", "x0_lambdas": "x0", "resid_lambdas": "resid", "smear_gate.weight": "gate",
             "smear_lambda": "gate", "backout_lambda": "gate"}
    if name in named:
        return named[name]
    return "value_embed" if name.startswith("value_embeds.") else "embed" if p.dim() >= 2 else "scalar"


def muon_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """--optimizer muon's groups (group_of), in GROUP_LRS's order after muon; empty groups are left out."""
    in_blocks = {id(p) for p in model.transformer.h.parameters()}
    groups = {k: [] for k in ("muon", *GROUP_LRS)}
    for name, p in model.named_parameters():  # tied weights appear once, as transformer.wte.weight
        if p.requires_grad:
            groups[group_of(name, p, id(p) in in_blocks)].append(p)
    return {k: v for k, v in groups.items() if v}


def adamw_group(kind: str, params: list, cfg, width: int) -> dict:
    """One AdamW group: its params, name, betas and weight decay, and lr_scale (what multiplies its lr flag)."""
    if cfg.adamw_groups == "nanochat":
        betas, decay = NANOCHAT_GROUPS[kind]
    else:
        betas, decay = (cfg.beta1, cfg.beta2), cfg.weight_decay if kind in ("embed", "head", "value_embed") else 0.0
    wide = (REFERENCE_WIDTH / width) ** 0.5 if cfg.lr_width_scale and kind in WIDTH_SCALED else 1.0
    scale = GROUP_LRS[kind][1] * wide
    return {"params": params, "name": kind, "betas": betas, "weight_decay": decay, "lr_scale": scale}


def configure_muon(model: nn.Module, cfg, device_type: str) -> tuple[torch.optim.AdamW, torch.optim.Optimizer]:
    """--optimizer muon's pair: Muon (--muon-variant) on the blocks' matrices, AdamW on the other groups
    (muon_groups). Each group carries its name (base_lr reads its lr by it); the lrs, Muon's momentum and weight
    decay are set at every step."""
    groups = muon_groups(model)
    width = model.config.n_embd
    adamw = torch.optim.AdamW([adamw_group(k, ps, cfg, width) for k, ps in groups.items() if k != "muon"],
                              lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=device_type == "cuda")
    matrices = [{"params": groups.get("muon", []), "name": "muon"}]
    if cfg.muon_variant == "nanochat":
        return adamw, NorMuon(matrices, lr=cfg.muon_lr, momentum=cfg.muon_momentum_start,
                              weight_decay=cfg.muon_weight_decay)
    muon = torch.optim.Muon(matrices, lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay,
                            momentum=cfg.muon_momentum_start, nesterov=True, ns_coefficients=MUON_NS_COEFFICIENTS,
                            eps=MUON_EPS, ns_steps=MUON_NS_STEPS, adjust_lr_fn=MUON_ADJUST_LR)
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


def muon_momentum_at(step: int, cfg) -> float:
    """muon_momentum's warmup; then, with --muon-momentum-end, on the line from --muon-momentum down to it over the
    last --cooldown-frac of the steps (nanochat's 0.97 -> 0.90 over its warmdown). As nanochat's get_muon_momentum:
    where the cooldown starts inside the warmup, the momentum steps from the warmup onto that line when the warmup
    ends (the quick start: 0.9697 at step 399, 0.9352 at 400)."""
    if step < cfg.muon_momentum_warmup or cfg.muon_momentum_end in (None, cfg.muon_momentum):
        return muon_momentum(step, cfg.muon_momentum_start, cfg.muon_momentum, cfg.muon_momentum_warmup)
    cooldown = cooldown_steps(cfg.max_steps, cfg.cooldown_frac)
    frac = min(max(step - (cfg.max_steps - cooldown), 0) / cooldown, 1.0)
    return (1 - frac) * cfg.muon_momentum + frac * cfg.muon_momentum_end


def set_muon_step(muon: torch.optim.Optimizer, cfg, step: int) -> float:
    """Muon's momentum at this step (muon_momentum_at) and its weight decay (--muon-weight-decay-schedule cosine:
    from --muon-weight-decay to 0 at --max-steps, nanochat's); returns the momentum."""
    group = muon.param_groups[0]
    group["momentum"] = muon_momentum_at(step, cfg)
    decay = cfg.muon_weight_decay
    if cfg.muon_weight_decay_schedule == "cosine":
        decay *= 0.5 * (1 + math.cos(math.pi * min(step / cfg.max_steps, 1.0)))
    group["weight_decay"] = decay
    return group["momentum"]


def base_lr(cfg, group: dict) -> float:
    """A param group's peak lr, which the schedule scales: --max-lr for every AdamW group (GPT-2's recipe); under
    muon, each group's own flag (its default --max-lr), Muon's --muon-lr. Read from the flags at every step, so
    that a resumed run takes the lrs it was given."""
    if cfg.optimizer == "adamw":
        return cfg.max_lr
    if group["name"] == "muon":
        return cfg.muon_lr
    own = getattr(cfg, GROUP_LRS[group["name"]][0])
    return (cfg.max_lr if own is None else own) * group.get("lr_scale", 1.0)  # an earlier run's groups have none


def optimizer_lines(cfg, optimizer: torch.optim.Optimizer, muon: torch.optim.Muon | None) -> list[str]:
    """What trains which parameters, at which peak lr, and the schedule: for the run's first lines."""
    count = lambda group: f"{sum(p.numel() for p in group['params']):,}"
    name = lambda group: group.get("name", "decay" if group["weight_decay"] else "no decay")
    shared = all(tuple(g["betas"]) == (cfg.beta1, cfg.beta2) for g in optimizer.param_groups)
    betas = lambda g: "" if shared else f", betas {g['betas'][0]:g}/{g['betas'][1]:g}"
    groups = ", ".join(f"{name(g)} ({count(g)} parameters, lr {base_lr(cfg, g):g}{betas(g)}, weight decay "
                       f"{g['weight_decay']:g})" for g in optimizer.param_groups)
    on = f"(betas {cfg.beta1}, {cfg.beta2}, eps {cfg.eps:g})" if shared else f"(eps {cfg.eps:g})"
    lines = [f"optimizer {cfg.optimizer}: AdamW {on} on {groups}"]
    if muon is not None:
        g = muon.param_groups[0]
        falls = cfg.muon_momentum_end not in (None, cfg.muon_momentum)
        end = f", then to {cfg.muon_momentum_end:g} over the cooldown" if falls else ""
        how = (f"{MUON_NS_STEPS} Newton-Schulz steps" if cfg.muon_variant == "keller" else
               f"nanochat's: {len(POLAR_EXPRESS)} Polar Express steps, NorMuon, cautious weight decay")
        lines[0] += (f"; Muon on the blocks' {len(g['params'])} matrices ({count(g)} parameters, lr {cfg.muon_lr:g} x "
                     f"sqrt(max(1, rows/cols)), Nesterov momentum {cfg.muon_momentum_start:g} -> {cfg.muon_momentum:g} "
                     f"over {cfg.muon_momentum_warmup} steps{end}, weight decay {cfg.muon_weight_decay:g} "
                     f"({cfg.muon_weight_decay_schedule}), {how})")
    if cfg.schedule == "wsd":
        n = cooldown_steps(cfg.max_steps, cfg.cooldown_frac)
        shape = f"constant, then linear over the last {n:,} steps (--cooldown-frac {cfg.cooldown_frac:g})"
    else:
        shape = "cosine"
    lines.append(f"schedule {cfg.schedule}: warmup {cfg.warmup_steps:,} steps, {shape} to {cfg.min_lr_ratio:g}x the "
                 f"peak lrs at step {cfg.max_steps:,}")
    return lines
