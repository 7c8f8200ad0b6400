"""Training: accumulation, DDP, the loader, exact resume, signals, schedule, compile, errors.

Tiny models on synthetic shards (vocab 64) so each run takes seconds on a CPU, in fp32.
"""

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt2
import support.distributed
import train_gpt2 as tg
from support.checkpoints import latest_checkpoint, load_optimizer_state
from support.data import find_shards, open_shard
from support.hf import load_model
from support.metrics import flops_per_token, peak_flops
from support.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parent.parent
VOCAB = 64


def write_shards(folder: Path, n_train: int = 2, tokens_per_shard: int = 4000, seed: int = 0) -> Path:
    """fineweb.py-style shards: val shard 0, then train shards; learnable (repeating) sequences."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    motifs = rng.integers(0, VOCAB, size=(8, 12))
    for i in range(n_train + 1):
        rows = motifs[rng.integers(0, len(motifs), size=tokens_per_shard // 12 + 1)].reshape(-1)
        split = "val" if i == 0 else "train"
        np.save(folder / f"edufineweb_{split}_{i:06d}.npy", rows[:tokens_per_shard].astype(np.uint16))
    return folder


TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--vocab-size", str(VOCAB),
        "--seq-len", "16", "--warmup-steps", "2", "--val-steps", "2", "--no-hellaswag", "--num-samples", "0",
        "--device", "cpu", "--no-compile", "--max-lr", "1e-2"]


def tiny_args(data: Path, log_dir: Path, *extra: str, B: int = 2, total: int = 64, steps: int = 6) -> list[str]:
    return ["--data", str(data), "--log-dir", str(log_dir), *TINY, "--micro-batch-size", str(B),
            "--total-batch-size", str(total), "--max-steps", str(steps), "--eval-interval", "3", *extra]


def run(args: list[str], on_step=None) -> dict:
    return tg.train(tg.parse_train_args(args), on_step=on_step)


def torchrun(args: list[str], nproc: int = 2, timeout: int = 180, check: bool = True,
             rank_logs: Path | None = None, script: str = "train_gpt2.py") -> subprocess.CompletedProcess:
    """train_gpt2.py (or another script of the repo: tests/faulty_train.py) under torchrun; with rank_logs, each
    rank's stdout/stderr go to files there (read them with rank_log): through one pipe, two ranks' lines can
    interleave."""
    logs = ["--log-dir", str(rank_logs), "--redirects", "3"] if rank_logs else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *logs,
           str(REPO / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def rank_log(rank_logs: Path, rank: int, stream: str = "stderr") -> str:
    return next(rank_logs.glob(f"*/attempt_0/{rank}/{stream}.log")).read_text()


def checkpoint_tensors(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "shards")


# -----------------------------------------------------------------------------
# gradient accumulation and DDP


def test_accumulation_gives_the_same_gradients(shards, tmp_path):
    grads = {}

    def capture(name):
        def on_step(step, stats):
            grads[name] = {n: p.grad.clone() for n, p in stats["model"].named_parameters()}
            grads[name + "_loss"] = stats["loss"]
        return on_step

    run(tiny_args(shards, tmp_path / "a", "--eval-interval", "0", B=4, total=64, steps=1), capture("4x1"))
    run(tiny_args(shards, tmp_path / "b", "--eval-interval", "0", B=2, total=64, steps=1), capture("2x2"))
    assert grads["4x1_loss"] == pytest.approx(grads["2x2_loss"], rel=1e-6)
    for name, g in grads["4x1"].items():
        torch.testing.assert_close(grads["2x2"][name], g, rtol=1e-5, atol=1e-7, msg=name)


def assert_same_parameters(got: dict, want: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Two state dicts of the tiny model (n_embd 32) after the same training, up to float rounding."""
    assert got.keys() == want.keys()
    for name, p in want.items():
        q = got[name]
        if name.endswith("attn.c_attn.bias"):
            # the key bias cannot change attention (softmax ignores a shift along the keys), so its
            # gradient is rounding noise that Adam normalizes to full-size steps: loose there only
            key = slice(32, 64)
            torch.testing.assert_close(q[key], p[key], rtol=0, atol=1e-4, msg=name)
            p, q = torch.cat([p[:32], p[64:]]), torch.cat([q[:32], q[64:]])
        torch.testing.assert_close(q, p, rtol=rtol, atol=atol, msg=name)


