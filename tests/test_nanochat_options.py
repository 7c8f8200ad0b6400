"""nanochat's model and optimizer options (gpt2.ModelOptions: --value-embeds, --layer-scalars, --smear, --backout,
--qk-gain, --init nanochat; support/modern_optim.py: --muon-variant nanochat, --adamw-groups nanochat,
--lr-width-scale, --muon-momentum-end, --muon-weight-decay-schedule cosine). Each against a reference written here
from nanochat's definitions; the KV cache and eval_suite's shared prefix at the smear's positions; training with
every option on: resume bitwise, 2 ranks = 1 process, FSDP; bad combinations refused before step 0; the exports.
CPU, fp32, tiny models."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from test_modern_model import MODERN, randomised, reference_logits, tokens
from test_recipe import cli_error, log_values
from test_train import (
    REPO,
    assert_same_parameters,
    assert_same_run,
    checkpoint_tensors,
    final_state,
    run,
    tiny_args,
    torchrun,
    write_shards,
)

import eval_suite as es
import gpt2
import hellaswag as hs
import train_gpt2 as tg
from gpt2 import GPT, GPTConfig, KVCache
from support import modern_optim
from support.checkpoints import model_entries, save_checkpoint
from support.hf import load_model
from support.metrics import flops_per_token

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NANOCHAT = dict(value_embeds=True, layer_scalars=True, smear=True, backout=True, qk_gain=1.2)
EVERYTHING = {**MODERN, **NANOCHAT, "rope_base": 100000.0, "init": "nanochat"}  # nanochat's model, as far as ours goes
NANOCHAT_FLAGS = ["--value-embeds", "--layer-scalars", "--smear", "--backout", "--qk-gain", "1.2", "--init", "nanochat",
                  "--rope-base", "100000"]
NANOCHAT_OPTIMIZER = ["--muon-variant", "nanochat", "--adamw-groups", "nanochat", "--lr-width-scale",
                      "--muon-weight-decay", "0.5", "--muon-weight-decay-schedule", "cosine", "--muon-momentum-end",
                      "0.9", "--muon-momentum-warmup", "2", "--cooldown-frac", "0.5", "--gate-lr", "0.05"]
SMALL_LRS = ["--embed-lr", "1e-2", "--head-lr", "1e-2", "--scalar-lr", "1e-2"]  # tiny_args's lr for AdamW's groups


def config(**options) -> GPTConfig:
    """Wide enough for the smear's 24 channels; 3 layers: value embeddings on 0 and 2, the backout after 1."""
    return GPTConfig(**{"block_size": 32, "vocab_size": 100, "n_layer": 3, "n_head": 2, "n_embd": 32, **options})


# -----------------------------------------------------------------------------
# The model: each option against the reference (test_modern_model.reference_logits, written from nanochat's gpt.py)


