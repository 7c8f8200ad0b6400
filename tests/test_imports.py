"""Importing a script does nothing: no files, no network, no process group; just a `main` to call.

Each module is imported in a fresh interpreter whose working directory is an empty temporary folder,
with sockets that refuse to connect and Hugging Face set offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["train_gpt2", "fineweb", "hellaswag", "eval_suite"]
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}

CHILD = textwrap.dedent(
    """
    import json, socket, sys

    def refuse(*args, **kwargs):
        raise OSError("network access during import")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    sys.path.insert(0, sys.argv[1])

    import importlib
    module = importlib.import_module(sys.argv[2])
    import torch.distributed as dist

    print(json.dumps({
        "file": module.__file__,
        "main_callable": callable(getattr(module, "main", None)),
        "dist_initialized": dist.is_available() and dist.is_initialized(),
    }))
    """
)


def git_status() -> set[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return {line for line in out.splitlines() if "__pycache__" not in line}


def repo_files() -> set[str]:
    """Every file under the repo, ignored folders (log/, data shards, ...) included, minus the big/cache ones."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        found.update(os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames)
    return found


@pytest.mark.parametrize("name", MODULES)
def test_import_has_no_side_effects(tmp_path, name):
    if not (ROOT / f"{name}.py").is_file():
        pytest.fail(f"{name}.py does not exist yet in {ROOT}")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PYTHONPATH")}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1"}

    status_before, files_before = git_status(), repo_files()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), name], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    status_after, files_after = git_status(), repo_files()

    assert proc.returncode == 0, f"importing {name} failed:\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).resolve() == (ROOT / f"{name}.py").resolve()  # the repo's, not another copy
    assert result["main_callable"], f"{name} has no callable main()"
    assert not result["dist_initialized"], f"importing {name} initialized a torch.distributed process group"
    assert list(cwd.iterdir()) == [], f"importing {name} wrote into the working directory: {list(cwd.iterdir())}"
    # only what appeared counts: other people may be editing (or deleting) files in the repo meanwhile
    new_status, new_files = sorted(status_after - status_before), sorted(files_after - files_before)
    assert not new_status, f"importing {name} changed the repo: {new_status}"
    assert not new_files, f"importing {name} created files: {new_files}"