def test_ddp_two_ranks_equals_one_process_accumulating(shards, tmp_path):
    args = lambda d: tiny_args(shards, d, "--eval-interval", "0", B=2, total=64, steps=3)
    torchrun(args(tmp_path / "ddp"), nproc=2)
    run(args(tmp_path / "single"))  # one process: 2 micro-batches of accumulation
    ddp = checkpoint_tensors(tmp_path / "ddp" / "model_00002.pt")
    single = checkpoint_tensors(tmp_path / "single" / "model_00002.pt")
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert_same_parameters(ddp["model"], single["model"])
    losses = lambda d: [line for line in (d / "log.txt").read_text().splitlines() if " train " in line]
    for a, b in zip(losses(tmp_path / "ddp"), losses(tmp_path / "single"), strict=True):
        assert float(a.split()[2]) == pytest.approx(float(b.split()[2]), rel=1e-5)


# -----------------------------------------------------------------------------
# data loader


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_loader_windows_cover_each_shard_once_across_ranks(world_size):
    B, T = 2, 5
    shards = [np.arange(n, dtype=np.uint16) for n in (103, 61, 200)]
    loaders = [tg.DataLoader(shards, B, T, rank=r, world_size=world_size) for r in range(world_size)]
    seen = {}  # (shard, start) -> rank
    for _ in range(sum((n - 1) // (B * T) // world_size for n in (103, 61, 200))):  # one epoch of steps
        positions = set()
        for r, loader in enumerate(loaders):
            x, y = loader.next_batch()
            positions.add((loader.epoch, loader.shard_pos))
            assert torch.equal(y.reshape(-1), x.reshape(-1) + 1)  # targets are the next tokens
            key = (loader.shard_pos, int(x[0, 0]))
            assert key not in seen, f"window {key} read twice"
            seen[key] = r
        assert len(positions) == 1, "ranks must be in the same shard at every step"
    for shard_pos, n in enumerate((103, 61, 200)):
        starts = sorted(start for (s, start) in seen if s == shard_pos)
        groups = (n - 1) // (B * T) // world_size
        assert starts == list(range(0, groups * world_size * B * T, B * T))  # every full group, nothing else
    x, _ = loaders[0].next_batch()
    assert loaders[0].epoch == 1 and int(x[0, 0]) == 0  # then the next epoch starts over


def test_shuffle_is_seeded_shared_by_ranks_and_restorable():
    shards = [np.arange(n, dtype=np.uint16) for n in (400, 300, 500)]
    make = lambda r, seed=7: tg.DataLoader(shards, 2, 4, rank=r, world_size=2, shuffle=True, seed=seed)
    a0, a1 = make(0), make(1)
    first = [(int(a0.next_batch()[0][0, 0]), int(a1.next_batch()[0][0, 0])) for _ in range(30)]
    assert all(abs(x - y) == 8 for x, y in first if x // 1000 == y // 1000)  # neighbouring windows
    assert [x for x, _ in first] != sorted(x for x, _ in first)  # not in order
    b = make(0)
    for _ in range(13):
        b.next_batch()
    state = b.state_dict()
    expected = [b.next_batch()[0] for _ in range(60)]  # crosses shard and epoch boundaries
    c = make(0)
    c.load_state_dict(state)
    assert all(torch.equal(c.next_batch()[0], e) for e in expected)
    assert [int(make(0, seed=8).next_batch()[0][0, 0]) for _ in range(5)] != [x for x, _ in first[:5]]


def test_shards_are_memory_mapped(tmp_path):
    write_shards(tmp_path / "s", n_train=1, tokens_per_shard=100_000)
    tokens = open_shard(next((tmp_path / "s").glob("*train*")))
    assert isinstance(tokens, np.memmap)


# -----------------------------------------------------------------------------
# exact resume, preemption


def final_state(log_dir: Path) -> dict:
    return checkpoint_tensors(latest_checkpoint(log_dir))


def log_lines(log_dir: Path, name: str) -> list[tuple[int, float]]:
    """log.txt's lines of one metric, in the order written (a rewound or restarted step appears again)."""
    rows = [line.split() for line in (log_dir / "log.txt").read_text().splitlines()]
    return [(int(step), float(value)) for step, n, value in rows if n == name]


def assert_same_state(sa: dict, sb: dict) -> None:
    """Two checkpoints of the same step with the same weights and optimizer state, tensor for tensor."""
    assert sa["step"] == sb["step"]
    for name, p in sa["model"].items():
        assert torch.equal(p, sb["model"][name]), f"{name} differs after resume"
    for k, st in sa["optimizer"]["state"].items():
        for key, v in st.items():
            assert torch.equal(v, sb["optimizer"]["state"][k][key])


def assert_same_run(a: Path, b: Path) -> None:
    assert_same_state(final_state(a), final_state(b))
    lines = lambda d: [ln for ln in (d / "log.txt").read_text().splitlines() if ln.split()[1] in ("train", "val")]
    assert lines(a) == lines(b)


def test_resume_equals_uninterrupted_bitwise(shards, tmp_path):
    args = lambda d, *x: tiny_args(shards, d, "--checkpoint-interval", "100", "--shuffle", *x, steps=8)
    run(args(tmp_path / "straight"))
    run(args(tmp_path / "split", "--stop-after-step", "3"))
    assert latest_checkpoint(tmp_path / "split").name == "model_00003.pt"
    history = run(args(tmp_path / "split", "--resume"))
    assert min(history["train"]) == 4
    assert_same_run(tmp_path / "straight", tmp_path / "split")


def test_resume_equals_uninterrupted_under_ddp(shards, tmp_path):
    args = lambda d, *x: tiny_args(shards, d, "--checkpoint-interval", "100", *x, steps=6)
    torchrun(args(tmp_path / "straight"))
    torchrun(args(tmp_path / "split", "--stop-after-step", "2"))
    torchrun(args(tmp_path / "split", "--resume"))
    assert len(checkpoint_tensors(tmp_path / "split" / "model_00002.pt")["rng"]) == 2  # every rank's RNG
    assert_same_run(tmp_path / "straight", tmp_path / "split")


def test_deterministic_is_recorded_holds_during_the_run_and_resumes_bitwise(shards, tmp_path, capsys):
    """--deterministic on the CPU (where every run is deterministic anyway): accepted, in the run's first line and in
    its checkpoints' arguments, torch's deterministic mode on during training and off after, resume bitwise."""
    args = lambda d, *x: tiny_args(shards, d, "--checkpoint-interval", "100", "--deterministic", *x, steps=6)
    during = []
    run(args(tmp_path / "straight"), on_step=lambda *_: during.append(torch.are_deterministic_algorithms_enabled()))
    assert during == [True] * 6 and not torch.are_deterministic_algorithms_enabled()
    assert "| deterministic kernels" in capsys.readouterr().out
    run(args(tmp_path / "split", "--stop-after-step", "2"))
    run(args(tmp_path / "split", "--resume"))
    assert_same_run(tmp_path / "straight", tmp_path / "split")
    assert final_state(tmp_path / "split")["args"]["deterministic"] is True


def test_deterministic_kernels_set_and_restore_every_setting(monkeypatch):
    import torch._inductor.config as inductor

    from support.distributed import deterministic_kernels

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cuda = torch.backends.cuda
    settings = lambda: (cuda.cudnn_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.flash_sdp_enabled(),
                        inductor.deterministic, torch.are_deterministic_algorithms_enabled())
    before = settings()
    with deterministic_kernels(True):
        assert settings() == (False, False, True, True, True) and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert settings() == before and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_tf32_through_the_fp32_precision_settings(monkeypatch):
    """TF32 on CUDA through torch.backends' fp32_precision, not set_float32_matmul_precision (which warns)."""
    import warnings

    from support.distributed import use_tf32

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda *a: pytest.fail("the old API"))
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            use_tf32("cuda")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
    use_tf32("cpu")
    assert matmul.fp32_precision == saved[0]  # nothing off a GPU


DDP_BUCKETS = """
import json, os, sys
import train_gpt2 as tg
from support.distributed import setup_distributed, teardown_distributed
from support.long_runs import StopSignal

dist = setup_distributed("cpu")
run = tg.setup(tg.parse_train_args(sys.argv[2:]), dist)
tg.train_step(run, 0, StopSignal())
views = [p.grad._is_view() for p in run.raw_model.parameters()]
json.dump({"bucket_view": run.model.gradient_as_bucket_view, "views": views}, open(f"{sys.argv[1]}.{dist.rank}", "w"))
run.metrics.close()
teardown_distributed()
"""


def test_ddp_gradients_are_views_into_its_buckets(shards, tmp_path):
    """No second copy of the gradients under DDP: each parameter's .grad is a view into an all-reduce bucket (the
    losses of 2 ranks still equal one process's: test_ddp_two_ranks_equals_one_process_accumulating)."""
    script = tmp_path / "buckets.py"
    script.write_text(DDP_BUCKETS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path / "out"), *tiny_args(shards, tmp_path / "r", "--eval-interval", "0", steps=2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"out.{rank}").read_text())
        assert seen["bucket_view"] and seen["views"] and all(seen["views"]), seen


def test_the_first_steps_figures_are_marked_as_including_compilation(shards, tmp_path, capsys):
    args = lambda *x: tiny_args(shards, tmp_path / "r", "--eval-interval", "0", "--checkpoint-interval", "100", *x,
                                steps=4)
    run(args("--stop-after-step", "1"))
    run(args("--resume"))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "| loss " in ln]
    marked = [ln.split()[1] for ln in lines if "(first step: dt, tok/sec and mfu include compilation, warm-up)" in ln]
    assert len(lines) == 4 and marked == ["0/4", "2/4"]  # each process's first
    assert "first step" not in (tmp_path / "r" / "log.txt").read_text()  # log.txt: numbers only, as before