@pytest.mark.parametrize("options", [
    dict(value_embeds=True), dict(value_embeds=True, n_layer=4), dict(layer_scalars=True), dict(smear=True),
    dict(backout=True), dict(backout=True, n_layer=4), dict(qk_norm=True, qk_gain=1.2), dict(init="nanochat",
                                                                                            tie_embeddings=False),
    {**NANOCHAT, "qk_norm": True}, EVERYTHING, {**EVERYTHING, "n_layer": 4},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_each_option_equals_the_reference(options):
    model = randomised(config(**options))
    idx = tokens()
    with torch.no_grad():
        logits, _ = model(idx)
    # fp32 against float64: rounding, up to ~2e-5 with every option's gains on; a wrong term is off by ~0.1
    torch.testing.assert_close(logits.double(), reference_logits(model, idx), rtol=0, atol=5e-5)


def test_the_options_parameters_carry_nanochats_names_and_layers():
    for L in (3, 4):
        model = GPT(config(n_layer=L, **NANOCHAT, qk_norm=True))
        names = dict(model.named_parameters())
        ve_layers = [i for i in range(L) if i % 2 == (L - 1) % 2]  # nanochat's has_ve: alternate, the last included
        assert sorted(k for k in names if k.startswith("value_embeds.")) == [f"value_embeds.{i}.weight"
                                                                             for i in ve_layers]
        assert [i for i in range(L) if f"transformer.h.{i}.attn.ve_gate.weight" in names] == ve_layers
        first = ve_layers[0]
        assert names[f"transformer.h.{first}.attn.ve_gate.weight"].shape == (2, 12)  # (heads, 12 channels)
        assert names[f"value_embeds.{first}.weight"].shape == (100, 32)
        for name, shape in (("resid_lambdas", (L,)), ("x0_lambdas", (L,)), ("smear_gate.weight", (1, 24)),
                            ("smear_lambda", (1,)), ("backout_lambda", (1,))):
            assert names[name].shape == shape, name
    assert set(GPT(config()).state_dict()) == set(GPT(config(qk_norm=True, qk_gain=1.5)).state_dict())


def test_the_options_start_as_nanochats_init_weights():
    torch.manual_seed(0)
    C = 64
    model = GPT(GPTConfig(block_size=32, vocab_size=4096, n_layer=4, n_head=4, n_embd=C, **EVERYTHING))
    s = math.sqrt(3 / C)  # uniform(-s, s) has normal(1/sqrt(C))'s std
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.8, rel=0.02)
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.02)
    for block in model.transformer.h:
        for w, bound in ((block.attn.c_q.weight, s), (block.attn.c_v.weight, s), (block.mlp.c_fc.weight, 0.4 * s)):
            assert w.abs().max().item() <= bound and w.abs().max().item() > 0.98 * bound
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    for table in model.value_embeds.values():
        assert table.weight.abs().max().item() <= s
        assert table.weight.std().item() == pytest.approx(1 / C ** 0.5, rel=0.05)
    gates = [b.attn.ve_gate.weight for b in model.transformer.h if hasattr(b.attn, "ve_gate")]
    for gate in [model.smear_gate.weight, *gates]:
        assert gate.min().item() >= 0 and gate.max().item() < 0.02
    torch.testing.assert_close(model.resid_lambdas.data, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    torch.testing.assert_close(model.x0_lambdas.data, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    assert model.smear_lambda.item() == 0 and model.backout_lambda.item() == pytest.approx(0.2)
    # under GPT-2's initialisation the options' own values are the same; the default model is untouched (its
    # random draws included: test_model.py's GPT-2 checks)
    plain = GPT(config(**NANOCHAT, qk_norm=True))
    assert plain.backout_lambda.item() == pytest.approx(0.2) and plain.x0_lambdas[0].item() == pytest.approx(0.2)


def test_parameter_counts_and_flops_leave_the_lookups_out():
    for options in ({}, dict(value_embeds=True), dict(layer_scalars=True), dict(smear=True), dict(backout=True),
                    EVERYTHING, {**EVERYTHING, "n_layer": 4}, dict(value_embeds=True, tie_embeddings=False)):
        c = config(**options)
        assert c.num_parameters() == GPT(c).num_parameters(), options
    c, plain = config(value_embeds=True), config()
    assert c.lookup_parameters() == 2 * 100 * 32 and plain.lookup_parameters() == 0  # layers 0 and 2
    # the tables are looked up, not multiplied: the FLOPs grow by the gates' matmuls alone
    assert flops_per_token(c, 16) - flops_per_token(plain, 16) == 6 * 2 * 12 * 2


def test_bad_options_are_one_line_errors():
    cases = [(dict(qk_gain=1.2), "--qk-gain 1.2 scales the normalised q and k: give a gain > 0, with --qk-norm"),
             (dict(init="nanochat"), "--init nanochat gives wte (std 0.8) and lm_head (std 0.001) scales of their own: "
                                     "add --no-tie-embeddings"),
             (dict(smear=True, n_embd=16), "--value-embeds' gates read 12 channels, --smear's 24: n_embd=16 is too "
                                           "narrow"),
             (dict(init="xavier"), "--init xavier: use one of gpt2, nanochat")]
    for options, want in cases:
        with pytest.raises(ValueError) as e:
            GPTConfig(**{"n_embd": 32, "n_head": 2, **options})
        assert str(e.value) == want


# -----------------------------------------------------------------------------
# The KV cache: the smear reads the position before the first new one from the cache


def test_kv_cache_equals_the_whole_forward_in_steps_and_chunks():
    model = randomised(config(**EVERYTHING, block_size=32))
    idx = tokens(T=20)
    with torch.no_grad():
        full, _ = model(idx)
        for cuts in ([1] * 20, [7, 1, 1, 5, 6], [20], [1, 19]):  # token by token, prefill then chunks
            cache, parts, at = KVCache(model.config, 2, 20, "cpu", torch.float32), [], 0
            for n in cuts:
                parts.append(model(idx[:, at:at + n], kv_cache=cache)[0])
                at += n
            # matmuls of other shapes round differently (~1e-5); a smear at a wrong position is off by ~0.1
            torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=5e-5, msg=str(cuts))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_sampling_equals_uncached(temperature):
    model = randomised(config(**EVERYTHING), std=0.5)
    idx = tokens(T=5)
    outs = [model.generate(idx, 12, temperature=temperature, top_k=20, use_cache=cached,
                           generator=torch.Generator().manual_seed(3)) for cached in (True, False)]
    assert torch.equal(*outs)


def test_eval_suites_shared_prefix_equals_the_plain_rows():
    """Rows that share a prefix, its keys and values (and the smear's last embedding) computed once."""
    model = randomised(config(**EVERYTHING), std=0.5)
    rows = [([5, 6, 7, 8, 9, 10, 11, 3, 4], 2), ([5, 6, 7, 8, 9, 10, 11, 40], 1), ([5, 6, 7, 8, 9, 10, 11, 9, 9, 9], 3)]
    tokens_, mask = es._pack(rows)
    want = es.score_rows(model, tokens_, mask, 100)
    got = es.score_sharing_prefix(model, rows, 6, 100)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
    assert torch.equal(got[1], want[1])


# -----------------------------------------------------------------------------
# nanochat's Muon and its schedules, against straight-line references


def reference_normuon(p, grad, buf, second, lr, momentum, wd, beta2):
    """One step of nanochat's Muon on one matrix, in fp32, as its muon_step_fused computes it (no stacking)."""
    buf = buf.lerp(grad, 1 - momentum)
    x = grad.lerp(buf, momentum)
    rows_norm = x.norm() / x.size(0) ** 0.5
    x = x * (rows_norm / x.norm(dim=1, keepdim=True))
    x = x / (x.norm() * 1.01 + 1e-6)
    for a, b, c in modern_optim.POLAR_EXPRESS:
        if x.size(0) > x.size(1):
            A = x.T @ x
            x = a * x + x @ (b * A + c * A @ A)
        else:
            A = x @ x.T
            x = a * x + (b * A + c * A @ A) @ x
    x = x * (min(x.shape) ** 0.5 / x.norm())
    red = 1 if x.size(0) >= x.size(1) else 0
    v = (x ** 2).mean(dim=red, keepdim=True)
    second = second.lerp(v, 1 - beta2)
    step = second.clamp_min(1e-10).rsqrt()
    before = (v.sum() * x.size(red)).sqrt()
    after = ((v * x.size(red)) * step ** 2).sum().sqrt()
    x = x * step * before / after
    lr = lr * max(1, x.size(0) / x.size(1)) ** 0.5
    return p - lr * x - lr * wd * p * ((x * p) >= 0), buf, second


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (20, 20)])
def test_normuon_steps_as_nanochats(shape):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = modern_optim.NorMuon([p], lr=0.02, momentum=0.9, weight_decay=0.3)
    want, buf = p.detach().clone(), torch.zeros(shape)
    second = torch.zeros(shape[0], 1) if shape[0] >= shape[1] else torch.zeros(1, shape[1])
    for _ in range(3):
        p.grad = torch.randn(shape)
        want, buf, second = reference_normuon(want, p.grad, buf, second, 0.02, 0.9, 0.3, 0.9)
        opt.step()
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)
    # and the update is close to orthogonal: its singular values within Polar Express's band
    u = modern_optim.polar_express(torch.randn(shape), torch.float32)
    sv = torch.linalg.svdvals(u)
    assert sv.min() > 0.6 and sv.max() < 1.3


