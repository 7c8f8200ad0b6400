"""play.ipynb, executed for real: a Jupyter kernel runs it top to bottom on a quick-start run and on a
build-nanogpt log; any cell error fails the test. The committed notebook carries no outputs.

Each execution costs a kernel start and the torch import (~10-30 s on a small CPU).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "play.ipynb"
PROMPT = "Hello, I'm a language model,"  # the notebook's default PROMPT
OFFLINE_MESSAGE = "OpenAI's GPT-2 is not obtainable here (offline?): skipping the comparison"
KERNEL = "build-gpt2-tests"
CELL_TIMEOUT = 300


def venv_kernel(tmp_path: Path, monkeypatch) -> str:
    """A kernelspec that starts this very interpreter, first on JUPYTER_PATH.

    The kernel then imports what the tests import (torch, train_gpt2's dependencies), whatever `python3`
    kernel the machine may have elsewhere; on a fresh CI machine only the venv has ipykernel.
    """
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "build-gpt2 tests", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def execute_notebook(log_dir: Path, tmp_path: Path, monkeypatch) -> str:
    """Run play.ipynb from the repo root on log_dir, offline and headless; return all its text outputs.

    A failing cell raises nbclient's CellExecutionError (with the traceback). The executed copy is kept
    in tmp_path for debugging.
    """
    kernel = venv_kernel(tmp_path, monkeypatch)
    env = {
        "LOG_DIR": str(log_dir),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),  # an empty cache: offline means no GPT-2, even if this machine has one
        "MPLBACKEND": "Agg",
        "IPYTHONDIR": str(tmp_path / "ipython"),  # no user profile or startup files
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the kernel inherits the environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=kernel,
                                     resources={"metadata": {"path": str(REPO)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / "play.executed.ipynb")
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                texts.append(out.text)
            else:  # a display's text, and what a Markdown display renders
                texts += [out.get("data", {})[kind] for kind in ("text/plain", "text/markdown")
                          if kind in out.get("data", {})]
    return "\n".join(texts)


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path.name} was not written"
    assert path.stat().st_size > 1024, f"{path.name} is only {path.stat().st_size} bytes"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"


def shakespeare_args(tmp_path: Path) -> list[str]:
    """--data for the quick start: the repo's input.txt (CI copies it in), else the shared copy; else skip."""
    if (REPO / "input.txt").is_file():
        return []  # the preset's own data=input.txt, with its token cache beside it
    shared = REPO.parent / "shared" / "data" / "input.txt"
    if shared.is_file():
        data = tmp_path / "input.txt"
        shutil.copyfile(shared, data)  # the shared folder is read-only; the token cache goes next to the copy
        return ["--data", str(data)]
    pytest.skip("no tiny Shakespeare: put it at input.txt (or ../shared/data/input.txt) to train the quick start")


def test_notebook_on_a_quick_start_run(tmp_path, monkeypatch):
    """Train the quick-start preset for 4 steps, then run the notebook on that folder."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train_gpt2.py", "--preset", "shakespeare", *shakespeare_args(tmp_path),
           "--max-steps", "4", "--eval-interval", "2", "--log-dir", str(run_dir), "--micro-batch-size", "4",
           "--seq-len", "64", "--total-batch-size", "256", "--device", "cpu",
           "--num-samples", "0"]  # sampling is the notebook's job: keep training short
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (run_dir / "model_00003.pt").is_file()

    text = execute_notebook(run_dir, tmp_path, monkeypatch)

    for name in ("loss.png", "throughput.png", "wpe.png"):
        assert_png(run_dir / name)
    assert not (run_dir / "hellaswag.png").exists()  # the quick start does not evaluate HellaSwag
    assert "No HellaSwag entries" in text
    assert "tokens per step: 256 (--total-batch-size of the checkpoint's run)" in text
    assert "No MFU in the log" in text  # a CPU run logs tokens/s only
    assert re.search(r"^train loss: final \d+\.\d{4} at step 3,", text, re.M), text
    assert re.search(r"^val loss: final \d+\.\d{4} at step 3,", text, re.M), text
    samples = re.findall(rf"^sample (\d+): {re.escape(PROMPT)}", text, re.M)
    assert samples and samples == [str(i) for i in range(len(samples))], text
    assert OFFLINE_MESSAGE in text


def test_notebook_on_a_modern_run(tmp_path, monkeypatch):
    """The quick start's modern twin (RoPE: no wpe to plot; Muon's momentum in the log) for 4 steps; its log then
    gets the lines a run that reached --target-val-loss at step 3 writes."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train_gpt2.py", "--preset", "shakespeare", "--recipe", "modern",
           *shakespeare_args(tmp_path), "--max-steps", "4", "--eval-interval", "2", "--log-dir", str(run_dir),
           "--micro-batch-size", "4", "--seq-len", "64", "--total-batch-size", "256", "--device", "cpu",
           "--num-samples", "0"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " momentum " in (run_dir / "log.txt").read_text()
    with open(run_dir / "log.txt", "a") as f:
        f.write("3 target_tokens 768\n3 target_time 1.500\n")

    text = execute_notebook(run_dir, tmp_path, monkeypatch)

    for name in ("loss.png", "throughput.png"):
        assert_png(run_dir / name)
    assert "recipe modern, optimizer muon, schedule wsd" in text
    assert "target val loss reached at step 3: 768 tokens, 1.5 s of training steps" in text
    assert re.search(r"^val loss: final \d+\.\d{4} at step 3,", text, re.M), text
    assert re.search(rf"^sample 0: {re.escape(PROMPT)}", text, re.M), text
    assert "this run: rotary position embeddings, no learned ones (wpe) to show" in text
    assert "transformer.wpe.weight" not in torch.load(run_dir / "model_00003.pt", weights_only=True)["model"]
    assert not (run_dir / "wpe.png").exists()