def start_training(shards: Path, log_dir: Path, *extra: str) -> subprocess.Popen:
    args = tiny_args(shards, log_dir, "--checkpoint-interval", "1", "--eval-interval", "0", *extra, steps=100000)
    return subprocess.Popen([sys.executable, str(REPO / "train_gpt2.py"), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_kill_9_then_resume_never_picks_a_partial_checkpoint(shards, tmp_path):
    log_dir = tmp_path / "run"
    proc = start_training(shards, log_dir)
    wait_for(lambda: len(list(log_dir.glob("model_*.pt"))) >= 3)
    proc.kill()
    proc.wait()
    newest = latest_checkpoint(log_dir)
    # what a kill -9 in the middle of torch.save leaves behind: a temporary file, never a model_*.pt
    (log_dir / f".model_{99999:05d}.pt.tmp12345").write_bytes(b"half a checkpoint")
    assert latest_checkpoint(log_dir) == newest
    step = checkpoint_tensors(newest)["step"]
    history = run(tiny_args(shards, log_dir, "--resume", "--eval-interval", "0", steps=step + 3))
    assert sorted(history["train"]) == [step + 1, step + 2]


def test_sigterm_finishes_the_step_saves_and_exits(shards, tmp_path):
    log_dir = tmp_path / "run"
    proc = start_training(shards, log_dir, "--checkpoint-interval", "1000")
    wait_for(lambda: (log_dir / "log.txt").exists() and " train " in (log_dir / "log.txt").read_text())
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "SIGTERM" in out and "continue with --resume" in out
    ckpt = latest_checkpoint(log_dir)
    state = checkpoint_tensors(ckpt)
    last_logged = max(int(ln.split()[0]) for ln in (log_dir / "log.txt").read_text().splitlines())
    assert state["step"] == last_logged  # the step in flight was finished and saved
    history = run(tiny_args(shards, log_dir, "--resume", "--eval-interval", "0", steps=state["step"] + 2))
    assert sorted(history["train"]) == [state["step"] + 1]


def test_checkpoint_is_plain_data_and_complete(shards, tmp_path):
    run(tiny_args(shards, tmp_path / "r", steps=2))
    ckpt = torch.load(tmp_path / "r" / "model_00001.pt", weights_only=True)
    assert set(ckpt) >= {"model", "config", "optimizer", "step", "val_loss", "loader", "rng", "args"}
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    shape = {"block_size": 32, "vocab_size": VOCAB, "n_layer": 2, "n_head": 2, "n_embd": 32}
    assert ckpt["config"] == dataclasses.asdict(gpt2.GPTConfig(**shape))  # the shape, and the options (GPT-2's)
    assert ckpt["step"] == 1 and isinstance(ckpt["val_loss"], float)
    model = load_model(str(tmp_path / "r" / "model_00001.pt"))
    assert model.num_parameters() == sum(v.numel() for k, v in ckpt["model"].items() if k != "lm_head.weight")


def test_log_is_appended_on_resume(shards, tmp_path):
    log_dir = tmp_path / "r"
    run(tiny_args(shards, log_dir, "--stop-after-step", "1", steps=4))
    before = (log_dir / "log.txt").read_text()
    run(tiny_args(shards, log_dir, "--resume", steps=4))
    after = (log_dir / "log.txt").read_text()
    assert after.startswith(before) and len(after) > len(before)
    streams = {ln.split()[1] for ln in after.splitlines()}
    assert streams >= {"train", "val", "lr", "norm", "tokens_per_sec"}
    assert [int(ln.split()[0]) for ln in after.splitlines() if " train " in ln] == [0, 1, 2, 3]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(shards, tmp_path):
    log_dir = tmp_path / "r"

    def poison(step, stats):
        if step == 2:  # after model_00002.pt was written
            with torch.no_grad():
                stats["model"].transformer.wte.weight[0, 0] = float("nan")

    with pytest.raises(tg.TrainingDiverged, match="at step 3"):
        run(tiny_args(shards, log_dir, "--checkpoint-interval", "1", "--eval-interval", "0"), poison)
    good = log_dir / "model_00002.pt"
    assert latest_checkpoint(log_dir) == good
    assert all(torch.isfinite(v).all() for v in checkpoint_tensors(good)["model"].values())


# -----------------------------------------------------------------------------
# optimizer and schedule


def test_learning_rate_schedule():
    lr = lambda s: tg.get_lr(s, 6e-4, 6e-5, 715, 19073)
    assert lr(0) == pytest.approx(6e-4 / 715)
    assert lr(714) == pytest.approx(6e-4)
    assert lr(715) == pytest.approx(6e-4)
    assert lr(19072) == pytest.approx(6e-5, rel=1e-7)
    assert lr(19073) == pytest.approx(6e-5) and lr(30000) == pytest.approx(6e-5)
    mid = (715 + 19073) // 2
    assert lr(mid) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-3)
    cfg = tg.TrainConfig()
    assert (cfg.max_lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio) == (6e-4, 715, 19073, 0.1)


@pytest.fixture
def fake_gpus(monkeypatch):
    """setup_distributed's view of a machine with GPUs: what it binds and how it starts the group, recorded."""
    import torch.distributed as tdist

    seen = {"set_device": [], "init": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen["set_device"].append(str(d)))
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda **kw: seen["init"].append(kw))

    def torchrun_env(rank, local_rank, world_size):
        for k, v in dict(RANK=rank, LOCAL_RANK=local_rank, WORLD_SIZE=world_size).items():
            monkeypatch.setenv(k, str(v))

    return seen, torchrun_env