def nanochat_momentum(it, num_iterations, warmdown_ratio, warmup=400):
    """nanochat's get_muon_momentum (base_train.py), for any warmup length."""
    warmdown = round(warmdown_ratio * num_iterations)
    start = num_iterations - warmdown
    if it < warmup:
        return (1 - it / warmup) * 0.85 + it / warmup * 0.97
    if it >= start:
        progress = (it - start) / warmdown
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


@pytest.mark.parametrize("steps,warmup,frac", [(1000, 400, 0.65), (594, 400, 0.65), (100, 10, 0.3)])
def test_momentum_and_weight_decay_schedules_are_nanochats(steps, warmup, frac):
    cfg = tg.TrainConfig(optimizer="muon", muon_momentum_start=0.85, muon_momentum=0.97, muon_momentum_end=0.90,
                         muon_momentum_warmup=warmup, max_steps=steps, cooldown_frac=frac, schedule="wsd",
                         muon_weight_decay=0.28, muon_weight_decay_schedule="cosine")
    p = torch.nn.Parameter(torch.zeros(4, 4))
    muon = modern_optim.NorMuon([{"params": [p], "name": "muon"}], lr=0.02, momentum=0.85)
    for it in range(steps):
        assert modern_optim.set_muon_step(muon, cfg, it) == pytest.approx(nanochat_momentum(it, steps, frac, warmup))
        assert muon.param_groups[0]["weight_decay"] == pytest.approx(0.28 * 0.5 * (1 + math.cos(math.pi * it / steps)))


