"""The GPT-2 ladder: the presets as in the table of llm.c's runs, `train_gpt2.py plan` (its numbers worked by hand
for 124M, its activation count against what autograd really saves) and fineweb.py's dataset presets."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from test_train import REPO, run, write_shards

import fineweb
import gpt2
import train_gpt2 as tg
from support.data import DATA_DIR, dataset_dir
from support.planner import block_activation_bytes, option_activation_bytes, saved_activation_bytes

# -----------------------------------------------------------------------------
# presets

LADDER = {  # preset: (layers, heads, width, tokens a step, micro-batch, max lr, warmup, final lr ratio, steps, data)
    "gpt2": (12, 12, 768, 524288, 64, 6e-4, 715, 0.1, 19073, "edu_fineweb10B"),
    "gpt2-medium": (24, 16, 1024, 524288, 64, 3e-4, 700, 0.0, 60000, "fineweb100B"),
    "gpt2-large": (36, 20, 1280, 524288, 32, 2.5e-4, 700, 0.0, 286102, "fineweb100B"),
    "gpt2-xl": (48, 25, 1600, 1048576, 16, 6e-4, 700, 0.1, 32000, "edu_fineweb100B"),
}


@pytest.mark.parametrize("preset", LADDER)
def test_preset_is_the_table_and_starts_on_cpu(preset, tmp_path):
    cfg = tg.parse_train_args(["--preset", preset])
    got = (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.total_batch_size, cfg.micro_batch_size, cfg.max_lr,
           cfg.warmup_steps, cfg.min_lr_ratio, cfg.max_steps, dataset_dir(LADDER[preset][-1]))
    assert got == (*LADDER[preset][:-1], dataset_dir(LADDER[preset][-1])) and str(got[-1]) == cfg.data
    assert (cfg.seq_len, cfg.vocab_size, cfg.weight_decay, cfg.grad_clip, cfg.eval_interval) == (1024, 50304, 0.1,
                                                                                                 1.0, 250)
    # tiny shape and batch, the preset's schedule: two steps, then stop
    tiny = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--seq-len", "16",
            "--micro-batch-size", "2", "--total-batch-size", "32", "--no-hellaswag", "--num-samples", "0",
            "--device", "cpu", "--no-compile", "--stop-after-step", "1", "--eval-interval", "0"]
    history = run(["--preset", preset, "--data", str(write_shards(tmp_path / "shards", 1)), "--log-dir",
                   str(tmp_path / "log"), *tiny])
    max_lr, warmup = LADDER[preset][5], LADDER[preset][6]
    assert history["lr"] == pytest.approx({0: max_lr / warmup, 1: 2 * max_lr / warmup}, rel=1e-12)


@pytest.mark.parametrize("preset", ["gpt2", "gpt2-medium", "gpt2-xl"])
def test_a_presets_missing_data_prints_the_command_that_builds_it(preset, tmp_path):
    want = {"gpt2": "`python fineweb.py`", "gpt2-medium": "`python fineweb.py --preset fineweb100B`",
            "gpt2-xl": "`python fineweb.py --preset edu_fineweb100B`"}[preset]
    if dataset_dir(LADDER[preset][-1]).exists():
        pytest.skip("the dataset is there")
    small = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--device", "cpu"]
    out = subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), "--preset", preset, "--log-dir",
                          str(tmp_path / "log"), *small], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and want in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_fineweb_presets():
    cfg = fineweb.parse_args(["--preset", "fineweb100B"])
    assert (cfg.dataset, cfg.name, cfg.prefix, cfg.out_dir) == ("HuggingFaceFW/fineweb", "sample-100BT", "fineweb",
                                                                 str(dataset_dir("fineweb100B")))
    cfg = fineweb.parse_args(["--preset", "edu_fineweb100B", "--out-dir", "elsewhere"])  # flags override
    assert (cfg.dataset, cfg.name, cfg.out_dir) == ("HuggingFaceFW/fineweb-edu", "sample-100BT", "elsewhere")
    assert fineweb.parse_args([]).out_dir == str(DATA_DIR)  # no preset: as before


# -----------------------------------------------------------------------------
# plan


def test_parameter_count_without_the_model():
    for c in [gpt2.GPTConfig(vocab_size=50304), gpt2.GPTConfig(32, 512, 3, 2, 64), gpt2.GPTConfig(64, 100, 1, 5, 80)]:
        assert c.num_parameters() == gpt2.GPT(c).num_parameters()


def saved_by_autograd(model, x, y, loss_chunk=0) -> int:
    """Bytes of the tensors autograd keeps for the backward pass (each storage once; the weights left out)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y, loss_chunk=loss_chunk)
    return sum(seen.values())


