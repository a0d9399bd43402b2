"""Reading config values, for every config (ModelConfig, TrainConfig, RunConfig): one file reader, one type check.

Values reach a config dataclass from two places, and each has one rule, whatever the config:

  * data (a YAML or JSON file, a Python call): the value already has a type, and it must be the field's type:
    `hidden_size: "64"` (a string) or `seq_aux: 1` is refused. An int is a number; `from_data` also reads an
    integral float as an int (`max_steps: 1e3` is 1000) and turns an int given for a float field into a float.
  * text (a `key=value` on the command line): the value is parsed for the field's type with Python's number rules
    (`1e-3`, `.5`, `1_000`; an int field takes `1e3` but not `2.5`), true/false, yes/no, on/off, 1/0 for a bool,
    YAML flow syntax for a list (`[0.8, 0.9]`).

Either way, an optional field reads none, null, ~ or an empty string as None, and a `Literal[...]` field takes only
its listed strings. Mistakes raise a one-line ValueError naming the key, the value and what is allowed.

`read_mapping` is the one reader of config files: JSON for `.json`, else YAML, where a number with an exponent is
a float as YAML 1.2 says (`1e-3`, `3e-4`, `5E5`), not the string PyYAML's YAML 1.1 rules make of it.
"""

from __future__ import annotations

import functools
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from .errors import UserValueError

_DATA_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_NULL_WORDS = ("none", "null", "~", "")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")
# YAML 1.2 floats with an exponent, which YAML 1.1 (PyYAML) reads as strings unless they have a dot and a signed
# exponent: 1e-3, 3E4, .5e3, 1.0e5
_EXPONENT_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """{field name: its resolved annotation} of a dataclass."""
    return typing.get_type_hints(cls)


def check(value: Any, tp: Any, key: str) -> None:
    """Raise ValueError unless `value` has the annotated type (data rules, nothing converted)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return
        check(value, _only_option(tp), key)
    elif origin is Literal:
        if value not in get_args(tp):
            raise UserValueError(f"{key}={value!r} is invalid: expected one of {', '.join(map(repr, get_args(tp)))}")
    elif origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserValueError(f"{key}={value!r} is invalid: expected a list such as [0.8, 0.9]")
        for item in value:
            check(item, get_args(tp)[0], key)
    elif tp in _DATA_NAMES:
        if not _has_type(value, tp):
            raise UserValueError(f"{key}={value!r} is invalid: expected {_DATA_NAMES[tp]}")
    else:
        raise TypeError(f"unsupported config type {tp} for {key}")


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """A config's range check: ValueError `name=value is invalid: expected allowed` unless ok."""
    if not ok:
        raise UserValueError(f"{name}={value!r} is invalid: expected {allowed}")


def from_data(value: Any, tp: Any, key: str) -> Any:
    """A value read from a file (or given in Python), checked against the annotation and normalised."""
    if _is_optional(tp) and _is_null(value):
        return None
    base = _only_option(tp) if _is_optional(tp) else tp
    if base is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    elif base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif get_origin(base) is list and isinstance(value, (list, tuple)):
        value = [from_data(item, get_args(base)[0], key) for item in value]
    check(value, tp, key)
    return value


def from_text(text: str, tp: Any, key: str) -> Any:
    """A value given as text on the command line, parsed for the annotated type."""
    if _is_optional(tp):
        return None if _is_null(text) else from_text(text, _only_option(tp), key)
    origin = get_origin(tp)
    if origin is Literal:
        check(text, tp, key)
        return text
    if origin is list:
        items = _flow_list(text, key)
        return [from_text(str(item), get_args(tp)[0], key) for item in items]
    try:
        return _parse_scalar(text, tp)
    except ValueError:
        raise UserValueError(f"{key}={text!r} is invalid: expected {tp.__name__}") from None


def _parse_scalar(text: str, tp: Any) -> Any:
    if tp is bool:
        word = text.strip().lower()
        if word not in _TRUE_WORDS + _FALSE_WORDS:
            raise UserValueError(text)
        return word in _TRUE_WORDS
    if tp is int:
        if text.strip().lstrip("+-").isdigit():
            return int(text)
        number = float(text)
        if not number.is_integer():
            raise UserValueError(text)
        return int(number)
    if tp is float:
        return float(text)
    if tp is str:
        return text
    raise TypeError(f"unsupported config type {tp}")


def _flow_list(text: str, key: str) -> list[Any]:
    import yaml

    try:
        items = yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        items = None
    if not isinstance(items, list):
        raise UserValueError(f"{key}={text!r} is invalid: expected a list such as [0.8, 0.9]")
    return items


def _has_type(value: Any, tp: type) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp)


def _only_option(tp: Any) -> Any:
    options = [a for a in get_args(tp) if a is not type(None)]
    if len(options) != 1:
        raise TypeError(f"unsupported config type {tp}")
    return options[0]


def _is_null(value: Any) -> bool:
    return value is None or isinstance(value, str) and value.strip().lower() in _NULL_WORDS


# --------------------------------------------------------------------------------------------- files
def read_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a config file (JSON for .json, else YAML); an empty file is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserValueError(f"{path}: not UTF-8 text (byte {exc.start}); a config file is {kind} text") from None
    try:
        data = json.loads(text) if kind == "JSON" else _yaml_load(text)
    except ValueError as exc:  # json.JSONDecodeError, and YAML errors as _yaml_load raises them
        raise UserValueError(f"{path}: not valid {kind} ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _yaml_load(text: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise UserValueError(str(exc).splitlines()[0]) from None


@functools.cache
def _loader() -> type:
    """yaml.SafeLoader, reading exponent floats as YAML 1.2 does."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))
    return Loader