def test_groups_lrs_betas_and_decays_are_nanochats():
    model = GPT(GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=2, n_embd=192, **EVERYTHING))
    groups = modern_optim.muon_groups(model)
    assert list(groups) == ["muon", "embed", "value_embed", "head", "x0", "resid", "gate"]
    assert sorted(p.shape for p in groups["gate"]) == [(1,), (1,), (1, 24)] and len(groups["value_embed"]) == 1
    assert sum(p.numel() for ps in groups.values() for p in ps) == model.num_parameters()
    assert any(p.shape == (2, 12) for p in groups["muon"])  # the value embedding's gate: a block's matrix
    cfg = tg.TrainConfig(optimizer="muon", adamw_groups="nanochat", lr_width_scale=True,
                         embed_lr=0.3, head_lr=0.008, scalar_lr=0.5, gate_lr=0.2, muon_variant="nanochat", eps=1e-10)
    adamw, muon = modern_optim.configure_muon(model, cfg, "cpu")
    width = (192 / 768) ** -0.5  # nanochat's dmodel_lr_scale: 2
    want = {"embed": (0.3 * width, (0.8, 0.995), 0.001), "value_embed": (0.15 * width, (0.8, 0.995), 0.01),
            "head": (0.008 * width, (0.8, 0.96), 0.01), "x0": (0.5, (0.96, 0.95), 0.0),
            "resid": (0.005, (0.8, 0.95), 0.05), "gate": (0.2, (0.8, 0.95), 0.0)}  # its setup_optimizer's groups
    got = {g["name"]: (modern_optim.base_lr(cfg, g), g["betas"], g["weight_decay"]) for g in adamw.param_groups}
    assert got.keys() == want.keys()
    for name, (lr, betas, decay) in want.items():
        assert got[name][0] == pytest.approx(lr) and got[name][1:] == (betas, decay), name
    assert isinstance(muon, modern_optim.NorMuon)
    shared = modern_optim.configure_muon(model, tg.TrainConfig(optimizer="muon", embed_lr=0.3,
                                                                weight_decay=0.1), "cpu")[0]
    assert {g["name"]: (g["betas"], g["weight_decay"]) for g in shared.param_groups}["value_embed"] == ((0.9, 0.95),
                                                                                                        0.1)


