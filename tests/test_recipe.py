"""The modern recipe's training side: --recipe (its table, layered over presets and under flags), --optimizer muon
(torch.optim.Muon on the blocks' matrices, AdamW on the rest), --schedule wsd, --target-val-loss, the speedrun
preset, plan's optimizer state; resume, DDP, fp16 and the spike guard's rewind with two optimizers.

Tiny models on synthetic shards (test_train's), CPU, fp32. What the model does with the architecture options is
tests/test_modern_model.py's; these tests hold whatever it does (a resume is bitwise, DDP equals one process).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_spike import GUARD, spiky_shards
from test_train import (
    REPO,
    assert_same_parameters,
    assert_same_run,
    checkpoint_tensors,
    final_state,
    run,
    tiny_args,
    write_shards,
)

import fineweb
import gpt2
import train_gpt2 as tg
from support.checkpoints import model_entries, save_checkpoint
from support.data import dataset_dir
from support.metrics import flops_per_token
from support.modern_optim import base_lr, cooldown_steps, get_wsd_lr, muon_groups, muon_momentum
from support.planner import optimizer_state_bytes
from support.recipes import MODERN_ARCHITECTURE, NANOCHAT_ARCHITECTURE, RECIPES, nanochat_rules, recipe_values

pytestmark = pytest.mark.usefixtures("one_thread")

MODERN = ["--recipe", "modern", "--embed-lr", "1e-2", "--head-lr", "1e-2", "--scalar-lr", "1e-2",
          "--muon-momentum-warmup", "4", "--cooldown-frac", "0.5"]  # tiny_args's lr (1e-2) for AdamW's groups
KELLER = ["--muon-variant", "keller", "--adamw-groups", "shared", "--no-lr-width-scale", "--muon-weight-decay-schedule",
          "constant", "--muon-momentum", "0.95", "--muon-momentum-end", "0.95"]  # torch's Muon, the records' AdamW


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "shards")


def log_values(log_dir: Path, name: str) -> dict[int, float]:
    rows = [line.split() for line in (log_dir / "log.txt").read_text().splitlines()]
    return {int(step): float(value) for step, n, value in rows if n == name}


def cli_error(args: list[str], capsys) -> str:
    """train_gpt2.py's command line, in this process: exit status 2 and one line on stderr, returned."""
    with pytest.raises(SystemExit) as e:
        tg.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_gpt2.py: error: ") and "\n" not in err, err
    return err.removeprefix("train_gpt2.py: error: ")