@pytest.mark.parametrize("shape", [(1, 64, 2, 512, 2, 32), (2, 128, 4, 2048, 4, 64), (4, 256, 4, 4096, 2, 128)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_is_what_autograd_saves(shape, checkpointing):
    # fp32 on the CPU. (CPU autocast keeps other tensors than CUDA's, so the bf16 count is not checked here.)
    L, C, nh, V, B, T = shape
    torch.manual_seed(0)
    model = gpt2.GPT(gpt2.GPTConfig(T, V, L, nh, C))
    model.activation_checkpointing = checkpointing
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    measured = saved_by_autograd(model, x, y)
    c, tokens = model.config, B * T
    block = block_activation_bytes(c, 4)  # with checkpointing, the recomputed block exists only in the backward
    estimate = saved_activation_bytes(c, tokens, 4, checkpointing) - (tokens * block if checkpointing else 0)
    estimate += tokens * V * 4  # the log-probabilities, the part of logits_bytes autograd keeps
    assert estimate == pytest.approx(measured, rel=0.15), (estimate, measured)


MODERN = dict(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", bias=False, split_qkv=True,
              tie_embeddings=False, zero_init_proj=True)


@pytest.mark.parametrize("option", [dict(value_embeds=True), dict(layer_scalars=True), dict(smear=True),
                                    dict(backout=True), dict(value_embeds=True, layer_scalars=True, smear=True,
                                                             backout=True, qk_gain=1.2, init="nanochat")])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_what_nanochats_options_keep_for_backward_is_counted(option, checkpointing):
    L, C, nh, V, B, T = 4, 128, 4, 2048, 4, 64
    measured = []
    for extra in ({}, option):
        torch.manual_seed(0)
        model = gpt2.GPT(gpt2.GPTConfig(T, V, L, nh, C, **MODERN, **extra))
        model.activation_checkpointing = checkpointing
        measured.append(saved_by_autograd(model, torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))))
    config = gpt2.GPTConfig(T, V, L, nh, C, **MODERN, **option)
    estimate = option_activation_bytes(config) * B * T  # the gates' few values a token are not counted
    assert estimate == pytest.approx(measured[1] - measured[0], rel=0.1)


def plan(*flags: str, capsys) -> str:
    tg.main(["plan", *flags])
    return capsys.readouterr().out


def gib(out: str, name: str) -> float:
    return float(re.search(rf"^  {re.escape(name)} +([\d.]+) GiB", out, re.M)[1])


def test_plan_124m_ddp_by_hand(capsys):
    out = plan("--preset", "gpt2", "--gpus", "8", "--gpu", "H100-80GB", capsys=capsys)
    # P = 50304*768 (wte = lm_head) + 1024*768 (wpe) + 12*(12*768^2 + 13*768) + 2*768 = 124,475,904
    assert ("124,475,904 parameters (12 layers, 12 heads, 768 wide) on 8 x H100-80GB (79.1 GiB usable) | --shard ddp"
            in out)
    assert "micro-batch 64 x 1024 tokens, gradient accumulation 1" in out  # 524,288 / (64 * 1024 * 8)
    # 4P = 497,903,616 bytes = 0.46 GiB each for the weights, gradients and DDP's buckets; AdamW 8P = 0.93 GiB;
    # autocast's bf16 copies 2P = 0.23 GiB
    names = ("weights (fp32)", "gradients (fp32)", "AdamW state (fp32 m, v)", "DDP's gradient buckets",
             "autocast's weight copies")
    assert [gib(out, n) for n in names] == [0.46, 0.46, 0.93, 0.46, 0.23]
    # 65,536 tokens x (12 blocks x (8*768 + 14*768*2 + 4*(4 + 12)) + 8*768) = 65,536 x 338,688 bytes = 20.67 GiB
    assert gib(out, "activations") == 20.67
    # 65,536 tokens x 50,304 x (4 log-probabilities + 2 bf16 logits + 4 their fp32 copy) bytes = 30.70 GiB
    assert gib(out, "logits and loss") == 30.70
    assert "total                                       55.43 GiB of 79.1: fits" in out  # what CUDA reports
    assert "largest micro-batch that fits: 64" in out
    assert "19,073 steps x 524,288 tokens = 10.0B tokens" in out
    # 0.4 * 989e12 * 8 / (6 * 124,475,904 + 6 * 12 * 768 * 1024) FLOPs a token = 3,938,873 tokens/s
    assert "at 3,938,873 tokens/s (assumed: 40% MFU" in out and "0.7 hours" in out