# -----------------------------------------------------------------------------
# Training with every option on: resume, DDP, FSDP, bad combinations, the commands that read such a model


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "shards")


def everything(shards, log_dir, *extra, **kw):
    return tiny_args(shards, log_dir, "--recipe", "modern", *NANOCHAT_FLAGS, *NANOCHAT_OPTIMIZER, *SMALL_LRS, *extra,
                     **kw)


def test_resume_with_every_option_equals_uninterrupted_bitwise(shards, tmp_path):
    args = lambda d, *x: everything(shards, d, "--checkpoint-interval", "100", "--shuffle", *x, steps=8)
    run(args(tmp_path / "straight"))
    run(args(tmp_path / "split", "--stop-after-step", "3"))
    assert min(run(args(tmp_path / "split", "--resume"))["train"]) == 4
    assert_same_run(tmp_path / "straight", tmp_path / "split")  # weights, AdamW's state, train and val lines
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert len(a["muon"]["state"]) > 0 and a["muon"]["param_groups"] == b["muon"]["param_groups"]
    for i, state in a["muon"]["state"].items():
        assert state.keys() == {"momentum_buffer", "second_moment"}
        for key, value in state.items():
            assert torch.equal(value, b["muon"]["state"][i][key]), (i, key)
    for name in ("lr", "momentum", "norm"):
        assert log_values(tmp_path / "straight", name) == log_values(tmp_path / "split", name), name
    assert "backout_lambda" in a["model"] and not torch.equal(a["model"]["smear_lambda"], torch.zeros(1))  # trained


def test_ddp_two_ranks_with_every_option_equal_one_process_accumulating(shards, tmp_path):
    args = lambda d: everything(shards, d, "--eval-interval", "0", B=2, total=64, steps=4)
    torchrun(args(tmp_path / "ddp"))
    run(args(tmp_path / "single"))  # one process: 2 micro-batches of accumulation
    ddp, single = (checkpoint_tensors(tmp_path / d / "model_00003.pt") for d in ("ddp", "single"))
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert log_values(tmp_path / "ddp", "train") == pytest.approx(log_values(tmp_path / "single", "train"), rel=1e-5)
    assert_same_parameters(ddp["model"], single["model"])


def test_fsdp_with_every_model_option_equals_ddp(shards, tmp_path):
    """FSDP shards AdamW runs (Muon is refused with it, test_recipe.py): the options' parameters at the root."""
    args = lambda d, shard: tiny_args(shards, d, *NANOCHAT_FLAGS, "--pos-emb", "rope", "--norm", "rmsnorm", "--qk-norm",
                                      "--no-tie-embeddings", "--eval-interval", "0", "--shard", shard, B=2, total=64,
                                      steps=4)
    torchrun(args(tmp_path / "fsdp", "fsdp"))
    torchrun(args(tmp_path / "ddp", "ddp"))
    fsdp, ddp = (checkpoint_tensors(tmp_path / d / "model_00003.pt") for d in ("fsdp", "ddp"))
    assert log_values(tmp_path / "fsdp", "train") == pytest.approx(log_values(tmp_path / "ddp", "train"), rel=1e-5)
    assert_same_parameters(fsdp["model"], ddp["model"])
    assert "value_embeds.1.weight" in fsdp["model"]


