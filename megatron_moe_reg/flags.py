"""Typed dataclasses <-> command-line flags and TOML config files.

Each dataclass field becomes one flag named like Megatron-LM's (``num_layers`` ->
``--num-layers``). Field metadata may set ``help``, ``choices``, ``aliases`` (extra flag
names) and ``negative`` (a flag that stores False, e.g. ``--disable-bias-linear``). A boolean gets
``--X`` / ``--no-X``, except a field named ``no_X`` (Megatron-LM's ``--no-load-optim``): one flag
that sets it.
A config file (TOML, keys are flag names with ``-`` or ``_``) sets defaults; flags on
the command line override it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from megatron_moe_reg.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def opt(default: Any, help: str = "", **meta: Any) -> Any:
    """A dataclass field that is a flag: its default (a list default is copied per instance), help and
    metadata (``choices``, ``aliases``, ``negative``, ``flag``, ``parser``)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def field_flag(f: dataclasses.Field) -> str:
    """A field's flag: ``flag`` in its metadata (Megatron-LM's flag of another dest), else from its name."""
    return f.metadata.get("flag") or flag_name(f.name)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _literal_list(text: str) -> list:
    value = ast.literal_eval(text)
    if not isinstance(value, (list, tuple)):
        raise ValueError(text)
    return list(value)


def _int_or_list(text: str) -> int | list[int]:
    """``moe_layer_freq``: an int, or a Python list literal such as ``[1,0,1,0]``."""
    text = text.strip()
    if text.startswith("[") or text.startswith("("):
        return [int(v) for v in _literal_list(text)]
    return int(text)


def _float_or_list(text: str) -> float | list[float]:
    text = text.strip()
    if text.startswith("["):
        return [float(v) for v in _literal_list(text)]
    return float(text)


_PARSERS = {"int_or_list": _int_or_list, "float_or_list": _float_or_list}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """Add one argparse group with a flag per field of dataclass ``cls``."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        names = [field_flag(f), *meta.get("aliases", ())]
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta.get("help", ""), "default": argparse.SUPPRESS}
        tp, _optional = _unwrap_optional(hints[f.name])
        if tp is bool and names[0].startswith("--no-"):  # Megatron-LM's store_true ``--no-X`` flags
            group.add_argument(*names, action="store_true", **kwargs)  # (BooleanOptionalAction reads False)
            continue
        if tp is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
            if "negative" in meta:
                group.add_argument(
                    meta["negative"],
                    dest=f.name,
                    action="store_false",
                    default=argparse.SUPPRESS,
                    help=f"same as --no-{flag_name(f.name)[2:]}",
                )
            continue
        if "parser" in meta:
            kwargs["type"] = _PARSERS[meta["parser"]]
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            kwargs["type"] = item
            kwargs["nargs"] = "+"
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            raise TypeError(f"unsupported flag type {tp} for {cls.__name__}.{f.name}")
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        kwargs["metavar"] = meta.get("metavar")
        group.add_argument(*names, **kwargs)


def _coerce(value: Any, tp: Any, meta: Mapping[str, Any], flag: str) -> Any:
    """Check and convert a value read from a config file to the field's type."""
    base, optional = _unwrap_optional(tp)
    if value is None and optional:
        return None
    if "parser" in meta and isinstance(value, str):
        return _PARSERS[meta["parser"]](value)
    if "parser" in meta:
        return value
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [value]
        (item,) = typing.get_args(base)
        if isinstance(value, list) and all(isinstance(v, item) for v in value):
            return value
    elif isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{flag} expects {getattr(base, '__name__', base)}, got {value!r}")


def load_config_file(path: str, classes: Iterable[type]) -> dict[str, Any]:
    """Read a TOML config file into ``{field_name: value}``, checking names and types."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    fields, by_flag = {}, {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            fields[f.name] = (hints[f.name], f.metadata)
            by_flag[field_flag(f)[2:].replace("-", "_")] = f.name
    out: dict[str, Any] = {}
    for section_or_key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(section_or_key, value)]
        for key, v in items:
            name = by_flag.get(key.replace("-", "_"), key.replace("-", "_"))
            if name not in fields:
                raise ConfigError(
                    f"--config {path}: unknown option '{key}' (use the flag names of "
                    "'moe-reg pretrain --help' without the leading dashes)"
                )
            tp, meta = fields[name]
            out[name] = _coerce(v, tp, meta, flag_name(name))
    return out


def reject_non_finite(options: Any) -> None:
    """Every float option of a dataclass instance is a finite number (nan and inf parse as floats)."""
    hints = typing.get_type_hints(type(options))
    for f in dataclasses.fields(options):
        base, _ = _unwrap_optional(hints[f.name])
        value = getattr(options, f.name)
        values = value if isinstance(value, list) else [value]
        if (base is float or f.metadata.get("parser") == "float_or_list") and any(
            isinstance(v, float) and not math.isfinite(v) for v in values
        ):
            raise ConfigError(f"{field_flag(f)} must be a finite number, got {value}")


def build_dataclass(cls: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports errors on one line, without the long usage block."""

    def error(self, message: str) -> typing.NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)