@pytest.mark.parametrize("preset,fits,largest,tokens", [
    ("gpt2-medium", "does NOT fit", 32, "31.5B"), ("gpt2-large", "does NOT fit", 16, "150.0B"),
    ("gpt2-xl", "does NOT fit", 8, "33.6B")])
def test_plan_every_preset(preset, fits, largest, tokens, capsys):
    out = plan("--preset", preset, capsys=capsys)
    assert f"GiB of 79.1: {fits}" in out and f"largest micro-batch that fits: {largest}\n" in out and tokens in out


def test_plan_sharding_and_checkpointing_lower_the_memory(capsys):
    total = lambda out: float(re.search(r"total +([\d.]+) GiB", out)[1])
    ddp = plan("--preset", "gpt2-xl", capsys=capsys)
    fsdp = plan("--preset", "gpt2-xl", "--shard", "fsdp", capsys=capsys)
    both = plan("--preset", "gpt2-xl", "--shard", "fsdp", "--activation-checkpointing", capsys=capsys)
    assert total(both) < total(fsdp) < total(ddp)
    sharded = plan("--preset", "gpt2-xl", "--shard", "fsdp", "--reduce-every-micro-step", capsys=capsys)
    assert "whole gradients between micro-steps" in fsdp and "whole gradients" not in sharded
    assert total(sharded) == pytest.approx(total(fsdp) - gib(fsdp, "whole gradients between micro-steps"), abs=0.01)
    assert gib(fsdp, "AdamW state (fp32 m, v)") == pytest.approx(gib(ddp, "AdamW state (fp32 m, v)") / 8, abs=0.01)
    assert "GiB of 79.1: fits" in fsdp


def test_plan_counts_what_cuda_reports_a_gpu_holds(capsys):
    """79.1 GiB of an H100's 80 and 139.8 of an H200's 141 (torch.cuda.get_device_properties' total_memory): a plan
    that fits 80 GiB but not 79.1 does not fit; --gpu-memory overrides."""
    from support.planner import GPU_MEMORY_GIB, usable_gib

    assert (usable_gib("H100-80GB"), usable_gib("H200")) == (79.1, 139.8)
    assert all(usable_gib(gpu) < sold for gpu, sold in GPU_MEMORY_GIB.items())
    out = plan("--preset", "gpt2", "--gpu", "H200", capsys=capsys)
    assert "on 8 x H200 (139.8 GiB usable)" in out and "GiB of 139.8: fits" in out
    assert "(79.5 GiB usable)" in plan("--preset", "gpt2", "--gpu-memory", "79.5", capsys=capsys)


def test_fsdp_warns_where_the_eager_logits_would_not_fit():
    """Under --shard fsdp the output layer runs eagerly: all of a micro-batch's logits at once (planner's count)."""
    from support.planner import logits_warning

    c = gpt2.GPTConfig(vocab_size=50304)
    warning = logits_warning(c, 64 * 1024, 2, 79.1 * 2**30)  # GPT-2's micro-batch 64 in bf16: 30.7 GiB of 79.1
    assert warning and "65,536 tokens of logits take 30.7 GiB of this GPU's 79.1; --loss-chunk 8192" in warning
    assert logits_warning(c, 8 * 1024, 2, 79.1 * 2**30) is None  # 3.8 GiB


def test_plan_errors_and_measured_speed(capsys):
    out = plan("--gpus", "4", "--tokens-per-sec", "1000000", "--price", "3", capsys=capsys)
    assert "at 1,000,000 tokens/s (measured (--tokens-per-sec))" in out and "$" in out
    out = plan("--gpu", "RTX-4090", "--gpus", "1", "--micro-batch-size", "8", capsys=capsys)
    assert "pass --tokens-per-sec (no peak FLOP/s known for RTX-4090)" in out
    with pytest.raises(SystemExit):
        plan("--gpus", "3", capsys=capsys)
    assert "x 3 ranks = 196608: change one of them" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # as training refuses it
        plan("--shard", "fsdp", "--gpus", "1", capsys=capsys)
    assert "--shard fsdp splits the model over ranks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plan("--mfu", "1.5", capsys=capsys)
    assert "--mfu a fraction in (0, 1]" in capsys.readouterr().err
