"""
A technical text the modern recipe's quick-start values were chosen on, beside tiny Shakespeare, the King James
Bible and the section-3 manual pages: the documentation of Python's standard library (each module's docstring,
then its classes', functions' and methods' with their signatures), then numpy's functions', cut to tiny
Shakespeare's 1,115,394 bytes. Built offline from what is installed, so the same Python and numpy give the same
text.

    python bench/docs_text.py docs.txt
    python bench/bench_recipe.py --data docs.txt

The recipe's claims are then checked on text that none of its values were chosen on (docs/fast-track.md).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the modules live one level up

from support.files import atomic_write  # noqa: E402

SHAKESPEARE_BYTES = 1_115_394
SKIPPED = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "pydoc_data",
           "ensurepip", "venv"}  # side effects on import, a GUI, or tests rather than documentation


def signature(obj) -> str:
    """obj's signature as Python prints it, the same on every machine: a default of os.environ by its name (not
    this machine's variables), objects without their addresses."""
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):  # builtins without text signatures
        return ""
    return re.sub(r" at 0x[0-9a-f]+", "", text.replace(repr(os.environ), "os.environ"))


def module_sections(name: str, seen: set[int]):
    """A module's documentation: its docstring, then each public class and function it defines (a class followed
    by its methods), each under its dotted name and signature."""
    try:
        module = importlib.import_module(name)
    except Exception:  # a platform-only module (winreg, ...): nothing to document here
        return
    if not inspect.getdoc(module):
        return
    yield f"Module {name}\n\n{inspect.getdoc(module)}\n\n"
    for attr, obj in sorted(vars(module).items()):
        kind = inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)
        if attr.startswith("_") or not kind or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not inspect.getdoc(obj) or id(obj) in seen:  # seen: a name bound twice is documented once
            continue
        seen.add(id(obj))
        yield f"{name}.{attr}{signature(obj)}\n\n{inspect.getdoc(obj)}\n\n"
        for meth, fn in sorted(vars(obj).items()) if inspect.isclass(obj) else []:
            if meth.startswith("_") or not callable(fn) or not fn.__doc__ or id(fn) in seen:
                continue
            seen.add(id(fn))
            yield f"{name}.{attr}.{meth}{signature(fn)}\n\n{inspect.cleandoc(fn.__doc__)}\n\n"


def numpy_sections():
    import numpy as np
    for attr in sorted(dir(np)):
        obj = getattr(np, attr)
        if not attr.startswith("_") and callable(obj) and obj.__doc__:
            yield f"numpy.{attr}\n\n{inspect.cleandoc(obj.__doc__)}\n\n\n"


def docs_text(size: int = SHAKESPEARE_BYTES) -> str:
    """The text's first `size` bytes (whole characters): the standard library's sections, then numpy's as far as
    needed (the standard library alone is about 980 kB)."""
    warnings.filterwarnings("ignore")  # deprecated modules say so on import
    seen: set[int] = set()
    names = sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m not in SKIPPED)
    text = "\n".join(section for name in names for section in module_sections(name, seen))
    parts, total = [text], len(text.encode())
    for section in numpy_sections() if total < size else ():
        parts.append(section)
        total += len(section.encode())
        if total >= size:
            break
    return "".join(parts).encode()[:size].decode(errors="ignore")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("out", help="the text file to write")
    p.add_argument("--bytes", type=int, default=SHAKESPEARE_BYTES, help="its size (tiny Shakespeare's, 1,115,394)")
    args = p.parse_args(argv)
    text = docs_text(args.bytes)
    with atomic_write(args.out) as tmp:
        tmp.write_text(text)
    print(f"wrote {args.out}: {len(text.encode()):,} bytes")


if __name__ == "__main__":
    main()
