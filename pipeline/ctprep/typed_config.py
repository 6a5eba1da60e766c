"""YAML -> typed dataclasses: the one loader behind the pipeline, trainer and model configs.

``ctprep.config`` (pipeline presets), ``ctprep_train.config`` (training YAML) and
``ctprep_train.model.config`` (model YAML / ``config.json``) each declare their dataclasses and
their cross-field checks; reading and typing the data is done here, the same way for all three:

* :func:`from_dict` builds a dataclass from nested dicts, converting each value to its
  annotated type; an unknown key fails with the valid choices (MONAI ``look_up_option``
  style), a value of the wrong type fails naming the dotted key.
* :func:`read_yaml_chain` reads a YAML file whose ``extends: <parent>`` names another file
  (resolved by the caller: a preset name, a path), merged key by key under the child.
* :func:`apply_override` / :func:`set_dotted` apply command-line ``a.b.c=value`` overrides
  (values parsed as YAML scalars) to the nested dict before it is typed, so an override of
  an unknown key fails exactly like a typo in the file.

Standard library + PyYAML only: ``ctprep_train.model`` imports this and must not pull in Dask or
DeepSpeed. (pydantic is in the environment only as a DeepSpeed dependency, and OmegaConf not
at all; the configs stay plain dataclasses.)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "look_up_option",
    "from_dict",
    "read_yaml",
    "read_yaml_chain",
    "deep_merge",
    "set_dotted",
    "apply_override",
]

EXTENDS_KEY = "extends"


class ConfigError(ValueError):
    """A config key or value that the program does not know."""


def look_up_option(value: Any, choices: Sequence[Any], what: str) -> Any:
    """Return ``value`` if it is one of ``choices``; raise ``ConfigError`` naming the valid ones."""
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; valid choices: {', '.join(map(repr, choices))}")
    return value


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """Build dataclass ``cls`` from nested dicts (as read from YAML / JSON).

    Args:
        cls: the dataclass; nested dataclass fields are built recursively.
        data: key -> value; missing keys keep the dataclass defaults, ``None`` = all defaults.
        where: dotted name of this section, for error messages ("" = the top level).

    Raises:
        ConfigError: an unknown key (with the valid ones) or a value of the wrong type.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or 'the top level'!r}; "
                          f"valid choices: {', '.join(names)}")
    return cls(**{k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()})


def _convert(tp: Any, value: Any, where: str) -> Any:
    """``value`` as annotated type ``tp``, strictly (no silent truncation, no bool-as-int)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(non_none[0], value, where)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length, e.g. (z, y, x)
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple or tp is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        if not args:
            return dict(value)
        return {_convert(args[0], k, where): _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        # Strings too: PyYAML reads "1e-4" (no dot, YAML 1.1) as a string, and overrides like
        # optim.lr=1e-4 are common.
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is ``{}``)."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any], replace: Sequence[str] = (), _at: str = "") -> dict[str, Any]:
    """``over`` merged into a copy of ``base``, mapping by mapping.

    Args:
        replace: dotted keys (``"regions.regions"``) taken whole from ``over``: a mapping whose
            entries only make sense together (region order is the mask's id order).
    """
    out = dict(base)
    for k, v in over.items():
        dotted = f"{_at}.{k}" if _at else str(k)
        if isinstance(v, dict) and isinstance(out.get(k), dict) and dotted not in replace:
            out[k] = deep_merge(out[k], v, replace, dotted)
        else:
            out[k] = v
    return out


def read_yaml_chain(path: str | Path, resolve: Callable[[str, Path], Path],
                    replace: Sequence[str] = (), _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read ``path`` and the files its ``extends:`` names, child keys over parent keys.

    Args:
        path: the YAML file.
        resolve: ``(extends value, file that names it) -> parent path`` (a preset name, a path
            relative to the file, ...); it raises for an unknown name.
        replace: keys merged whole instead of key by key (see :func:`deep_merge`).
    """
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"config '{EXTENDS_KEY}' cycle: {' -> '.join(map(str, _seen + (path.resolve(),)))}")
    data = read_yaml(path)
    parent = data.pop(EXTENDS_KEY, None)
    if parent:
        base = read_yaml_chain(resolve(str(parent), path), resolve, replace, _seen + (path.resolve(),))
        data = deep_merge(base, data, replace)
    return data


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Set ``tree[a][b][c] = value`` for ``dotted = "a.b.c"`` (sections created as needed); returns ``tree``.

    Unknown keys are not checked here: :func:`from_dict` rejects them when the tree is typed.
    """
    parts = dotted.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a config section")
    node[parts[-1]] = value
    return tree


def apply_override(tree: dict[str, Any], item: str) -> dict[str, Any]:
    """Apply one command-line ``a.b.c=value`` override (value parsed as a YAML scalar) in place."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    return set_dotted(tree, key, yaml.safe_load(raw))