def test_bad_combinations_are_one_line_errors_before_step_0(shards, tmp_path, capsys):
    r = tmp_path / "r"
    cases = {
        ("--qk-gain", "1.2"): "--qk-gain 1.2 scales the normalised q and k: give a gain > 0, with --qk-norm",
        ("--init", "nanochat"): "--init nanochat gives wte (std 0.8) and lm_head (std 0.001) scales of their own: add "
                                "--no-tie-embeddings",
        ("--smear", "--n-embd", "16"): "--value-embeds' gates read 12 channels, --smear's 24: n_embd=16 is too narrow",
        ("--muon-variant", "nanochat"): "--muon-variant applies to --optimizer muon, which this run does not use",
        ("--recipe", "modern", "--muon-momentum-end", "1.2"): "--muon-momentum, --muon-momentum-start and "
                                                              "--muon-momentum-end take a momentum in [0, 1)",
    }
    for extra, want in cases.items():
        assert cli_error(tiny_args(shards, r, *extra), capsys).startswith(want), extra
        assert not r.exists(), extra
    run(everything(shards, tmp_path / "nc", steps=2))  # a NorMuon run, resumed with torch's Muon: refused
    err = cli_error(tiny_args(shards, tmp_path / "nc", "--recipe", "modern", *NANOCHAT_FLAGS, *SMALL_LRS, "--resume",
                              "--muon-variant", "keller", steps=4), capsys)
    assert err.startswith("--resume: the checkpoint's run had --muon-variant nanochat, this run --muon-variant keller")


def test_export_refuses_in_one_line_and_pt_reads_back_everywhere(tmp_path, capsys):
    model = randomised(GPTConfig(block_size=128, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, **EVERYTHING),
                       std=0.5)
    save_checkpoint(tmp_path / "model_00004.pt", model_entries(model))
    out = subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), "export", str(tmp_path / "model_00004.pt"),
                          str(tmp_path / "hf")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and not (tmp_path / "hf").exists()
    assert out.stderr == ("train_gpt2.py: error: cannot export a model with --value-embeds --layer-scalars --smear "
                          "--backout --qk-gain 1.2 as a Hugging Face folder: transformers' "
                          "NanoChatForCausalLM does not compute them; --format pt exports any model (our load_model "
                          "reads it)\n")
    out = subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), "export", "--format", "pt",
                          str(tmp_path / "model_00004.pt"), str(tmp_path / "plain.pt")], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert plain.keys() == {"model", "config"} and plain["config"]["smear"] is True
    back = load_model(str(tmp_path / "plain.pt"))
    idx = tokens(vocab_size=50257)
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])
    # HellaSwag batched (logits at the scored positions only) as unbatched, and the sample command, on it
    from test_hellaswag import EXAMPLES, totals, write_jsonl

    data = write_jsonl(tmp_path / "hellaswag_val.jsonl")
    assert hs.main(["-m", str(tmp_path / "plain.pt"), "--batch-size", "5", "-d", "cpu", "--data-file", str(data)]) == 0
    unbatched = hs.evaluate_unbatched(back, EXAMPLES, "cpu")
    assert totals(capsys.readouterr().out.strip().splitlines()) == (
        unbatched["num_total"], unbatched["num_correct"], unbatched["num_correct_norm"])
    sample = [sys.executable, str(REPO / "train_gpt2.py"), "sample", "-m", str(tmp_path / "plain.pt"), "--prompt",
              "ROMEO:", "--max-new-tokens", "10", "--device", "cpu"]
    cached, uncached = (subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
                        for cmd in (sample, sample + ["--no-cache"]))
    assert cached.returncode == 0 and cached.stdout == uncached.stdout and "ROMEO:" in cached.stdout


def test_plan_counts_the_options(capsys):
    tg.main(["plan", "--preset", "shakespeare", "--recipe", "modern", *NANOCHAT_FLAGS, "--gpus", "1"])
    text = capsys.readouterr().out
    c = gpt2.GPTConfig(n_layer=4, n_head=2, n_embd=32, block_size=128, vocab_size=50304, **EVERYTHING)
    assert f"{c.num_parameters():,} parameters" in text
