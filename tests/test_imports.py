"""Importing a script does nothing: no files, no network, no process group; just a `main` to call. The same for
the model and every supporting module, each imported first (with none of the project's modules loaded before it):
no import circle, no side effect.

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
SCRIPTS = ["train_gpt2", "fineweb", "hellaswag", "eval_suite"]  # what a user runs: each has a main()
LIBRARIES = ["gpt2", "support", *sorted(f"support.{p.stem}" for p in (ROOT / "support").glob("*.py")
                                       if p.stem != "__init__")]
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
    ours = lambda name: name.split(".")[0] in ("support", "gpt2", "train_gpt2", "fineweb", "hellaswag", "eval_suite")
    files, mains = [], []
    for name in sys.argv[2].split(","):  # each first in its interpreter: the project's modules unloaded between
        for loaded in [m for m in sys.modules if ours(m)]:
            del sys.modules[loaded]
        module = importlib.import_module(name)
        files.append(module.__file__)
        mains.append(callable(getattr(module, "main", None)))
    import torch.distributed as dist

    print(json.dumps({
        "files": files,
        "main_callable": all(mains),
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


def module_file(name: str) -> Path:
    path = ROOT / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


@pytest.mark.parametrize("name", [*SCRIPTS, ",".join(LIBRARIES)], ids=[*SCRIPTS, "libraries"])
def test_import_has_no_side_effects(tmp_path, name):
    """name: a module, or several (comma-separated), each imported first with none of the project's loaded."""
    names = name.split(",")
    for n in names:
        if not module_file(n).is_file():
            pytest.fail(f"{module_file(n)} does not exist yet in {ROOT}")
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
    assert [Path(f).resolve() for f in result["files"]] == [module_file(n).resolve() for n in names]  # the repo's
    assert result["main_callable"] or name not in SCRIPTS, f"{name} has no callable main()"
    assert not result["dist_initialized"], f"importing {name} initialized a torch.distributed process group"
    assert list(cwd.iterdir()) == [], f"importing {name} wrote into the working directory: {list(cwd.iterdir())}"
    # only what appeared counts: other people may be editing (or deleting) files in the repo meanwhile
    new_status, new_files = sorted(status_after - status_before), sorted(files_after - files_before)
    assert not new_status, f"importing {name} changed the repo: {new_status}"
    assert not new_files, f"importing {name} created files: {new_files}"


def test_every_supporting_module_says_what_it_is_for():
    """Each supporting module opens with a docstring, and support/__init__.py's map names every one of them."""
    import importlib

    index = importlib.import_module("support").__doc__
    for name in LIBRARIES[2:]:
        module = importlib.import_module(name)
        assert module.__doc__ and len(module.__doc__.split()) >= 8, f"{name} has no docstring that says what it is for"
        assert f"{name.split('.')[1]}.py" in index, f"support/__init__.py does not list {name}"
