"""Command-line flags from settings dataclasses: every field is a --kebab-case flag, its comment the --help text,
and a field that is itself a dataclass (a group of settings, e.g. TrainConfig.checkpoint) adds its fields as flags
of the same command, by their own names."""

from __future__ import annotations

import argparse
import dataclasses


def field_help(cls) -> dict[str, str]:
    """The comment after each field of a dataclass: one source of truth for defaults and --help."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    source = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    fields = [node for node in ast.parse(source).body[0].body if isinstance(node, ast.AnnAssign)]
    return {node.target.id: comments[node.end_lineno] for node in fields if node.end_lineno in comments}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, unset_is_absent: bool = False,
                        extra: dict[str, dict] | None = None) -> None:
    """Every field of the dataclass cls becomes a --kebab-case flag, its comment the help text.

    bool fields get --x/--no-x, list fields take several values. unset_is_absent leaves flags that
    were not given out of the namespace (so a preset can fill them). extra: per-field argparse
    overrides; its "aliases" entry adds other names for the flag (e.g. -m, or a flag's old name).
    """
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):  # a group of settings of its own: its fields are flags
            add_dataclass_flags(parser, f.default_factory, unset_is_absent, extra)
            continue
        kw = dict((extra or {}).get(f.name, {}))
        flags = ["--" + f.name.replace("_", "-"), *kw.pop("aliases", [])]
        given = "default" in helps.get(f.name, "") or f.default == ""
        default_text = "" if given else f" (default: {f.default})"
        kw.setdefault("help", helps.get(f.name, "") + default_text)
        kw["default"] = argparse.SUPPRESS if unset_is_absent else f.default
        kw["dest"] = f.name
        kind = f.type.split(" |")[0]
        if kind == "bool":
            kw.setdefault("action", argparse.BooleanOptionalAction)
        elif kind.startswith("list"):
            kw.setdefault("nargs", "+")
        elif "nargs" not in kw or kw["nargs"] != 0:
            kw.setdefault("type", {"int": int, "float": float}.get(kind, str))
        parser.add_argument(*flags, **kw)


def flat_fields(settings) -> dict:
    """A settings dataclass's fields by name, those of its groups (nested dataclasses) included, as the flags see
    them: {"max_lr": 6e-4, ..., "keep_last": 0, ...}."""
    out = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        out.update(flat_fields(value) if dataclasses.is_dataclass(value) else {f.name: value})
    return out


def as_flag(name: str, value) -> str:
    """A field's value as the flag that sets it: --qk-norm, --no-bias, --muon-lr 0.02."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value}"