def torchrun(args: list[str], port: int, rank_logs: Path, check: bool = True) -> subprocess.CompletedProcess:
    """train_gpt2.py under a 2-rank torchrun with a fixed rendezvous; each rank's output in its own file."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}",
           "--nnodes=1", "--nproc_per_node=2", "--log-dir", str(rank_logs), "--redirects", "3",
           str(REPO / "train_gpt2.py"), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def rank_stderr(rank_logs: Path, rank: int) -> str:
    return next(rank_logs.glob(f"*/attempt_0/{rank}/stderr.log")).read_text()


# -----------------------------------------------------------------------------
# the default recipe: nothing changes


def test_the_default_recipe_is_gpt2s_bitwise(shards, tmp_path):
    # every new flag at its default, and the default recipe named explicitly, train the same bits
    plain = run(tiny_args(shards, tmp_path / "plain", "--checkpoint-interval", "3"))
    named = run(tiny_args(shards, tmp_path / "named", "--checkpoint-interval", "3", "--recipe", "gpt2", "--optimizer",
                          "adamw", "--schedule", "cosine", "--target-val-loss", "0", "--pos-emb", "learned"))
    assert_same_run(tmp_path / "plain", tmp_path / "named")
    cfg = tg.parse_train_args(tiny_args(shards, tmp_path / "x"))
    # the lrs are get_lr's, computed as before the schedules had a choice (the same floats)
    assert plain["lr"] == {s: tg.get_lr(s, 1e-2, 1e-2 * 0.1, 2, 6) for s in range(6)} == named["lr"]
    assert "momentum" not in (tmp_path / "plain" / "log.txt").read_text()
    ckpt = final_state(tmp_path / "plain")
    assert ckpt["muon"] is None and len(ckpt["optimizer"]["param_groups"]) == 2  # GPT-2's AdamW alone
    assert ckpt["config"] == dataclasses.asdict(gpt2.GPTConfig(32, 64, 2, 2, 32))  # every option GPT-2's
    assert cfg.model == gpt2.ModelOptions() and (cfg.recipe, cfg.optimizer, cfg.schedule) == ("gpt2", "adamw", "cosine")


def test_an_adamw_checkpoint_from_before_the_options_still_resumes(shards, tmp_path):
    # written before this change: no architecture options in its config or args, no Muon or train_time entries
    args = lambda d, *x: tiny_args(shards, d, "--checkpoint-interval", "100", *x, steps=6)
    run(args(tmp_path / "straight"))
    run(args(tmp_path / "old", "--stop-after-step", "2"))
    path = tmp_path / "old" / "model_00002.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"] = {k: ckpt["config"][k] for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")}
    for name in ("optimizer", "schedule", "recipe", "model", "target_val_loss"):
        del ckpt["args"][name]
    del ckpt["muon"], ckpt["train_time"]
    torch.save(ckpt, path)
    run(args(tmp_path / "old", "--resume"))
    assert_same_run(tmp_path / "straight", tmp_path / "old")


# -----------------------------------------------------------------------------
# --recipe: its table, the layering, --help, the run's first lines


def test_recipe_layering_defaults_preset_recipe_flags():
    parse = lambda *a: tg.parse_train_args(list(a))
    cfg = parse("--preset", "shakespeare", "--recipe", "modern", "--muon-lr", "0.05", "--n-layer", "3")
    assert (cfg.n_layer, cfg.muon_lr) == (3, 0.05)  # flags over the preset and over the recipe
    assert (cfg.embed_lr, cfg.muon_weight_decay, cfg.min_lr_ratio) == (0.4243, 0.8213, 0.15)  # the preset's values
    assert (cfg.beta1, cfg.eps, cfg.schedule, cfg.optimizer) == (0.8, 1e-10, "wsd", "muon")  # its general ones
    assert (cfg.muon_momentum_warmup, cfg.muon_variant, cfg.adamw_groups) == (400, "nanochat", "nanochat")
    assert (cfg.max_steps, cfg.n_embd, cfg.data) == (594, 32, "input.txt")  # the preset's
    assert cfg.model == gpt2.ModelOptions(**{**NANOCHAT_ARCHITECTURE, "logit_softcap": 0.0})  # none at 32 wide
    assert parse("--preset", "gpt2", "--recipe", "modern").model == gpt2.ModelOptions(**NANOCHAT_ARCHITECTURE)
    medium = parse("--preset", "gpt2-medium", "--recipe", "modern")  # no entry of its own: the general values
    assert (medium.warmup_steps, medium.min_lr_ratio, medium.muon_lr, medium.n_layer) == (40, 0.05, 0.02, 24)
    # the speedrun preset is the modern recipe; --recipe gpt2 runs GPT-2's recipe at its shape
    speedrun, baseline = parse("--preset", "speedrun"), parse("--preset", "speedrun", "--recipe", "gpt2")
    assert (speedrun.recipe, speedrun.optimizer, speedrun.model.pos_emb, speedrun.muon_lr) == ("modern", "muon",
                                                                                              "rope", 0.04)
    assert (baseline.recipe, baseline.optimizer, baseline.model, baseline.max_lr) == ("gpt2", "adamw",
                                                                                      gpt2.ModelOptions(), 6e-4)
    assert (baseline.n_head, baseline.max_steps, baseline.target_val_loss) == (6, 3000, 3.28)
    # --optimizer muon alone: GPT-2's recipe with Muon on the matrices, AdamW's groups at --max-lr
    muon = parse("--optimizer", "muon")
    assert muon.model == gpt2.ModelOptions(split_qkv=True) and muon.embed_lr is None and muon.schedule == "cosine"


@pytest.mark.parametrize("preset", [None, "shakespeare", "speedrun", "gpt2-xl"])
def test_every_recipe_value_reaches_the_config(preset):
    cfg = tg.parse_train_args(["--recipe", "modern"] + (["--preset", preset] if preset else []))
    flat = {**dataclasses.asdict(cfg), **dataclasses.asdict(cfg.model)}
    values = recipe_values("modern", preset)
    assert {k: flat[k] for k in values} == values and set(values) >= set(RECIPES["modern"]["*"])
    assert recipe_values("gpt2", preset) == {}


def test_speedrun_is_record_11(capsys):
    # modded-nanogpt records/track_1_short/2024-11-10_UNetDoubleLr: the Hyperparameters and optimizers of its script
    cfg = tg.parse_train_args(["--preset", "speedrun"])
    assert (cfg.n_layer, cfg.n_embd, cfg.n_embd // cfg.n_head, cfg.vocab_size) == (12, 768, 128, 50304)
    assert (cfg.total_batch_size, cfg.seq_len, cfg.max_steps, cfg.warmup_steps) == (8 * 64 * 1024, 1024, 3000, 0)
    assert cooldown_steps(cfg.max_steps, cfg.cooldown_frac) == 900 and cfg.min_lr_ratio == 0.0
    assert (cfg.muon_lr, cfg.embed_lr, cfg.head_lr, cfg.scalar_lr) == (0.04, 0.6, 0.008, 0.04)
    assert (cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.muon_weight_decay) == (0.9, 0.95, 1e-8, 0.0, 0.0)
    assert (cfg.muon_momentum_start, cfg.muon_momentum, cfg.muon_momentum_warmup) == (0.85, 0.95, 500)
    assert (cfg.model.logit_softcap, cfg.grad_clip, cfg.eval_interval, cfg.target_val_loss) == (30.0, 0.0, 125, 3.28)
    assert cfg.model == gpt2.ModelOptions(**MODERN_ARCHITECTURE)  # record 10's architecture, none of nanochat's
    assert (cfg.muon_variant, cfg.adamw_groups, cfg.lr_width_scale, cfg.muon_weight_decay_schedule) == (
        "keller", "shared", False, "constant")
    assert cfg.muon_momentum_end == cfg.muon_momentum  # the momentum stays at 0.95 to the end
    assert cfg.val_steps * 64 * 1024 * 8 == 10485760  # the record's val_tokens, on 8 GPUs
    assert cfg.data == str(dataset_dir("fineweb10B"))
    fw = fineweb.parse_args(["--preset", "fineweb10B"])  # python fineweb.py --preset fineweb10B builds it
    assert (fw.dataset, fw.name, fw.prefix, fw.out_dir) == ("HuggingFaceFW/fineweb", "sample-10BT", "fineweb",
                                                             str(dataset_dir("fineweb10B")))


def test_nanochat_rules_are_base_train_pys():
    # karpathy/nanochat 92d63d4 scripts/base_train.py: lr x sqrt(B / 2**19); weight decay 0.28 x sqrt(B / 2**19) x
    # D_ref / D, D = 12 x (the blocks' matrices + the value embeddings' gates + the head); its d12 is the reference
    assert nanochat_rules(12, 6, 768, 32768, 2 ** 19) == dict(muon_lr=0.02, embed_lr=0.3, head_lr=0.008,
                                                             scalar_lr=0.5, muon_weight_decay=0.28)
    d_ref = 12 * (12 * 12 * 768 ** 2 + 6 * 12 * 6 + 32768 * 768)  # 6 gates (layers 1, 3, ..., 11) of 12 x 6 heads
    d_quick = 12 * (4 * 12 * 32 ** 2 + 2 * 12 * 2 + 50304 * 32)  # 2 gates (layers 1, 3) of 12 x 2 heads
    batch = (1024 / 2 ** 19) ** 0.5
    quick = nanochat_rules(4, 2, 32, 50304, 1024, lr_mult=32)
    assert quick["muon_weight_decay"] == pytest.approx(0.28 * batch * d_ref / d_quick, rel=1e-3)
    assert quick["muon_lr"] == pytest.approx(0.02 * batch * 32, rel=1e-3)
    assert recipe_values("modern", "shakespeare")["muon_lr"] == quick["muon_lr"]


def test_speedrun_without_its_data_says_how_to_build_it(tmp_path):
    if dataset_dir("fineweb10B").exists():
        pytest.skip("the dataset is there")
    small = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--device", "cpu", "--log-dir", str(tmp_path / "r")]
    out = subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), "--preset", "speedrun", *small],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and "`python fineweb.py --preset fineweb10B`" in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1


def test_help_lists_the_recipes_and_their_flags():
    help_text = tg.build_train_parser().format_help()
    for flag in ("--recipe {gpt2,modern}", "--optimizer {adamw,muon}", "--schedule {cosine,wsd}", "--cooldown-frac",
                 "--muon-lr", "--muon-momentum-warmup", "--embed-lr", "--head-lr", "--scalar-lr", "--target-val-loss",
                 "--pos-emb {learned,rope}", "--qk-norm", "--no-tie-embeddings", "--logit-softcap", "--split-qkv"):
        assert flag in help_text, flag
    flat = " ".join(help_text.split())  # argparse wraps the epilog
    assert "Recipes: modern: {'pos_emb': 'rope'," in flat
    assert "modern for shakespeare: {'muon_lr': 0.02828," in flat and "modern for speedrun: {'pos_emb': 'rope'," in flat
    assert "speedrun: {'recipe': 'modern'," in flat  # the preset


def test_the_run_says_which_recipe_values_and_overrides_it_used(shards, tmp_path, capsys):
    tg.main(tiny_args(shards, tmp_path / "r", *MODERN, "--muon-lr", "0.03", steps=1))
    out = capsys.readouterr().out.splitlines()
    recipe = next(i for i, line in enumerate(out) if line.startswith("recipe "))
    assert out[recipe].startswith("recipe modern, its general values: --pos-emb rope --norm rmsnorm --qk-norm "
                                  "--mlp relu2 --no-bias --split-qkv --no-tie-embeddings --zero-init-proj ")
    assert out[recipe + 1] == ("flags over the recipe: --muon-momentum-warmup 4 (recipe: 400), --warmup-steps 2 "
                               "(recipe: 40), --cooldown-frac 0.5 (recipe: 0.65), --muon-lr 0.03 (recipe: 0.02), "
                               "--embed-lr 0.01 (recipe: 0.3), --head-lr 0.01 (recipe: 0.008), --scalar-lr 0.01 "
                               "(recipe: 0.5)")  # tiny_args's --warmup-steps 2 too
    # the embedding's and head's lrs x sqrt(768 / 32), the value embeddings' half that, the residual scalars' 0.01x
    assert re.fullmatch(r"optimizer muon: AdamW \(eps 1e-10\) on embed \(2,048 parameters, lr 0\.0489898, betas "
                        r"0\.8/0\.995, weight decay 0\.001\), value_embed \(2,048 parameters, lr 0\.0244949, .*"
                        r"resid \(2 parameters, lr 0\.0001, betas 0\.8/0\.95, weight decay 0\.05\), gate .*; Muon on "
                        r"the blocks' 13 matrices \([\d,]+ parameters, lr 0\.03 x sqrt\(max\(1, rows/cols\)\), "
                        r"Nesterov momentum 0\.85 -> 0\.97 over 4 steps, then to 0\.9 over the cooldown, weight decay "
                        r"0\.2495 \(cosine\), nanochat's: 5 Polar Express steps, NorMuon, cautious weight decay\)",
                        out[recipe + 2]), out[recipe + 2]
    assert out[recipe + 3] == ("schedule wsd: warmup 2 steps, constant, then linear over the last 1 steps "
                               "(--cooldown-frac 0.5) to 0.05x the peak lrs at step 1")
    tg.main(tiny_args(shards, tmp_path / "k", *MODERN, *KELLER, "--muon-weight-decay", "0", steps=1))  # the speedrun's
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("optimizer "))
    assert re.fullmatch(r"optimizer muon: AdamW \(betas 0\.8, 0\.95, eps 1e-10\) on embed \([\d,]+ parameters, lr "
                        r"0\.01, weight decay 0\).*; Muon on the blocks' \d+ matrices \([\d,]+ parameters, lr 0\.02 x "
                        r"sqrt\(max\(1, rows/cols\)\), Nesterov momentum 0\.85 -> 0\.95 over 4 steps, weight decay 0 "
                        r"\(constant\), 5 Newton-Schulz steps\)", line), line
    tg.main(tiny_args(shards, tmp_path / "d", steps=1))
    default = capsys.readouterr().out
    assert "recipe gpt2: sets nothing (GPT-2's recipe is the defaults, under the flags given)" in default
    assert "optimizer adamw: AdamW (betas 0.9, 0.95, eps 1e-08) on decay (" in default
    assert "schedule cosine: warmup 2 steps, cosine to 0.1x the peak lrs at step 1" in default


# -----------------------------------------------------------------------------
# --optimizer muon: which parameter goes where, every Muon setting explicit


def tiny_model(**options) -> gpt2.GPT:
    torch.manual_seed(0)
    return gpt2.GPT(gpt2.GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, **options))


def test_muon_param_groups():
    model = tiny_model(split_qkv=True, tie_embeddings=False)
    cfg = tg.parse_train_args(["--recipe", "modern", *KELLER, "--max-lr", "1e-3", "--embed-lr", "0.5", "--head-lr",
                               "0.25", "--muon-lr", "0.125", "--muon-weight-decay", "0.01", "--scalar-lr", "0.02"])
    adamw, muon = tg.configure_optimizers(model, cfg, "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: sorted(names[id(p)] for p in g["params"]) for o in (adamw, muon) for g in o.param_groups}
    named = dict(model.named_parameters())
    assert groups["muon"] == sorted(n for n, p in named.items() if n.startswith("transformer.h.") and p.dim() == 2)
    assert groups["muon"] and all(named[n].dim() == 2 for n in groups["muon"])  # torch's Muon refuses others
    vectors = sorted(n for n, p in named.items() if p.dim() < 2)
    assert groups.get("scalar", []) == vectors  # biases and norms' weights, if the model has any
    untied = model.lm_head.weight is not model.transformer.wte.weight
    assert groups.get("head", []) == (["lm_head.weight"] if untied else [])
    assert groups["embed"] == sorted(n for n in named if n.startswith(("transformer.wte", "transformer.wpe")))
    assert sum(len(v) for v in groups.values()) == len(named)  # every parameter, once
    # every setting explicit, never torch.optim.Muon's defaults (lr 1e-3, weight decay 0.1)
    m = muon.param_groups[0]
    assert (m["lr"], m["weight_decay"], m["momentum"], m["nesterov"]) == (0.125, 0.01, 0.85, True)
    assert (m["ns_coefficients"], m["ns_steps"], m["eps"], m["adjust_lr_fn"]) == ((3.4445, -4.7750, 2.0315), 5, 1e-7,
                                                                                 "original")
    lrs = {g["name"]: base_lr(cfg, g) for o in (adamw, muon) for g in o.param_groups}
    maybe = lambda name, present, value: {name: value} if present else {}
    assert lrs == {"muon": 0.125, "embed": 0.5, **maybe("scalar", vectors, 0.02), **maybe("head", untied, 0.25)}
    decay = {g["name"]: g["weight_decay"] for g in adamw.param_groups}
    assert decay == {"embed": 0.0, **maybe("scalar", vectors, 0.0), **maybe("head", untied, 0.0)}  # the recipe's
    assert adamw.param_groups[0]["betas"] == (0.8, 0.95) and adamw.param_groups[0]["eps"] == 1e-10


def test_muon_alone_keeps_adamws_lr_and_decay_on_the_rest():
    cfg = tg.parse_train_args(["--optimizer", "muon", "--max-lr", "3e-2"])
    adamw, _ = tg.configure_optimizers(tiny_model(split_qkv=True), cfg, "cpu")
    assert {g["name"]: (base_lr(cfg, g), g["weight_decay"]) for g in adamw.param_groups} == {
        "embed": (3e-2, 0.1), "scalar": (3e-2, 0.0)}  # GPT-2's: decay on matrices and embeddings, not on vectors


def test_q_k_and_v_are_orthogonalised_one_by_one():
    model = tiny_model(split_qkv=True)
    names = [n for n, _ in model.named_parameters()]
    if any(".c_attn." in n for n in names):
        pytest.skip("this model does not split q, k and v yet (the model branch's GPT does)")
    _, muon = tg.configure_optimizers(model, tg.parse_train_args(["--optimizer", "muon"]), "cpu")
    ids = {id(p) for p in muon.param_groups[0]["params"]}
    for i, block in enumerate(model.transformer.h):
        for m in ("c_q", "c_k", "c_v"):
            w = getattr(block.attn, m).weight
            assert id(w) in ids and w.shape == (16, 16), (i, m)  # each one its own matrix: orthogonalised alone


def test_wsd_schedule_at_its_boundaries():
    cooldown = cooldown_steps(3000, 0.3)  # record 11: 900 steps of 3000
    lr = lambda s, warmup=0, min_lr=0.0: get_wsd_lr(s, 1.0, min_lr, warmup, 3000, cooldown)
    assert cooldown == 900 and lr(0) == lr(2099) == lr(2100) == 1.0
    assert [lr(2101), lr(2550), lr(2999)] == pytest.approx([899 / 900, 0.5, 1 / 900])
    assert lr(3000) == lr(5000) == 0.0
    assert [lr(s, warmup=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]  # warmup as get_lr's
    assert lr(2999, min_lr=0.1) == pytest.approx(0.1 + 0.9 / 900) and lr(3000, min_lr=0.1) == 0.1
    assert cooldown_steps(10, 0.01) == 1 and cooldown_steps(594, 0.3) == 178
    assert [muon_momentum(s, 0.85, 0.95, 500) for s in (0, 250, 500, 1000)] == pytest.approx([0.85, 0.9, 0.95, 0.95])
    assert muon_momentum(0, 0.85, 0.95, 0) == 0.95


def test_lr_and_momentum_per_step(shards, tmp_path):
    steps = 8  # warmup 2 (tiny_args), constant, cooldown over the last 4 (--cooldown-frac 0.5); momentum over 4
    history = run(tiny_args(shards, tmp_path / "r", *MODERN, *KELLER, "--warmup-steps", "2", "--muon-lr", "0.04",
                            "--min-lr-ratio", "0", "--checkpoint-interval", "5", steps=steps))  # the records' Muon
    want = lambda peak, s: get_wsd_lr(s, peak, 0.0, 2, steps, 4)
    assert history["lr"] == {s: want(0.04, s) for s in range(steps)}  # the logged lr: Muon's group
    assert list(history["lr"].values())[:6] == pytest.approx([0.02, 0.04, 0.04, 0.04, 0.04, 0.03])
    assert history["momentum"] == pytest.approx({s: 0.85 + 0.1 * min(s / 4, 1) for s in range(steps)})
    assert log_values(tmp_path / "r", "momentum") == pytest.approx(history["momentum"], abs=1e-4)  # log.txt's .4f
    ckpt = checkpoint_tensors(tmp_path / "r" / "model_00005.pt")  # each group's lr at step 5, from its own peak
    peaks = dict(embed=0.01, value_embed=0.005, head=0.01, x0=0.01, resid=0.0001, gate=0.2)  # nanochat's groups
    assert {g["name"]: g["lr"] for g in ckpt["optimizer"]["param_groups"]} == {
        g["name"]: want(peaks[g["name"]], 5) for g in ckpt["optimizer"]["param_groups"]}
    assert ckpt["muon"]["param_groups"][0]["lr"] == want(0.04, 5) == pytest.approx(0.03)
    assert ckpt["muon"]["param_groups"][0]["momentum"] == 0.95


# -----------------------------------------------------------------------------
# resume, DDP, FSDP, fp16, the spike guard


def test_modern_resume_equals_uninterrupted_bitwise(shards, tmp_path):
    args = lambda d, *x: tiny_args(shards, d, *MODERN, "--checkpoint-interval", "100", "--shuffle", *x, steps=8)
    run(args(tmp_path / "straight"))
    run(args(tmp_path / "split", "--stop-after-step", "3"))
    history = run(args(tmp_path / "split", "--resume"))
    assert min(history["train"]) == 4
    assert_same_run(tmp_path / "straight", tmp_path / "split")  # weights, AdamW's state, train and val lines
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert a["muon"]["state"].keys() == b["muon"]["state"].keys() and len(a["muon"]["state"]) > 0
    for i, state in a["muon"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["muon"]["state"][i]["momentum_buffer"]), i
    assert a["muon"]["param_groups"] == b["muon"]["param_groups"]
    for name in ("lr", "momentum", "norm"):
        assert log_values(tmp_path / "straight", name) == log_values(tmp_path / "split", name), name


def test_ddp_two_ranks_with_muon_equal_one_process_accumulating(shards, tmp_path):
    args = lambda d: tiny_args(shards, d, *MODERN, "--eval-interval", "0", B=2, total=64, steps=4)
    torchrun(args(tmp_path / "ddp"), port=29741, rank_logs=tmp_path / "ranks")
    run(args(tmp_path / "single"))  # one process: 2 micro-batches of accumulation
    ddp, single = (checkpoint_tensors(tmp_path / d / "model_00003.pt") for d in ("ddp", "single"))
    assert ddp["world_size"] == 2 and single["world_size"] == 1 and ddp["muon"] is not None
    # the bounds of AdamW's DDP test (the ranks add gradients in another order); measured here: equal, bitwise
    assert log_values(tmp_path / "ddp", "train") == pytest.approx(log_values(tmp_path / "single", "train"), rel=1e-5)
    assert_same_parameters(ddp["model"], single["model"])


def test_fsdp_with_muon_is_refused_on_every_rank_before_step_0(shards, tmp_path):
    out = torchrun(tiny_args(shards, tmp_path / "r", "--recipe", "modern", "--shard", "fsdp"), port=29742,
                   rank_logs=tmp_path / "ranks", check=False)
    assert out.returncode != 0
    for r in (0, 1):
        last = rank_stderr(tmp_path / "ranks", r).strip().splitlines()[-1]
        assert last == ("train_gpt2.py: error: --optimizer muon with --shard fsdp: torch.optim.Muon cannot step "
                        "sharded (DTensor) parameters, and each matrix must be orthogonalised whole: use --shard ddp")
    assert not (tmp_path / "r").exists()


def test_float16_overflow_skips_both_optimizers(shards, tmp_path):
    from test_fsdp import overflow_at

    seen = []
    history = run(tiny_args(shards, tmp_path / "r", *MODERN, "--dtype", "float16"), on_step=overflow_at(1, seen))
    assert history["skipped"] == {1: 32768.0}
    for name, w in seen[0].items():  # Muon's matrices and AdamW's parameters alike
        assert torch.equal(seen[1][name], w), f"{name} changed in the skipped step"
    # the next step is applied, by both (c_proj: c_fc's gradient is still 0 behind the zero-initialised c_proj and
    # lm_head, whose step 0 was the only one before)
    for name in ("transformer.h.0.mlp.c_proj.weight", "transformer.wte.weight"):
        assert not torch.equal(seen[2][name], seen[1][name]), name


def test_a_spike_rewind_restores_muon_too(tmp_path):
    """The guarded run rewound at its spike (data step 8) to checkpoint 6 equals, bitwise, an unguarded run resumed
    from that checkpoint with its loader moved past the spike: both optimizers restored exactly."""
    data = spiky_shards(tmp_path / "shards", garbage_steps=[8])
    args = lambda d, *x: tiny_args(data, d, *MODERN, "--checkpoint-interval", "3", *x, steps=12)
    # 3 deviations, not the default 8: the modern recipe's losses fall fast, so the window's spread is wide
    run(args(tmp_path / "on", *GUARD, "--spike-threshold", "3"))
    assert log_values(tmp_path / "on", "spike").keys() == {8}
    run(args(tmp_path / "r", "--stop-after-step", "6"))
    path = tmp_path / "r" / "model_00006.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["loader"]["group_pos"] = 2 * 9
    torch.save(ckpt, path)
    run(args(tmp_path / "r", "--resume"))
    a, b = final_state(tmp_path / "r"), final_state(tmp_path / "on")
    for name, w in b["model"].items():
        assert torch.equal(a["model"][name], w), name
    for i, state in b["muon"]["state"].items():
        assert torch.equal(a["muon"]["state"][i]["momentum_buffer"], state["momentum_buffer"]), i


# -----------------------------------------------------------------------------
# --target-val-loss


def first_new_low(val: dict, after: int) -> tuple[int, float]:
    """The first evaluation past step `after` whose loss is below every one before it, and a target between the
    two: the evaluation a --target-val-loss of that target stops at."""
    s = next(s for s in sorted(val) if s > after and val[s] < min(v for t, v in val.items() if t < s))
    return s, (val[s] + min(v for t, v in val.items() if t < s)) / 2


def test_target_val_loss_stops_at_the_first_evaluation_below_it(shards, tmp_path, capsys):
    """The tokens from step 0, the time of steps 10..s-1 (as the records time them: a process's first 10 steps
    compile and warm up)."""
    args = lambda d, *x: tiny_args(shards, d, "--eval-interval", "2", *x, steps=20)
    val = run(args(tmp_path / "full"))["val"]
    s, target = first_new_low(val, after=10)
    capsys.readouterr()
    history = run(args(tmp_path / "r", "--target-val-loss", f"{target:.6f}"))
    out = capsys.readouterr().out
    assert sorted(history["train"]) == list(range(s)) and sorted(history["val"]) == list(range(0, s + 1, 2))
    assert history["target_tokens"] == {s: s * 64}  # s steps of 64 tokens
    timed = sum(dt for step, dt in history["dt"].items() if step >= 10)
    assert timed > 0 and history["target_time"][s] == pytest.approx(timed, rel=1e-12)
    assert history["checkpoints"][-1] == str(tmp_path / "r" / f"model_{s - 1:05d}.pt")  # the weights it measured
    ckpt = checkpoint_tensors(tmp_path / "r" / f"model_{s - 1:05d}.pt")
    assert ckpt["val_loss"] == history["val"][s] and ckpt["train_time"] == history["target_time"][s]
    log = (tmp_path / "r" / "log.txt").read_text()
    assert f"{s} target_tokens {s * 64}\n" in log and re.search(rf"^{s} target_time \d+\.\d{{3}}$", log, re.M)
    given = re.escape(str(float(f"{target:.6f}")))
    assert re.search(rf"^--target-val-loss {given} reached: val loss {val[s]:.4f} after {s} steps, {s * 64} tokens, "
                     rf"\d+s of training \(the time of steps 10\.\.{s - 1}, each process's first 10 left out: "
                     rf"compilation, warm-up\); stopped \(saved {re.escape(str(tmp_path))}/r/model_{s - 1:05d}.pt; "
                     r"to go on: --resume --target-val-loss 0\)$", out, re.M), out


def test_target_val_loss_counts_the_training_time_across_a_resume(shards, tmp_path):
    """Steps 0..11, then a resume from 12: the timed steps are 10, 11 of the first process and 22.. of the second."""
    args = lambda *x: tiny_args(shards, tmp_path / "r", "--eval-interval", "2", "--checkpoint-interval", "100", *x,
                                steps=30)
    first = run(args("--stop-after-step", "11"))
    first_timed = first["dt"][10] + first["dt"][11]
    assert checkpoint_tensors(tmp_path / "r" / "model_00011.pt")["train_time"] == pytest.approx(first_timed, rel=1e-12)
    s, target = first_new_low(run(tiny_args(shards, tmp_path / "full", "--eval-interval", "2", steps=30))["val"], 22)
    second = run(args("--resume", "--target-val-loss", f"{target:.6f}"))
    assert sorted(second["target_time"]) == [s]
    spent = first_timed + sum(dt for step, dt in second["dt"].items() if step >= 22)
    assert second["target_time"][s] == pytest.approx(spent, rel=1e-12)


# -----------------------------------------------------------------------------
# bad combinations: one line, exit status 2, before step 0, nothing written


def test_bad_combinations_are_one_line_errors_before_step_0(shards, tmp_path, capsys):
    r = tmp_path / "r"
    base = lambda *x: tiny_args(shards, r, *x)
    cases = {
        ("--optimizer", "muon", "--no-split-qkv"): "--optimizer muon orthogonalises q, k and v one by one: drop "
                                                   "--no-split-qkv",
        ("--recipe", "modern", "--no-split-qkv"): "--optimizer muon orthogonalises q, k and v one by one: drop "
                                                  "--no-split-qkv",
        ("--muon-lr", "0.05"): "--muon-lr applies to --optimizer muon, which this run does not use: drop it, or add "
                               "--optimizer muon",
        ("--recipe", "modern", "--optimizer", "adamw", "--embed-lr", "0.1"): "--embed-lr applies to --optimizer muon",
        ("--cooldown-frac", "0.2"): "--cooldown-frac applies to --schedule wsd",
        ("--schedule", "wsd", "--cooldown-frac", "0"): "--cooldown-frac 0.0: give the fraction of steps that cool "
                                                       "down, in (0, 1]",
        ("--target-val-loss", "3", "--eval-interval", "0"): "--target-val-loss 3.0: give a loss > 0 (0: none), with "
                                                           "an --eval-interval > 0 to measure it",
        ("--recipe", "modern", "--muon-momentum", "1.5"): (
            "--muon-momentum, --muon-momentum-start and --muon-momentum-end take a momentum"),
        ("--init-from", "gpt2", "--recipe", "modern"): "--init-from gpt2: the architecture comes from its weights, so "
                                                       "--pos-emb rope --rope-base 100000.0 --norm rmsnorm --qk-norm "
                                                       "--mlp relu2 --no-bias --split-qkv --no-tie-embeddings "
                                                       "--zero-init-proj --logit-softcap 15.0 --qk-gain 1.2 "
                                                       "--value-embeds --layer-scalars --smear --backout --init "
                                                       "nanochat (--recipe modern sets them) cannot apply",
        ("--init-from", "gpt2", "--qk-norm"): "--init-from gpt2: the architecture comes from its weights, so "
                                              "--qk-norm cannot apply: drop them, or train from scratch",
    }
    for extra, want in cases.items():
        assert cli_error(base(*extra), capsys).startswith(want), extra
        assert not r.exists(), extra
    # a model whose q, k and v are one matrix (GPT-2's c_attn), fine-tuned with Muon
    model = tiny_model()
    save_checkpoint(tmp_path / "gpt2like.pt", model_entries(model))
    err = cli_error(base("--init-from", str(tmp_path / "gpt2like.pt"), "--optimizer", "muon", "--block-size", "16"),
                    capsys)
    assert err == (f"--optimizer muon orthogonalises q, k and v one by one: --init-from {tmp_path / 'gpt2like.pt'} "
                   "has GPT-2's joint c_attn matrix (fine-tune it with --optimizer adamw)")
    assert not r.exists()


def test_resume_with_another_recipe_is_an_error(shards, tmp_path, capsys):
    run(tiny_args(shards, tmp_path / "r", *MODERN, steps=2))
    err = cli_error(tiny_args(shards, tmp_path / "r", "--resume", steps=4), capsys)
    assert err == ("--resume: the checkpoint's run had --optimizer muon, this run adamw: pass the flags (or --recipe) "
                   "of the run that wrote it")
    err = cli_error(tiny_args(shards, tmp_path / "r", "--resume", "--optimizer", "muon", steps=4), capsys)
    assert err == ("--resume: the checkpoint's run had --muon-variant nanochat, this run --muon-variant keller: pass "
                   "the flags (or --recipe) of the run that wrote it")  # its state: momentum and second moments
    err = cli_error(tiny_args(shards, tmp_path / "r", *MODERN, "--adamw-groups", "shared", "--resume", steps=4), capsys)
    assert err.startswith("--resume: the checkpoint's run had --adamw-groups nanochat, this run --adamw-groups shared")
    same_optimizer = ["--optimizer", "muon", "--muon-variant", "nanochat", "--adamw-groups", "nanochat",
                      "--lr-width-scale"]
    err = cli_error(tiny_args(shards, tmp_path / "r", "--resume", *same_optimizer, steps=4), capsys)
    assert err.startswith("--resume: the checkpoint is another model shape (") and "pos_emb: checkpoint rope vs " \
        "this run learned" in err
    run(tiny_args(shards, tmp_path / "r", *MODERN, "--resume", steps=4))  # the same flags: it goes on


# -----------------------------------------------------------------------------
# plan and MFU


def plan_parts(capsys, *flags: str) -> dict[str, float]:
    tg.main(["plan", "--gpus", "8", *flags])
    out = capsys.readouterr().out
    return {m[1].strip(): float(m[2]) for m in re.finditer(r"^  (.+?) +([\d.]+) GiB", out, re.M)}


def test_plan_counts_muons_one_buffer_and_adamws_two(capsys):
    cfg = tg.parse_train_args(["--preset", "speedrun"])
    c = cfg.model_config()
    P, matrices = c.num_parameters(), c.n_layer * 12 * c.n_embd ** 2  # q, k, v, proj, fc, mlp proj: 12 C^2 a block
    muon = plan_parts(capsys, "--preset", "speedrun")
    adamw = plan_parts(capsys, "--preset", "speedrun", "--optimizer", "adamw")
    assert adamw["AdamW state (fp32 m, v)"] == round(8 * P / 2**30, 2)
    state = {k: v for k, v in muon.items() if k.startswith(("Muon", "AdamW"))}
    assert state["Muon momentum (fp32): block matrices"] == round(4 * matrices / 2**30, 2)
    assert sum(state.values()) == pytest.approx((4 * matrices + 8 * (P - matrices)) / 2**30, abs=0.02)
    assert {k.split(": ")[-1] for k in state} <= {"block matrices", "embed", "head", "scalar"}
    assert muon["total"] == pytest.approx(adamw["total"] - 4 * matrices / 2**30, abs=0.03)  # one buffer instead of two
    with pytest.raises(SystemExit):
        tg.main(["plan", "--preset", "speedrun", "--shard", "fsdp"])
    assert "--optimizer muon with --shard fsdp" in capsys.readouterr().err


def test_mfu_counts_an_untied_embedding_as_a_lookup():
    tied, untied = gpt2.GPTConfig(vocab_size=50304), gpt2.GPTConfig(vocab_size=50304, tie_embeddings=False)
    L, C, T, V = 12, 768, 1024, 50304
    assert flops_per_token(tied, T) == 6 * tied.num_parameters() + 6 * L * C * T == 803_478_528  # as before
    assert flops_per_token(untied, T) == 6 * (untied.num_parameters() - V * C) + 6 * L * C * T
    small = dict(block_size=32, vocab_size=512, n_layer=2, n_head=2, n_embd=32)
    tied, untied = gpt2.GPTConfig(**small), gpt2.GPTConfig(**small, tie_embeddings=False)
    model = gpt2.GPT(untied)
    if model.lm_head.weight is model.transformer.wte.weight:
        pytest.skip("this model does not untie lm_head yet (the model branch's GPT does)")
    # the head is the same matmul tied or not, and wte's lookup costs no FLOPs: the same count
    assert untied.num_parameters() == sum(p.numel() for p in model.parameters())
    assert flops_per_token(untied, 32) == flops_per_token(tied, 32)


@pytest.mark.parametrize("variant", [[], KELLER])
def test_muon_state_is_counted_on_the_model_the_run_builds(variant):
    cfg = tg.parse_train_args(["--recipe", "modern", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", *variant])
    model = gpt2.GPT(cfg.model_config())
    groups = muon_groups(model)
    bytes_ = optimizer_state_bytes(cfg, 1)
    assert bytes_["Muon momentum (fp32): block matrices"] == 4 * sum(p.numel() for p in groups["muon"])
    for k in groups.keys() - {"muon"}:
        assert bytes_[f"AdamW state (fp32 m, v): {k}"] == 8 * sum(p.numel() for p in groups[k]), k
    # what the optimizers hold after a step, every buffer of their state
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizers = tg.configure_optimizers(model, cfg, "cpu")
    for o in optimizers:
        o.step()
    held = sum(t.numel() * t.element_size() for o in optimizers for s in o.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)
    assert sum(bytes_.values()) == held