def test_each_rank_takes_its_local_gpu(fake_gpus, monkeypatch):
    import datetime

    seen, torchrun_env = fake_gpus
    torchrun_env(rank=11, local_rank=3, world_size=16)  # second node of two, fourth GPU
    for device in ("auto", "cuda"):
        d = support.distributed.setup_distributed(device)
        assert (d.rank, d.local_rank, d.world_size, d.device) == (11, 3, 16, "cuda:3")
    assert seen["set_device"] == ["cuda:3", "cuda:3"]
    init = seen["init"][0]
    assert init["backend"] == "nccl" and (init["rank"], init["world_size"]) == (11, 16)
    assert init["device_id"] == torch.device("cuda:3") and init["timeout"] == datetime.timedelta(minutes=30)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a scheduler shows each process one GPU
    assert support.distributed.setup_distributed("cuda").device == "cuda:0"
    with pytest.raises(ValueError, match=r"--device cuda:1 under torchrun would put all 16 ranks on one GPU"):
        support.distributed.setup_distributed("cuda:1")
    cpu = support.distributed.setup_distributed("cpu")
    assert cpu.device == "cpu" and seen["init"][-1]["backend"] == "gloo" and seen["init"][-1]["device_id"] is None


def test_one_process_on_a_chosen_gpu_binds_it(fake_gpus, monkeypatch):
    seen, _ = fake_gpus
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert support.distributed.setup_distributed("cuda:1").device == "cuda:1"
    assert support.distributed.setup_distributed("auto").device == "cuda"
    assert seen["set_device"] == ["cuda:1"] and seen["init"] == []  # synchronize() and kernels use GPU 1