def write_build_nanogpt_log(log_dir: Path) -> None:
    """The original build-nanogpt script's log: val and hella every 5 steps and at the last, train every step.

    Steps 15-19 appear twice, as after a resume: the first pass (values no run would reach) must lose to the
    second. The last line is cut short, as by a run killed mid-write.
    """
    log_dir.mkdir()
    lines = []
    for resumed, steps in ((False, range(20)), (True, range(15, 20))):
        for step in steps:
            overwritten = step >= 15 and not resumed
            if step % 5 == 0 or step == 19:
                lines.append(f"{step} val {1.0 if overwritten else 10.0 - 0.3 * step:.4f}")
                lines.append(f"{step} hella {0.9 if overwritten else 0.25 + 0.002 * step:.4f}")
            lines.append(f"{step} train {1.0 if overwritten else 10.5 - 0.3 * step:.6f}")
    lines.append("19 tra")
    (log_dir / "log.txt").write_text("\n".join(lines))


def test_notebook_on_a_build_nanogpt_log(tmp_path, monkeypatch):
    """No checkpoint, no throughput lines: every panel with data, plain messages for the rest."""
    log_dir = tmp_path / "log"
    write_build_nanogpt_log(log_dir)

    text = execute_notebook(log_dir, tmp_path, monkeypatch)

    assert_png(log_dir / "loss.png")
    assert_png(log_dir / "hellaswag.png")
    assert not (log_dir / "throughput.png").exists()
    assert not (log_dir / "wpe.png").exists()
    assert "No checkpoint (model_*.pt) in" in text and "nothing to sample from" in text
    assert "No throughput data" in text
    assert "tokens per step: 524,288 = 2**19" in text
    assert "skipped 1 line(s)" in text
    # the resumed pass wins: final, min and max come from its values, never from the overwritten ones
    assert "train loss: final 4.8000 at step 19, min 4.8000 at step 19" in text
    assert "val loss: final 4.3000 at step 19, min 4.3000 at step 19" in text
    assert "HellaSwag acc_norm: final 0.2880 at step 19, max 0.2880 at step 19" in text
    assert OFFLINE_MESSAGE in text
    assert "sample 0:" not in text


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [], f"outputs committed in cell {cell.get('id')}"
        assert cell.execution_count is None, f"execution count committed in cell {cell.get('id')}"
    params = next(cell for cell in code_cells if "parameters" in cell.metadata.get("tags", []))
    assert 'os.environ.get("LOG_DIR", "log")' in params.source
    assert f'PROMPT = "{PROMPT}"' in params.source
