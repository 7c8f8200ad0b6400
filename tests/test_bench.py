"""The benchmark scripts, run small: they must keep working and keep checking what they compare.

These assert what each benchmark reports besides speed (the same tokens, the same predictions, shards
identical to the reference's); the speeds themselves are measured by running the scripts, not here.
"""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt2
import train_gpt2
from bench import (
    bench_core,
    bench_fineweb,
    bench_generate,
    bench_hellaswag,
    bench_loss_precision,
    bench_recipe,
    bench_train,
)
from support.checkpoints import save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_bench_hellaswag_breakdown(capsys):
    bench_hellaswag.main(["--layers", "1", "--width", "64", "-n", "6", "--repeats", "1", "--breakdown", "-d", "cpu"])
    out = capsys.readouterr().out
    assert "same predictions: acc 100%, acc_norm 100%" in out
    m = re.search(r"repeat 0: batched +([\d.]+) ex/s \(output layer alone ([\d.]+) s of ([\d.]+) s\)", out)
    # times only (reported, positive): the output layer is timed in a run of its own, so under load it can take
    # longer than the batched run it is compared with; speeds are the benchmark's to measure, not a test's
    assert m and float(m[2]) > 0 and float(m[3]) > 0, out
    assert re.search(r"were all else free, batched would be [\d.]+x the one-at-a-time loop", out), out


def tiny_checkpoint(tmp_path, n_layer: int = 2) -> str:
    """A random GPT with GPT-2's padded vocabulary, 32 wide, as one of our checkpoints: its path."""
    torch.manual_seed(0)
    model = gpt2.GPT(gpt2.GPTConfig(block_size=64, vocab_size=50304, n_layer=n_layer, n_head=2, n_embd=32))
    ckpt = tmp_path / "model_00001.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "config": dataclasses.asdict(model.config), "step": 1})
    return str(ckpt)


def test_bench_generate_same_tokens(tmp_path, capsys):
    bench_generate.main(["-m", tiny_checkpoint(tmp_path), "--device", "cpu", "--max-new-tokens", "12",
                         "--repeats", "1"])
    out = capsys.readouterr().out
    assert "same tokens both ways: yes" in out and re.search(r"speed-up: [\d.]+x", out), out