def test_mfu_formula_and_peaks(monkeypatch):
    model = gpt2.GPT(gpt2.GPTConfig(vocab_size=50304))  # GPT-2 124M as trained here
    n = sum(p.numel() for p in model.parameters())  # the tied matrix once, padded rows included
    L, C, T = 12, 768, 1024
    assert n == 124_475_904 and flops_per_token(model.config, T) == 6 * n + 6 * L * C * T == 803_478_528
    assert 677_000 * flops_per_token(model.config, T) / 989e12 == pytest.approx(0.55, abs=5e-4)  # 55% MFU target
    assert peak_flops("cpu") is None
    # torch.cuda.get_device_name's strings of real GPUs: whole words match ("A100" is not the RTX A1000's "A1000")
    for name, peak in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
                       ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12),
                       ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA B200", 2.25e15), ("NVIDIA GB200", 2.5e15),
                       ("NVIDIA L4", None), ("NVIDIA RTX A1000", None), ("NVIDIA RTX A1000 6GB Laptop GPU", None),
                       ("NVIDIA GeForce RTX 4090", None), ("NVIDIA A10", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_flops("cuda:0") == peak, name
        assert peak_flops("cuda:0", bf16=False) == (peak / 2 if peak else None), name  # TF32
    for name, peak in [("Tesla V100-SXM2-16GB", 125e12), ("Tesla T4", 65e12)]:  # fp16 tensor cores, no TF32
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_flops("cuda:0") == peak and peak_flops("cuda:0", bf16=False) is None, name


def test_resume_keeps_the_optimizers_implementation():
    model = gpt2.GPT(gpt2.GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16))
    saved = tg.configure_optimizer(model, 0.1, 6e-4, (0.9, 0.95), 1e-8, "cpu")  # not fused, as on a CPU
    model(torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (2, 8)))[1].backward()
    saved.step()
    state = saved.state_dict()
    assert state["param_groups"][0]["fused"] in (None, False)
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in saved.param_groups]
    gpu_like = lambda: torch.optim.AdamW(groups, lr=1e-3, fused=True)  # as configure_optimizer builds it on a GPU
    plain = gpu_like()
    plain.load_state_dict(state)
    assert plain.param_groups[0]["fused"] is False  # what this guards against: the saved flag wins
    fused = gpu_like()
    load_optimizer_state(fused, state)
    assert all(g["fused"] is True for g in fused.param_groups)
    assert all(g["lr"] == 6e-4 for g in fused.param_groups) and fused.param_groups[1]["weight_decay"] == 0.0
    fused.step()  # the loaded state (step counters included) suits the fused kernel
    assert all(fused.state[p]["step"].item() == 2 for p in model.parameters())


