"""bench/smoke.sh on the CPU, as CI runs it: every entry point end to end, tiny shapes, no network; all its stages,
and its --quick mode (a GPU's first check: each entry point once)."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ["env", "train", "sample", "hellaswag", "export", "resume", "modern", "modern_resume", "float16_ac", "fsdp",
          "bench_train", "bench_hellaswag", "bench_generate"]
QUICK = [s for s in STAGES if s not in ("float16_ac", "fsdp", "bench_train")]


def smoke(tmp_path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env |= {"PYTHON": sys.executable, "SMOKE_DIR": str(tmp_path / "smoke"), "OMP_NUM_THREADS": "2"}
    out = subprocess.run(["bash", "bench/smoke.sh", *args, "cpu"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    return out.stdout


def stages(text: str) -> list[str]:
    """The stages that ran, each with its time: `== NAME: ok (N s)`."""
    return [m[0] for m in re.findall(r"^== (\w+): (ok|FAILED) \(\d+ s\)$", text, re.M)]


def test_smoke_script_runs_every_stage_on_the_cpu(tmp_path):
    text = smoke(tmp_path)
    assert stages(text) == STAGES, text[-4000:]
    assert re.search(r"^smoke: all stages ok on cpu in \d+ s$", text.rstrip().splitlines()[-1])
    # what the stages measured
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in text  # the kernel the training shapes take
    assert re.search(r"^step 11/12 \(91\.7%\) \| HellaSwag acc_norm [\d.]+ \| \d+/24 right$", text, re.M)
    assert re.search(r"^peak memory [\d.]+ GiB \(resident\)$", text, re.M)
    assert "resuming from" in text and "at step 12" in text
    assert re.search(r"^recipe modern, its general values: --pos-emb rope ", text, re.M)  # and the resume's
    assert re.search(r"^optimizer muon: AdamW .*; Muon on the blocks' \d+ matrices", text, re.M)
    assert re.search(r"^resuming from \S+/modern/model_00003\.pt at step 4$", text, re.M)
    assert re.search(r"^step 5/6 \(83\.3%\) \| loss [\d.]+ \| lr [\d.e+-]+ \| momentum 0\.85\d+ \|", text, re.M)
    assert re.search(r"^hellaswag val: 24 examples \| acc [\d.]+ \| acc_norm [\d.]+$", text, re.M)
    assert (tmp_path / "smoke" / "hf" / "model.safetensors").is_file()
    assert re.search(r"^\| 4 \| off \| gpt2 \| 64 \| ddp \| off \| auto \| [\d.]+ \| [\d.]+x \|", text, re.M)  # chunked
    assert re.search(r"^peak memory per rank [\d.]+, [\d.]+ GiB \(resident\)$", text, re.M)  # the fsdp stage
    assert "same predictions: acc 100%, acc_norm 100%" in text and "same tokens both ways: yes" in text