def test_bench_core_same_answers(tmp_path, capsys):
    bench_core.main(["-m", tiny_checkpoint(tmp_path, n_layer=1), "-d", "cpu", "-n", "12", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "same answers: yes" in out and re.search(r"^\| all \| 84 \| [\d.]+ \| [\d.]+ \| [\d.]+x \|$", out, re.M), out


def test_bench_loss_precision_small(capsys):
    bench_loss_precision.main(["--tokens", "128", "--n-embd", "16", "--chunk", "64"])
    rows = re.findall(r"^\| (float16|bfloat16) \| ([\d.]+)% \| ([\d.]+)% \|", capsys.readouterr().out, re.M)
    assert [r[0] for r in rows] == ["float16", "bfloat16"]
    assert all(float(chunked) <= 2 * float(full) for _, full, chunked in rows), rows


def test_bench_fineweb_small(tmp_path, capsys):
    bench_fineweb.main(["--size-mb", "0.3", "--repeats", "1", "--num-proc", "1", "--shard-size", "20000",
                        "--no-rss", "--work-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "reference-style shards identical to fineweb.py's: True" in out, out


TINY_TRAIN = ["--seq-len", "32", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
              "--vocab-size", "512", "--device", "cpu"]
ROW = (r"^\| (\d+) \| (on|off) \| (?:gpt2|modern) \| (-|\d+) \| (ddp|fsdp) \| (on|off) \| (\w+) \| ([\d.]+) \| "
       r"([\d.]+)x \| ([\d,]+) \| - \| ([\d., ]+) GiB \|$")


def test_bench_train_runs_the_training_loop(capsys):
    bench_train.main(["--micro-batch-sizes", "3", "--compile", "off", "--loss-chunks", "16,0", "--warmup", "1",
                      "--steps", "4", *TINY_TRAIN])  # 0 given last: still measured first, as the baseline
    out = capsys.readouterr().out
    rows = re.findall(ROW, out, re.M)
    assert [(int(r[0]), r[2]) for r in rows] == [(3, "-"), (3, "16")], out
    assert rows[0][7] == "1.00"  # the one-matmul row is the baseline
    assert all(0.1 < float(r[9]) < 8 for r in rows)  # each configuration's own process: its peak RSS
    for r in rows:  # tokens/s = B*T / (median ms/1000), also for an even number of steps
        assert int(r[8].replace(",", "")) == pytest.approx(int(r[0]) * 32 / (float(r[6]) / 1000), rel=0.01)


def test_bench_train_sweeps_sharding_checkpointing_and_dtype_over_ranks(capsys):
    bench_train.main(["--micro-batch-sizes", "2", "--compile", "off", "--shards", "ddp,fsdp",
                      "--activation-checkpointing", "on", "--dtypes", "float16", "--nproc", "2", "--warmup", "1",
                      "--steps", "2", *TINY_TRAIN])
    out = capsys.readouterr().out
    rows = re.findall(ROW, out, re.M)
    assert [(r[3], r[4], r[5]) for r in rows] == [("ddp", "on", "float16"), ("fsdp", "on", "float16")], out
    for r in rows:  # each rank's peak memory; tokens/s of both ranks together
        assert len(r[9].split(", ")) == 2
        assert int(r[8].replace(",", "")) == pytest.approx(2 * 2 * 32 / (float(r[6]) / 1000), rel=0.01)


def test_bench_train_sweeps_recipes(capsys):
    bench_train.main(["--micro-batch-sizes", "2", "--compile", "off", "--recipes", "gpt2,modern", "--warmup", "1",
                      "--steps", "2", *TINY_TRAIN])
    out = capsys.readouterr().out
    rows = re.findall(r"^\| 2 \| off \| (gpt2|modern) \| - \| ddp \| off \| auto \| [\d.]+ \| ([\d.]+)x \|", out, re.M)
    assert rows[0] == ("gpt2", "1.00") and [r[0] for r in rows] == ["gpt2", "modern"], out  # gpt2: the baseline


def test_bench_train_on_the_speedrun_preset(capsys):
    # the preset's recipe (modern) and its --target-val-loss, which needs evaluations the benchmark turns off
    bench_train.main(["--preset", "speedrun", "--micro-batch-sizes", "1", "--compile", "off", "--warmup", "1",
                      "--steps", "1", *TINY_TRAIN])
    assert re.search(r"^\| 1 \| off \| modern \| - \| ddp \|", capsys.readouterr().out, re.M)


def test_bench_train_refuses_fsdp_on_one_rank(capsys):
    with pytest.raises(SystemExit):
        bench_train.main(["--shards", "fsdp", *TINY_TRAIN])
    assert "--shards fsdp needs --nproc 2 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_train.main(["--recipes", "gpt2,fast", *TINY_TRAIN])
    assert "--recipes fast not understood" in capsys.readouterr().err


def test_bench_recipe_tokens_to_reach_interpolates_between_evaluations():
    run = {"val": {"0": 10.0, "4": 6.0, "8": 4.0}, "tokens_per_step": 100, "steps": 9}
    assert bench_recipe.tokens_to_reach(run, 6.0) == 400  # met at an evaluation: its tokens
    assert bench_recipe.tokens_to_reach(run, 5.0) == 600  # halfway from 6.0 (400 tokens) to 4.0 (800)
    assert bench_recipe.tokens_to_reach(run, 3.9) == float("inf")
    assert bench_recipe.last_val(run) == 4.0


def test_bench_recipe_ablation_flags_are_the_modern_recipes_values():
    # the quick start's modern twin has no softcap: the general value (nanochat's 15)
    assert bench_recipe.single_change_flags("+ softcap", "shakespeare") == ["--recipe", "gpt2", "--logit-softcap",
                                                                              "15.0"]
    assert bench_recipe.single_change_flags("+ value embeds", "shakespeare") == ["--recipe", "gpt2", "--value-embeds"]
    assert bench_recipe.single_change_flags("+ nanochat init", "shakespeare") == ["--recipe", "gpt2",
                                                                                   "--no-tie-embeddings", "--init",
                                                                                   "nanochat"]
    flags = bench_recipe.single_change_flags("+ muon", "shakespeare")
    cfg = train_gpt2.parse_train_args(["--preset", "shakespeare", *flags])
    modern = train_gpt2.parse_train_args(["--preset", "shakespeare", "--recipe", "modern"])
    assert cfg.optimizer == "muon" and cfg.muon_lr == modern.muon_lr and cfg.model.pos_emb == "learned"
    assert cfg.muon_momentum_warmup == modern.muon_momentum_warmup and cfg.max_lr == 3e-2  # AdamW: the preset's


def test_bench_recipe_nanochat_rows_are_base_train_pys_rules():
    base = train_gpt2.parse_train_args(["--preset", "shakespeare"])
    cfg = train_gpt2.parse_train_args(["--preset", "shakespeare", *bench_recipe.nanochat_flags(base, 1.0)])
    batch = (1024 / 2 ** 19) ** 0.5  # base_train.py's lrs x sqrt(B / 2**19), with B = 1,024 tokens a step
    assert (cfg.muon_lr, cfg.embed_lr, cfg.scalar_lr) == pytest.approx((0.02 * batch, 0.3 * batch, 0.5 * batch),
                                                                       rel=1e-3)
    assert cfg.model.logit_softcap == 15.0 and cfg.model.value_embeds and cfg.model.smear and cfg.model.backout
    assert (cfg.muon_variant, cfg.adamw_groups, cfg.warmup_steps, cfg.cooldown_frac) == ("nanochat", "nanochat", 40,
                                                                                         0.65)
    x32 = train_gpt2.parse_train_args(["--preset", "shakespeare", *bench_recipe.nanochat_flags(base, 32.0)])
    assert x32.muon_lr == pytest.approx(32 * cfg.muon_lr, rel=1e-3) and x32.muon_weight_decay == cfg.muon_weight_decay
    args = bench_recipe.build_parser().parse_args(["--ablate", "--changes", "+ smear, + nope"])
    with pytest.raises(SystemExit, match=r"--changes \+ nope: not a row"):
        bench_recipe.ablated(args)


def test_bench_recipe_table_on_tiny_runs(capsys):
    """Both recipes for 4 steps in worker processes (through train_gpt2.train): a table of each one's numbers,
    the GPT-2 recipe reaching its own final loss at its last evaluation (100%, 1.00x)."""
    bench_recipe.main(["--seeds", "1", "--evals", "2", "--max-steps", "4", "--n-layer", "1", "--warmup-steps", "1",
                       "--val-steps", "1"])
    out = capsys.readouterr().out
    m = re.search(r"\| gpt2 \| ([\d.]+) \| ([\d,]+) \| 100% \| 1\.00x \|", out)
    assert m and m[2] == "3,072", out  # reached at the evaluation of step 3: 3 steps x 1,024 tokens
    assert re.search(r"\| modern \| [\d.]+ \| (not reached|[\d,]+) \| (-|\d+%) \| [\d.]+x \|", out), out
    assert "--preset shakespeare, data input.txt, 4 steps of 1,024 tokens | seeds 1" in out


def test_docs_text_is_the_same_text_on_every_machine(tmp_path):
    """The tuning text is built from what is installed: two launches in different environments write the same
    bytes, the size asked for, with neither the environment's variables nor object addresses in it."""
    texts = []
    for i, extra in enumerate(({}, {"SOME_MACHINE_ONLY_VARIABLE": "x" * 50})):
        out = tmp_path / f"docs{i}.txt"
        subprocess.run([sys.executable, "bench/docs_text.py", str(out), "--bytes", "300000"], cwd=REPO,
                       env={**os.environ, **extra}, check=True, capture_output=True)
        texts.append(out.read_bytes())
    assert texts[0] == texts[1] and len(texts[0]) == 300_000
    text = texts[0].decode()
    assert text.startswith("Module ") and ("os.environ" in text or "cgi" not in sys.stdlib_module_names)  # cgi's
    assert "SOME_MACHINE_ONLY_VARIABLE" not in text and " at 0x" not in text
