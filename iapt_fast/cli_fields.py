"""Command-line options generated from dataclass fields: one definition of each option.

A field says how it appears on the command line through its metadata (``cli(...)``): its help
text, and where needed its flag, choices, group or that it is not an option at all. The type
comes from the field's annotation: ``int``, ``float``, ``str`` (each optionally ``| None``),
``bool`` (a switch: ``--name`` when the default is False, ``--no-name`` when it is True),
``tuple[int, int]`` / ``tuple[float, float]`` ("a,b") and ``list[int] | None`` ("1,2,3").
Values are only parsed here; the dataclass validates them when it is built, and its error
names the flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any, Callable, Sequence

__all__ = ["cli", "add_dataclass_arguments", "dataclass_kwargs", "flag_of", "name_flags"]


def cli(help: str, *, flag: str | None = None, choices: Sequence[str] | None = None, group: str | None = None,
        required: bool = False, skip: bool = False) -> dict[str, Any]:
    """Field metadata for :func:`add_dataclass_arguments` (``skip``: not a command-line option)."""
    return {"cli": {"help": help, "flag": flag, "choices": tuple(choices) if choices else None, "group": group,
                    "required": required, "skip": skip}}


def _spec(f: dataclasses.Field) -> dict[str, Any] | None:
    spec = f.metadata.get("cli")
    return None if spec is None or spec["skip"] or not f.init else spec


def flag_of(f: dataclasses.Field) -> str:
    spec = _spec(f) or {}
    if spec.get("flag"):
        return spec["flag"]
    name = f.name.replace("_", "-")
    if _kind(f) == "bool" and f.default is True:
        return f"--no-{name}"
    return f"--{name}"


def _kind(f: dataclasses.Field) -> str:
    t = str(f.type).replace(" ", "")
    for kind in ("tuple[int,int]", "tuple[float,float]", "list[int]", "bool", "int", "float", "str"):
        if t.startswith(kind):
            return kind
    raise TypeError(f"field {f.name} has a type the command line does not know: {f.type}")


def _numbers(kind: Callable[[str], Any], count: int | None) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if count is not None and len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated values, got {text!r}")
        return tuple(values) if count is not None else values
    return parse


_PARSERS = {"int": int, "float": float, "str": str, "tuple[int,int]": _numbers(int, 2),
            "tuple[float,float]": _numbers(float, 2), "list[int]": _numbers(int, None)}


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type,
                            groups: dict[str, Any] | None = None, default_group: Any = None) -> None:
    """Add an option for every field of ``cls`` that has ``cli`` metadata.

    Args:
        groups: argument groups by name (fields with ``group=`` go there).
        default_group: where the other fields go (default: ``parser``).
    """
    groups = groups or {}
    for f in dataclasses.fields(cls):
        spec = _spec(f)
        if spec is None:
            continue
        target = groups.get(spec["group"], default_group or parser)
        kind = _kind(f)
        kwargs: dict[str, Any] = {"dest": f.name, "help": spec["help"]}
        if kind == "bool":
            kwargs["action"] = "store_false" if f.default is True else "store_true"
        else:
            kwargs["type"] = _PARSERS[kind]
            if spec["choices"]:
                kwargs["choices"] = spec["choices"]
            if spec["required"]:
                kwargs["required"] = True
            else:
                kwargs["default"] = f.default if f.default is not dataclasses.MISSING else None
        target.add_argument(flag_of(f), **kwargs)


def dataclass_kwargs(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``cls`` that came from the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if _spec(f) is not None}


def name_flags(message: str, *classes: type) -> str:
    """``message`` with the field names of ``classes`` replaced by their flags (for errors)."""
    for cls in classes:
        for f in dataclasses.fields(cls):
            if _spec(f) is not None:
                message = re.sub(rf"(?<![\w-]){re.escape(f.name)}(?![\w])", flag_of(f).replace("--no-", "--"), message)
    return message