def test_weight_decay_only_on_matrices_and_embeddings():
    model = gpt2.GPT(gpt2.GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16))
    opt = tg.configure_optimizer(model, 0.1, 6e-4, (0.9, 0.95), 1e-8, "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in opt.param_groups[0]["params"])
    plain = sorted(names[id(p)] for p in opt.param_groups[1]["params"])
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert decayed == sorted(["transformer.wte.weight", "transformer.wpe.weight"] + [
        f"transformer.h.{i}.{m}.weight" for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")])
    assert all(n.endswith(".bias") or ".ln_" in n for n in plain) and len(plain) == 2 * 8 + 2
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["eps"] == 1e-8


def test_defaults_are_the_reference_recipe():
    cfg = tg.TrainConfig()
    assert (cfg.vocab_size, cfg.seq_len, cfg.micro_batch_size, cfg.total_batch_size) == (50304, 1024, 64, 2**19)
    assert (cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.eps, cfg.grad_clip) == (0.1, 0.9, 0.95, 1e-8, 1.0)
    assert (cfg.eval_interval, cfg.checkpoint.checkpoint_interval) == (250, 5000)
    import fineweb

    assert cfg.data == fineweb.Config().out_dir == str(REPO / "edu_fineweb10B")  # where fineweb.py writes, from any cwd
    help_text = tg.build_train_parser().format_help()
    for flag in ("--preset", "--data", "--log-dir", "--max-steps", "--micro-batch-size", "--seq-len",
                 "--total-batch-size", "--resume", "--init-from", "--compile", "--no-compile", "--seed",
                 "--eval-interval", "--checkpoint-interval", "--hellaswag", "--no-hellaswag"):
        assert flag in help_text
    preset = tg.parse_train_args(["--preset", "shakespeare", "--max-steps", "7"])
    assert preset.data == "input.txt" and preset.max_steps == 7 and preset.n_layer == 4


# -----------------------------------------------------------------------------
# torch.compile with evaluation, HellaSwag and sampling in the same process

HELLASWAG_FIXTURE = [
    {"ind": i, "activity_label": "Cooking", "ctx_a": "A man is in a kitchen.", "ctx_b": "he",
     "ctx": "A man is in a kitchen. he" + " then" * i, "split": "val", "split_type": "indomain", "label": i % 4,
     "endings": ["cuts an onion.", "sings loudly to the pan for a while.", "leaves.", "reads a book about boats."],
     "source_id": f"fixture~{i}"}
    for i in range(6)
]


def test_chunked_loss_trains_like_the_plain_loss(shards, tmp_path):
    plain = run(tiny_args(shards, tmp_path / "plain"))
    chunked = run(tiny_args(shards, tmp_path / "chunked", "--loss-chunk", "5"))
    assert plain["train"].keys() == chunked["train"].keys() and plain["val"].keys() == chunked["val"].keys()
    for k in ("train", "val"):
        assert chunked[k] == pytest.approx(plain[k], rel=1e-5), k
    a, b = (torch.load(r["checkpoints"][-1], weights_only=True)["model"] for r in (plain, chunked))
    assert_same_parameters(b, a)


@pytest.mark.parametrize("loss_chunk", ["0", "48"])
def test_compile_with_eval_hellaswag_and_samples_does_not_recompile(shards, tmp_path, capsys, loss_chunk):
    gpt2_shards = tmp_path / "gpt2_shards"
    gpt2_shards.mkdir()
    for f in shards.glob("*.npy"):  # the same tokens, read by a model with GPT-2's vocabulary
        np.save(gpt2_shards / f.name, np.load(f) + 1000)
    hella = tmp_path / "hellaswag_val.jsonl"
    hella.write_text("\n".join(json.dumps(e) for e in HELLASWAG_FIXTURE) + "\n")
    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()  # reset() keeps them: an earlier compile (another parametrization) would count here
    graphs = {}
    on_step = lambda step, stats: graphs.__setitem__(step, counters["stats"]["unique_graphs"])
    args = tiny_args(gpt2_shards, tmp_path / "r", steps=7) + [
        "--vocab-size", "50304", "--compile", "--eval-interval", "2", "--hellaswag", "--hellaswag-file", str(hella),
        "--num-samples", "2", "--sample-tokens", "8", "--loss-chunk", loss_chunk]
    history = run(args, on_step)
    out = capsys.readouterr().out
    assert graphs[0] > 0, "the training step was not compiled"
    # step 0 compiled the training step and the validation forward (no_grad); HellaSwag's and sampling's
    # many shapes, had they gone through the compiled module, would each have added graphs
    assert graphs[0] <= 2 and graphs[6] == graphs[0], f"compiled graphs by step: {graphs}"
    assert sorted(history["val"]) == [0, 2, 4, 6] and sorted(history["hella"]) == [0, 2, 4, 6]
    assert out.count("rank 0 sample 1: Hello, I'm a language model,") == 4
    log = (tmp_path / "r" / "log.txt").read_text()
    assert "6 hella " in log and "6 val " in log


# -----------------------------------------------------------------------------
# errors, before step 0


def cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        tg.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_gpt2.py: error: ") and "\n" not in err
    return err


def test_error_missing_data_folder(tmp_path, capsys):
    err = cli_error(tiny_args(tmp_path / "nope", tmp_path / "r"), capsys)
    assert "no such folder" in err and "fineweb.py" in err
    assert not (tmp_path / "r").exists()


def test_error_no_shards_for_a_split(shards, tmp_path, capsys):
    (shards / "edufineweb_val_000000.npy").unlink()
    assert "no val shards" in cli_error(tiny_args(shards, tmp_path / "r"), capsys)


def test_shards_are_matched_by_their_split_field(tmp_path):
    # a prefix containing "val" (or "train") must not move shards between splits
    folder = tmp_path / "fw"
    folder.mkdir()
    names = ["fw_eval_val_000000.npy", "fw_eval_train_000001.npy", "fw_eval_train_000002.npy", "notes_val.npy"]
    for name in names:
        np.save(folder / name, np.zeros(10, dtype=np.uint16))
    (folder / ".fw_eval_train_000003.npy.tmp42").write_bytes(b"")  # atomic_write's temporary name
    assert [p.name for p in find_shards(folder, "val")] == ["fw_eval_val_000000.npy"]
    assert [p.name for p in find_shards(folder, "train")] == names[1:3]


def test_error_corrupt_shard(shards, tmp_path, capsys):
    (shards / "edufineweb_train_000002.npy").write_bytes(b"\x93NUMPY garbage")
    err = cli_error(tiny_args(shards, tmp_path / "r"), capsys)
    assert "edufineweb_train_000002.npy" in err and "corrupt" in err


def test_error_non_uint16_shard(shards, tmp_path, capsys):
    np.save(shards / "edufineweb_train_000002.npy", np.arange(5000, dtype=np.int32))
    err = cli_error(tiny_args(shards, tmp_path / "r"), capsys)
    assert "edufineweb_train_000002.npy" in err and "int32" in err and "uint16" in err


def test_error_token_id_beyond_vocab(shards, tmp_path, capsys):
    tokens = np.load(shards / "edufineweb_train_000001.npy")
    tokens[3000] = VOCAB + 5
    np.save(shards / "edufineweb_train_000001.npy", tokens)
    err = cli_error(tiny_args(shards, tmp_path / "r"), capsys)
    assert f"token id {VOCAB + 5} >= vocab size {VOCAB}" in err and "edufineweb_train_000001.npy" in err


def test_error_seq_len_beyond_block_size(shards, tmp_path, capsys):
    err = cli_error(tiny_args(shards, tmp_path / "r", "--seq-len", "64", total=128), capsys)
    assert "--seq-len 64 exceeds the model's block size 32" in err


def test_error_indivisible_batch(shards, tmp_path, capsys):
    err = cli_error(tiny_args(shards, tmp_path / "r", total=100), capsys)
    assert "--total-batch-size 100 is not divisible" in err and "= 32" in err


def test_error_hellaswag_not_obtainable(shards, tmp_path, capsys):
    args = tiny_args(shards, tmp_path / "r", "--vocab-size", "50304", "--hellaswag", "--hellaswag-file",
                     str(tmp_path / "missing.jsonl"))
    assert "HellaSwag data not obtainable" in cli_error(args, capsys)


def test_error_checkpoint_of_another_shape(shards, tmp_path, capsys):
    run(tiny_args(shards, tmp_path / "r", steps=2))
    err = cli_error(tiny_args(shards, tmp_path / "r", "--resume", "--n-layer", "3", "--n-embd", "64"), capsys)
    assert "n_embd: checkpoint 32 vs this run 64" in err and "n_layer: checkpoint 2 vs this run 3" in err


def test_error_resume_with_nothing_to_resume(shards, tmp_path, capsys):
    assert "no checkpoint" in cli_error(tiny_args(shards, tmp_path / "empty", "--resume"), capsys)


def test_error_fresh_run_over_old_checkpoints(shards, tmp_path, capsys):
    run(tiny_args(shards, tmp_path / "r", steps=2))
    digest = hashlib.sha256((tmp_path / "r" / "model_00001.pt").read_bytes()).hexdigest()
    assert "--resume" in cli_error(tiny_args(shards, tmp_path / "r", steps=2), capsys)
    assert hashlib.sha256((tmp_path / "r" / "model_00001.pt").read_bytes()).hexdigest() == digest


# -----------------------------------------------------------------------------
# the quick start: tiny Shakespeare from a .txt file


def test_error_text_file_not_utf8(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    err = cli_error(tiny_args(bad, tmp_path / "r"), capsys)
    assert f"--data {bad}: not UTF-8 text" in err
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob(".*"))  # no cache, no temporary file


def test_rank_0_failing_stops_every_rank(tmp_path):
    # rank 0 alone reads and tokenizes a .txt; when it fails, rank 1 must not wait for it in a collective
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    t0 = time.monotonic()
    out = torchrun(tiny_args(bad, tmp_path / "r"), timeout=150, check=False, rank_logs=tmp_path / "ranks")
    assert out.returncode != 0 and time.monotonic() - t0 < 120
    err0, err1 = (rank_log(tmp_path / "ranks", r).strip().splitlines() for r in (0, 1))
    assert err0[-1].startswith(f"train_gpt2.py: error: --data {bad}: not UTF-8 text"), err0
    assert err1[-1] == f"train_gpt2.py: error: --data {bad}: rank 0 could not prepare it (see its error above)", err1


def test_a_rank_that_cannot_read_the_token_cache_stops_every_rank(tmp_path):
    # rank 0 tokenizes; a rank that cannot then read the cache (a node without the shared file system)
    # must take every rank down with it, not leave rank 0 alone in the next collective
    text = tmp_path / "small.txt"
    text.write_text("hello world. " * 200)
    script = tmp_path / "read_tokens.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\nimport numpy as np\nfrom support.data import tokenize_text_file\n"
        "from support.distributed import setup_distributed, teardown_distributed\n"
        "dist = setup_distributed('cpu')\n"
        "if dist.rank == 1:\n"
        "    def unreadable(*args, **kwargs):\n"
        "        raise FileNotFoundError('not visible on this node')\n"
        "    np.load = unreadable\n"
        "try:\n"
        "    result = f'{len(tokenize_text_file(Path(sys.argv[1]), dist))} tokens'\n"
        "except Exception as e:\n"
        "    result = f'{type(e).__name__}: {e}'\n"
        "finally:\n"
        "    teardown_distributed()\n"
        "Path(f'rank{dist.rank}.txt').write_text(result)\n")  # a file each: the ranks' stdout can interleave
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(text)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    results = [(tmp_path / f"rank{r}.txt").read_text() if (tmp_path / f"rank{r}.txt").exists() else None
               for r in (0, 1)]
    assert results == [f"TrainError: --data {text}: another rank could not read its tokens (see its error)",
                       "FileNotFoundError: not visible on this node"], out.stdout + out.stderr[-2000:]


def test_text_file_training_writes_log_checkpoint_and_samples(tmp_path, capsys):
    text = (REPO / "input.txt") if (REPO / "input.txt").exists() else REPO.parent / "shared" / "data" / "input.txt"
    if not text.exists():
        pytest.skip("tiny Shakespeare (input.txt) is not available offline")
    data = tmp_path / "input.txt"
    data.write_text(text.read_text()[:60_000])
    args = ["--preset", "shakespeare", "--data", str(data), "--log-dir", str(tmp_path / "log"), "--max-steps", "30",
            "--eval-interval", "15", "--warmup-steps", "5", "--device", "cpu",
            "--micro-batch-size", "4", "--seq-len", "64", "--total-batch-size", "256"]  # the preset, smaller
    history = run(args)
    out = capsys.readouterr().out
    assert history["val"][29] < history["val"][0] - 2.0  # from ~10.9 (uniform over 50k tokens) well down
    assert (tmp_path / "log" / "model_00029.pt").exists()
    assert "rank 0 sample 0: ROMEO:" in out  # the preset's prompt
    cache = list(tmp_path.glob("input.txt.*.gpt2.npy"))
    assert len(cache) == 1
    assert np.load(cache[0]).tolist() == get_tokenizer().encode_ordinary(data.read_text())
