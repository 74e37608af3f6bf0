"""Typed configuration: dataclasses hold the schema and defaults, YAML files override them.

One mechanism for every package: `load(RunConfig, "configs/debug_cpu.yaml", ["model.depth=4"])`
reads a YAML file (optionally chained to a `base:` file), applies dotted overrides and builds
the (frozen) dataclass tree, rejecting unknown keys and wrong types with one line that names the
key, the file and the fix. `to_dict` / `dumps_yaml` / `save` write the resolved tree back out so
that `load(cls, saved_file) == cfg`.

Supported field types: bool, int, float, str, None unions (`int | None`), `Literal[...]`,
`tuple[T, ...]`, `tuple[A, B]`, `list[T]`, `dict[str, T]` and nested dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mmdit.atomic_file import write_atomic

T = TypeVar("T")

BASE_KEY = "base"  # a file may name one parent file (relative to itself) that it overrides


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming the key, the source and a fix."""


# --------------------------------------------------------------------------------------------
# YAML reading: PyYAML (YAML 1.1) reads `1e-4` as a string and silently keeps the last of two
# duplicate keys; both are common ways to lose a learning rate, so the loader fixes both.


class _StrictLoader(yaml.SafeLoader):
    pass


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping_no_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"duplicate key {key!r} at line {key_node.start_mark.line + 1}; "
                "keep only one of them"
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_no_duplicates
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({_one_line(e)})") from None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def read_file(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML/JSON config file into a dict, merging it over its `base:` file if any."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file '{path}' not found (looked at {path.resolve()}); "
            "pass an existing YAML file, e.g. --config configs/debug_cpu.yaml"
        )
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, resolved))
        raise ConfigError(f"{path}: 'base' files form a cycle ({cycle}); break the cycle")
    data = parse_yaml(path.read_text(), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"
        )
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file path string, got {base!r}")
    parent = read_file(path.parent / base, (*_chain, resolved))
    return merge(parent, data)


def merge(base: Mapping, override: Mapping) -> dict:
    """Recursive dict merge; values of `override` win, nested mappings merge key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# dict -> dataclass, with type checking


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _suggest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "<dict>") -> T:
    """Build dataclass `cls` from a plain mapping, checking keys and types recursively."""
    return _build_dataclass(cls, data, source, prefix="")


def _build_dataclass(cls: type, data: Any, source: str, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: '{where}' must be a mapping of {cls.__name__} fields, "
            f"got {type(data).__name__} {data!r}"
        )
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            known = sorted(fields)
            raise ConfigError(
                f"{source}: unknown key '{prefix}{key}'; {_suggest(str(key), known)}"
                f"known keys in {where}: {', '.join(known)}"
            )
    kwargs = {
        name: _convert(hints[name], data[name], source, f"{prefix}{name}")
        for name in fields
        if name in data
    }
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: invalid '{where}': {_one_line(e)}") from None


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    def wrong(expected: str | None = None) -> ConfigError:
        expected = expected or _type_name(tp)
        return ConfigError(
            f"{source}: '{key}' must be {expected}, got {type(value).__name__} {value!r}; "
            "fix the value in the file or override"
        )

    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, source, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise wrong()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, source, key)
            except ConfigError:
                continue
        raise wrong(" or ".join(_type_name(a) for a in args))
    if origin is typing.Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise wrong("one of " + ", ".join(repr(a) for a in args))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong(f"a list ({_type_name(tp)})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise wrong(f"a list of {len(args)} items ({_type_name(tp)})")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_convert(a, v, source, f"{key}[{i}]") for i, (a, v) in pairs)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise wrong(f"a list ({_type_name(tp)})")
        return [_convert(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise wrong(f"a mapping ({_type_name(tp)})")
        return {
            _convert(args[0], k, source, f"{key}.{k}"): _convert(args[1], v, source, f"{key}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong("a string (quote it)")
    raise ConfigError(f"{source}: '{key}' has unsupported schema type {_type_name(tp)}")


# --------------------------------------------------------------------------------------------
# dataclass -> plain data


def to_dict(obj: Any) -> Any:
    """The resolved tree as plain dicts/lists/scalars (tuples become lists), YAML/JSON ready."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dumps_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None)


