"""The one loader of config files and overrides, for every command and every config tree.

- `read_data_file`: a YAML or JSON file, its syntax errors reported as `file:line`.
- `load_python`: a `.py` file's module, its import errors reported naming the file.
- `build`: a dataclass tree from a mapping, every value checked against its field's type.
- `apply_overrides`: `key.sub=value` overrides, each coerced to its field's type.

The dataclass field types are the schema: a `Literal` lists the accepted values, nothing else does.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from sparrow_megatron.errors import UserError


def read_data_file(path: str | Path, what: str = "file") -> Any:
    """The parsed content of a YAML (.yaml / .yml) or JSON (any other suffix) file; errors name the
    file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"{path}: cannot read {what} ({err.strerror})") from None
    try:
        return yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None


def load_python(path: str | Path, what: str = "recipe") -> types.ModuleType:
    """A Python config file imported as a module (not on sys.path, not cached)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    spec = importlib.util.spec_from_file_location(f"_sparrow_{what}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{path}: the {what} failed to import ({type(err).__name__}: {err})") from err
    return module


# ---------------------------------------------------------------------------------------------------
# Values checked against the field types.


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, name: str, source: str) -> Any:
    """`value` (from YAML/JSON, a Python recipe or a parsed override) checked and converted to `tp`."""

    def bad() -> UserError:
        return UserError(f"{source}: field '{name}': expected {type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            value = dataclasses.asdict(value)  # re-checked: dataclasses do not check their types
        if not isinstance(value, dict):
            raise UserError(f"{source}: field '{name}': expected a mapping, got {value!r}")
        return build(tp, value, source, name + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, name, source)
            except UserError:
                pass
        raise bad()
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad()
        (item,) = typing.get_args(tp)
        return [coerce(v, item, f"{name}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise bad()
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(args) != len(value):
            raise bad()
        return tuple(
            coerce(v, a, f"{name}[{i}]", source) for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if tp is Path:
        if not isinstance(value, str | Path):
            raise bad()
        return Path(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        kt, vt = typing.get_args(tp)
        return {coerce(k, kt, name, source): coerce(v, vt, f"{name}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"config field '{name}' has an unsupported type {tp}")  # a bug in the config tree


def build(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    """A `cls` dataclass tree from a (possibly partial) nested mapping; missing fields keep defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        listed = ", ".join(f"'{prefix}{k}'" for k in unknown)
        raise UserError(f"{source}: unknown field(s) {listed}; known: {', '.join(sorted(names))}")
    return cls(**{k: coerce(v, hints[k], prefix + k, source) for k, v in data.items()})


# ---------------------------------------------------------------------------------------------------
# key.sub=value overrides.

_BOOL_WORDS = {
    "true": True, "yes": True, "on": True, "1": True,
    "false": False, "no": False, "off": False, "0": False,
}  # fmt: skip


def parse_text(text: str, tp: Any, item: str) -> Any:
    """An override's text turned into a value of `tp` (then checked by `coerce`)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.strip().lower() in ("none", "null", "~") and len(args) < len(typing.get_args(tp)):
            return None
        if len(args) == 1:
            return parse_text(text, args[0], item)
    if tp is str or (origin is Literal and all(isinstance(a, str) for a in typing.get_args(tp))):
        return text
    if tp is bool:
        word = text.strip().lower()
        if word not in _BOOL_WORDS:
            raise UserError(f"override '{item}': expected a boolean (true/false), got {text!r}")
        return _BOOL_WORDS[word]
    if tp is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise UserError(f"override '{item}': expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"override '{item}': expected a number, got {text!r}") from None
    if tp is Path:
        return text
    if origin in (list, tuple):
        stripped = text.strip()
        if not stripped.startswith(("[", "(")):
            args = typing.get_args(tp)
            parts = [p.strip() for p in stripped.split(",") if p.strip()]
            items = args[:1] * len(parts) if origin is list or args[-1:] == (Ellipsis,) else args
            if len(items) != len(parts):
                raise UserError(f"override '{item}': expected {len(items)} comma-separated values")
            return [parse_text(p, t, item) for p, t in zip(parts, items, strict=True)]
        if stripped.startswith("("):
            text = "[" + stripped[1:-1] + "]" if stripped.endswith(")") else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"override '{item}': cannot parse the value ({err})") from None


def apply_overrides(
    root: Any,
    overrides: Sequence[str],
    source: str = "override",
    settable: Callable[[str], bool] = lambda name: True,
    copy_root: Callable[[Any], Any] = copy.deepcopy,
) -> Any:
    """A copy of the dataclass tree `root` with `key.sub=value` overrides applied, each coerced to its
    field's type. `settable(field_name)` hides fields that cannot come from the command line;
    `copy_root` makes the copy that shares nothing mutable with the input."""
    root = copy_root(root)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"{source} '{item}': expected key.sub=value (e.g. trainer.tp=4)")
        parts = key.split(".")
        target: Any = root
        for depth, part in enumerate(parts):
            hints = {k: v for k, v in typing.get_type_hints(type(target)).items() if settable(k)}
            if part not in hints:
                where_ = ".".join(parts[:depth]) or "the top level"
                raise UserError(
                    f"{source} '{item}': unknown field '{key}' ({where_} has: {', '.join(sorted(hints))})"
                )
            tp = hints[part]
            if depth < len(parts) - 1:
                if not dataclasses.is_dataclass(tp):
                    raise UserError(
                        f"{source} '{item}': field '{'.'.join(parts[: depth + 1])}' has no sub-fields"
                    )
                target = getattr(target, part)
                continue
            if dataclasses.is_dataclass(tp):
                raise UserError(f"{source} '{item}': field '{key}' is a section; set one of its fields")
            value = coerce(parse_text(text, tp, item), tp, key, f"{source} '{item}'")
            root = _replaced(root, parts, value)
    return root


def _replaced(obj: Any, parts: list[str], value: Any) -> Any:
    """A copy of the dataclass `obj` with the field at `parts` set; works for frozen dataclasses too."""
    if len(parts) == 1:
        return dataclasses.replace(obj, **{parts[0]: value})
    return dataclasses.replace(obj, **{parts[0]: _replaced(getattr(obj, parts[0]), parts[1:], value)})
