"""--spike-guard: a loss spike rewinds the run to its newest checkpoint and skips the batches since then.

The spike is injected through the data, so that it is deterministic on every rank: the shards hold motifs of
tokens 0..31 only, and the tokens one step reads are replaced by random ones from 32..63, which the model has
learned never come. Tiny models, CPU, fp32; B 2 x T 16, 64 tokens per step (2 windows: 2 micro-batches in one
process, one per rank under 2-rank torchrun), so data step s is the tokens [64 s, 64 s + 65) of the first shard.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import (
    REPO,
    VOCAB,
    assert_same_parameters,
    assert_same_run,
    final_state,
    log_lines,
    run,
    tiny_args,
    torchrun,
)

import train_gpt2 as tg
from support import faults
from support.checkpoints import latest_checkpoint
from support.faults import FAULTS_ENV

TOKENS_PER_STEP = 64


def spiky_shards(folder: Path, garbage_steps=(), tokens_per_shard: int = 4000) -> Path:
    """A val shard and two train shards of motifs over tokens 0..31; the tokens of each data step in
    garbage_steps (of the first train shard) random over 32..63."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    motifs = rng.integers(0, VOCAB // 2, size=(8, 12))
    for i, split in enumerate(("val", "train", "train")):
        tokens = motifs[rng.integers(0, len(motifs), size=tokens_per_shard // 12 + 1)].reshape(-1)[:tokens_per_shard]
        if i == 1:
            for s in garbage_steps:
                tokens[s * TOKENS_PER_STEP: (s + 1) * TOKENS_PER_STEP + 1] = rng.integers(VOCAB // 2, VOCAB, 65)
        np.save(folder / f"edufineweb_{split}_{i:06d}.npy", tokens.astype(np.uint16))
    return folder


GUARD = ["--spike-guard", "--spike-window", "4"]  # the default threshold (8 robust deviations)


def args(data: Path, log_dir: Path, *extra: str, steps: int = 12) -> list[str]:
    return tiny_args(data, log_dir, "--checkpoint-interval", "3", *extra, steps=steps)


@pytest.fixture(scope="module")
def spiked(tmp_path_factory):
    """Data step 8 is garbage: a guarded run (checkpoints at 3, 6, 9), the same run unguarded, their console."""
    tmp = tmp_path_factory.mktemp("spike")
    data = spiky_shards(tmp / "shards", garbage_steps=[8])
    out = {}
    for name, extra in (("on", GUARD), ("off", [])):
        out[name] = run(args(data, tmp / name, *extra))
    return tmp, data, out


def test_a_spike_rewinds_to_the_newest_checkpoint_and_skips_its_batches(spiked, capsys):
    tmp, data, history = spiked
    off = dict(log_lines(tmp / "off", "train"))
    assert off[8] > 1.4 * off[7]  # the garbage makes the loss jump (measured: 3.39 -> 5.57)
    # the guarded run logged the spike, not a train line, then redid steps 7.. after checkpoint 6
    assert log_lines(tmp / "on", "spike") == [(8, pytest.approx(off[8], abs=1e-6))]
    on = log_lines(tmp / "on", "train")
    assert [s for s, _ in on] == [0, 1, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10, 11]
    assert on[:8] == [(s, off[s]) for s in range(8)]  # the same run up to the spike
    lrs = log_lines(tmp / "on", "lr")
    assert lrs[7] == lrs[8] and lrs[7][0] == 7  # the schedule rewound with the step
    assert max(v for _, v in on[7:]) < off[7] + 0.1 and all(np.isfinite(v) for _, v in on)  # no spike after it
    assert history["on"]["spike"] == {8: pytest.approx(off[8], abs=1e-6)} and history["off"]["spike"] == {}
    # the batches of steps 7 and 8 were skipped: 14 steps' worth of windows read in 12 steps (2 per step)
    on_ckpt, off_ckpt = final_state(tmp / "on"), final_state(tmp / "off")
    assert on_ckpt["step"] == off_ckpt["step"] == 11
    assert on_ckpt["loader"]["group_pos"] == 2 * 14 and off_ckpt["loader"]["group_pos"] == 2 * 12
    assert on_ckpt["spike_guard"]["rewinds"] == 1 and off_ckpt["spike_guard"] is None
    assert on_ckpt["spike_guard"]["losses"] == [history["on"]["train"][s] for s in range(8, 12)]  # the window


def test_a_rewound_run_equals_a_resume_from_the_checkpoint_with_the_data_moved_on(spiked, tmp_path):
    """Weights, optimizer, RNG restored exactly: the guarded run from step 7 on equals, bitwise, an unguarded
    run resumed from checkpoint 6 whose loader is set to after data step 8."""
    tmp, data, _ = spiked
    run(args(data, tmp_path / "r", "--stop-after-step", "6"))
    path = tmp_path / "r" / "model_00006.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["loader"]["group_pos"] == 2 * 7
    ckpt["loader"]["group_pos"] = 2 * 9
    torch.save(ckpt, path)
    run(args(data, tmp_path / "r", "--resume"))
    resumed = log_lines(tmp_path / "r", "train")
    assert resumed[7:] == log_lines(tmp / "on", "train")[8:]  # steps 7..11, bitwise
    a, b = final_state(tmp_path / "r"), final_state(tmp / "on")
    for name, w in b["model"].items():
        assert torch.equal(a["model"][name], w), name
    for i, state in b["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(a["optimizer"]["state"][i][k], v), (i, k)


def test_resuming_after_a_rewind_equals_the_uninterrupted_run(spiked, tmp_path):
    tmp, data, _ = spiked
    run(args(data, tmp_path / "r", *GUARD, "--stop-after-step", "9"))
    assert final_state(tmp_path / "r")["spike_guard"]["rewinds"] == 1
    run(args(data, tmp_path / "r", *GUARD, "--resume"))
    assert_same_run(tmp_path / "r", tmp / "on")
    assert final_state(tmp_path / "r")["spike_guard"] == final_state(tmp / "on")["spike_guard"]


def test_no_false_alarm_on_a_normal_run(tmp_path):
    """The guard on with its smallest window over 30 clean steps, warmup and lr 3e-2's bumps included:
    nothing triggers, and the run is the unguarded one, bitwise."""
    data = spiky_shards(tmp_path / "shards")
    for name, extra in (("on", GUARD), ("off", [])):
        history = run(args(data, tmp_path / name, *extra, "--max-lr", "3e-2", steps=30))
        assert history["spike"] == {}
    assert len(final_state(tmp_path / "on")["spike_guard"]["losses"]) == 4  # it was checking (a full window)
    for name in ("train", "val", "lr", "norm"):
        assert log_lines(tmp_path / "on", name) == log_lines(tmp_path / "off", name)
    a, b = final_state(tmp_path / "on"), final_state(tmp_path / "off")
    assert all(torch.equal(a["model"][k], w) for k, w in b["model"].items())


def test_after_max_rewinds_the_run_stops_with_an_error_naming_the_step(tmp_path):
    # data steps 8 and 13: spikes at steps 8 (rewound to 6, then data runs 2 steps ahead) and 11
    data = spiky_shards(tmp_path / "shards", garbage_steps=[8, 13])
    log_dir = tmp_path / "r"
    out = subprocess.run([sys.executable, "train_gpt2.py", *args(data, log_dir, *GUARD, "--max-rewinds", "1")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    error = out.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("train_gpt2.py: error: loss ")
    assert "at step 11 is a spike after 1 rewind(s) (--max-rewinds 1)" in error[0]
    assert f"{log_dir / 'model_00009.pt'} is untouched" in error[0]
    assert "rewind 1 of at most 1: back to" in out.stdout
    assert "(step 6), the batches of steps 7..8 skipped (4 micro-batches per rank)" in out.stdout
    assert [s for s, _ in log_lines(log_dir, "spike")] == [8, 11]
    assert latest_checkpoint(log_dir).name == "model_00009.pt"
    # the rewind count is in the checkpoints: a run resumed after the first rewind stops at the same spike
    resumed = tmp_path / "resumed"
    run(args(data, resumed, *GUARD, "--max-rewinds", "1", "--stop-after-step", "9"))
    with pytest.raises(tg.TrainingDiverged, match=r"at step 11 is a spike after 1 rewind\(s\)"):
        run(args(data, resumed, *GUARD, "--max-rewinds", "1", "--resume"))


def test_a_spike_before_any_checkpoint_stops_the_run(tmp_path):
    data = spiky_shards(tmp_path / "shards", garbage_steps=[6])
    message = r"at step 6 is a spike, above .* losses\), and there is no checkpoint to rewind to yet"
    with pytest.raises(tg.TrainingDiverged, match=message):
        run(tiny_args(data, tmp_path / "r", *GUARD, "--checkpoint-interval", "10", steps=12))
    assert [s for s, _ in log_lines(tmp_path / "r", "spike")] == [6]


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint-interval", "0"], "--spike-guard rewinds to the newest checkpoint: give a --checkpoint-interval"),
    (["--spike-threshold", "0"], "--spike-threshold 0.0: give a number of deviations > 0"),
    (["--spike-window", "2"], "--spike-window 2: the median and its deviation need 3 losses or more"),
    (["--max-rewinds", "-1"], "--max-rewinds -1: give 0"),
])
def test_bad_guard_flags_are_errors_before_step_0(tmp_path, flags, message):
    data = spiky_shards(tmp_path / "shards")
    with pytest.raises(tg.TrainError, match=message.replace("(", r"\(")):
        run(tiny_args(data, tmp_path / "r", "--spike-guard", "--checkpoint-interval", "3", *flags))
    assert not (tmp_path / "r" / "log.txt").exists()


def test_a_rewind_under_fsdp_restores_each_ranks_shards(spiked, tmp_path):
    """2 ranks, --shard fsdp: the same spike, rewind and skip as in one process, every rank alike; then the same
    training (losses within 1e-5: the ranks add gradients in another order), so the weights and the AdamW state
    were put back into each rank's shards."""
    tmp, data, _ = spiked
    out = torchrun(args(data, tmp_path / "fsdp", *GUARD, "--shard", "fsdp"))
    assert out.stdout.count("rewind 1 of at most 3: back to") == 1  # rank 0's console
    single = log_lines(tmp / "on", "train")
    fsdp = log_lines(tmp_path / "fsdp", "train")
    assert [s for s, _ in fsdp] == [s for s, _ in single]
    assert [v for _, v in fsdp] == pytest.approx([v for _, v in single], rel=1e-5)
    assert [s for s, _ in log_lines(tmp_path / "fsdp", "spike")] == [8]
    a, b = final_state(tmp_path / "fsdp"), final_state(tmp / "on")
    assert a["loader"]["group_pos"] == 14 and a["spike_guard"]["rewinds"] == 1  # one window per rank per step
    assert_same_parameters(a["model"], b["model"])


# A loss that is not finite (NaN, inf) is a spike too: rewind and skip, not a stop (without the guard it still
# stops, as tests/test_faults.py's crash loop shows). Injected through GPT2_FAULTS at step 8, on the data whose
# step 8 is garbage, so the guarded run must be the same run as `on`: the same rewind to 6, the same skip.

def assert_nan_rewound(log_dir: Path) -> None:
    spikes = log_lines(log_dir, "spike")
    assert len(spikes) == 1 and spikes[0][0] == 8 and np.isnan(spikes[0][1]), spikes
    assert [s for s, _ in log_lines(log_dir, "train")] == [0, 1, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10, 11]
    assert all(np.isfinite(v) for _, v in log_lines(log_dir, "train"))
    state = final_state(log_dir)
    assert state["spike_guard"]["rewinds"] == 1 and all(torch.isfinite(w).all() for w in state["model"].values())


def test_a_nan_loss_is_a_spike(spiked, tmp_path, monkeypatch, capsys):
    tmp, data, _ = spiked
    monkeypatch.setenv(FAULTS_ENV, "nan@8")
    with faults.injected(tg):
        run(args(data, tmp_path / "nan", *GUARD))
    assert "loss is nan: not finite" in capsys.readouterr().out
    assert_nan_rewound(tmp_path / "nan")
    assert log_lines(tmp_path / "nan", "train") == log_lines(tmp / "on", "train")  # bitwise the same run
    assert final_state(tmp_path / "nan")["loader"] == final_state(tmp / "on")["loader"]


def test_a_nan_loss_is_a_spike_under_ddp(spiked, tmp_path, monkeypatch):
    tmp, data, _ = spiked
    monkeypatch.setenv(FAULTS_ENV, "nan@8:1")  # one rank's loss: the all-reduced loss is NaN on both
    out = torchrun(args(data, tmp_path / "ddp", *GUARD), script="tests/faulty_train.py")
    assert out.stdout.count("rewind 1 of at most 3: back to") == 1
    assert_nan_rewound(tmp_path / "ddp")
    single = log_lines(tmp / "on", "train")
    assert [v for _, v in log_lines(tmp_path / "ddp", "train")] == pytest.approx([v for _, v in single], rel=1e-5)


@pytest.mark.parametrize("flags", [["--compile"], ["--dtype", "float16"]], ids=["compile", "float16"])
def test_a_nan_loss_is_a_spike_compiled_and_in_float16(spiked, tmp_path, monkeypatch, flags):
    """float16: the NaN overflows the scaled gradients too; the scaler's skip and halving are undone with the rest
    (its state is in the checkpoint)."""
    tmp, data, _ = spiked
    monkeypatch.setenv(FAULTS_ENV, "nan@8")
    with faults.injected(tg):
        run(args(data, tmp_path / "r", *GUARD, *flags))
    assert_nan_rewound(tmp_path / "r")
    if "float16" in flags:
        state = final_state(tmp_path / "r")
        assert state["scaler"]["scale"] == 2.0 ** 16  # never halved: step 8's overflow was rewound