def dumps_json(obj: Any) -> str:
    return json.dumps(to_dict(obj), indent=2)


def save(obj: Any, path: str | os.PathLike) -> Path:
    """Write the resolved tree to `path` (.json or .yaml) atomically: a reader never sees half."""
    path = Path(path)
    return write_atomic(path, dumps_json(obj) if path.suffix == ".json" else dumps_yaml(obj))


# --------------------------------------------------------------------------------------------
# dotted overrides and the one-call loader


def _field_type(cls: type, dotted: list[str], override: str) -> Any:
    tp: Any = cls
    for depth, part in enumerate(dotted):
        if not dataclasses.is_dataclass(tp):
            where = ".".join(dotted[:depth])
            raise ConfigError(f"override '{override}': '{where}' is a value, not a section")
        hints = _type_hints(tp)
        if part not in hints:
            known = sorted(f.name for f in dataclasses.fields(tp) if f.init)
            where = ".".join(dotted[:depth]) or "the top level"
            raise ConfigError(
                f"override '{override}': unknown key '{'.'.join(dotted[: depth + 1])}'; "
                f"{_suggest(part, known)}known keys in {where}: {', '.join(known)}"
            )
        tp = hints[part]
    return tp


def _accepts_plain_string(tp: Any) -> bool:
    if tp is str:
        return True
    args = typing.get_args(tp)
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and str in args


def apply_overrides(cls: type, data: Mapping, overrides: Sequence[str]) -> dict:
    """Apply `a.b.c=value` strings to a raw dict; values are YAML (lists, null, 3e-4 ...)."""
    out = dict(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(
                f"override '{override}' is not of the form section.key=value (e.g. model.depth=12)"
            )
        parts = key.split(".")
        tp = _field_type(cls, parts, override)
        if _accepts_plain_string(tp) and raw.strip() not in ("null", "~"):
            value: Any = raw  # a path or name stays verbatim, even if it looks like a number
        else:
            value = parse_yaml(raw, f"override '{override}'")
        _set_nested(out, parts, value)
    return out


def apply_dotted(cls: type, data: Mapping, values: Mapping[str, Any], source: str) -> dict:
    """Apply a mapping of dotted keys to already-parsed values (`{"train.lr": 3e-4}`, as a
    YAML file writes them) to a raw dict; unknown keys fail like overrides do."""
    out = dict(data)
    for key, value in values.items():
        parts = str(key).split(".")
        if any(not p for p in parts):
            raise ConfigError(f"{source}: '{key}' is not a dotted key such as train.lr")
        _field_type(cls, parts, f"{source}: {key}")
        _set_nested(out, parts, value)
    return out


def _set_nested(out: dict, parts: list[str], value: Any) -> None:
    node = out
    for part in parts[:-1]:
        child = node.get(part)
        child = dict(child) if isinstance(child, Mapping) else {}
        node[part] = child
        node = child
    node[parts[-1]] = value


def load(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Defaults of `cls`, overridden by the file at `path` (if any), then by `overrides`."""
    data = read_file(path) if path is not None else {}
    data = apply_overrides(cls, data, overrides)
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        source += " + overrides"
    return from_dict(cls, data, source=source)


def add_config_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The `--config FILE [section.key=value ...]` pair every entry point shares."""
    parser.add_argument(
        "--config",
        required=required,
        metavar="FILE",
        help="YAML run file; it overrides only what differs from the defaults "
        "(see configs/). A file may name a parent with 'base: other.yaml'.",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="dotted overrides applied after the file, e.g. model.depth=4 train.lr=3e-4",
    )


def config_from_args(cls: type[T], args: argparse.Namespace, parser: argparse.ArgumentParser) -> T:
    """Load `cls` from parsed `add_config_arguments` args; a ConfigError exits with one line."""
    try:
        return load(cls, args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
