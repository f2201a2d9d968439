"""Type checks of a resolved configuration against the signatures that consume it.

Every user-facing option ends up as a keyword of some function or class (a `_target_` node's
constructor, `TrainerConfig`, the schedule, ...). Its annotation says what it accepts, so a value of
the wrong type (`trainer.batch_size=abc`, `seed=1.5`) is caught before anything runs, with one line
naming the key and what it expects. Floats must also be finite everywhere (`loss.gamma=inf`).
"""

import collections.abc
import importlib
import inspect
import math
import types
import typing
from typing import Any, Callable

from opl.errors import ConfigError

SEQUENCES = (list, tuple, collections.abc.Sequence)  # a configuration list fits any of them


def locate(dotted: str) -> Callable:
    """The object a `_target_` names (module path, then attributes)."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            break
        return obj
    raise ConfigError(f"_target_ {dotted!r} does not name an importable function or class")


def _describe(kind) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is type(None) or kind is None:
        return "null"
    if kind is bool:
        return "true or false"
    if kind is int:
        return "an integer"
    if kind is float:
        return "a finite number"
    if kind is str:
        return "a string"
    if origin in (typing.Union, types.UnionType):
        known = [a for a in args if _known(a)]
        return " or ".join(dict.fromkeys(_describe(a) for a in known))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in SEQUENCES or kind in SEQUENCES:
        inner = [a for a in args if a is not Ellipsis]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
        return f"a list of {plural.get(inner[0], _describe(inner[0]))}" if inner else "a list"
    if origin is dict or kind is dict:
        return "a mapping"
    return getattr(kind, "__name__", str(kind))


def _known(kind) -> bool:
    """Whether a configuration value (JSON types) could ever be of this annotation."""
    origin = typing.get_origin(kind)
    if kind in (bool, int, float, str, list, tuple, dict, type(None), None) or origin is typing.Literal:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_known(a) for a in typing.get_args(kind))
    return origin in (*SEQUENCES, dict)


def matches(value, kind) -> bool:
    """Whether a plain configuration value fits an annotation; unknown annotations accept anything."""
    if kind is Any or kind is inspect.Parameter.empty or not _known(kind):
        return True
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args if _known(a))
    if origin is typing.Literal:
        return value in args
    if kind is type(None) or kind is None:
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if origin is dict or kind is dict:
        return isinstance(value, dict)
    if origin in SEQUENCES or kind in SEQUENCES:
        if not isinstance(value, list):
            return False
        inner = [a for a in args if a is not Ellipsis]
        if origin is tuple and inner and Ellipsis not in args:
            return len(value) == len(inner) and all(matches(v, a) for v, a in zip(value, inner))
        return not inner or all(matches(v, inner[0]) for v in value)
    return True


def _hints(target: Callable) -> tuple[dict, inspect.Signature | None]:
    func = target.__init__ if inspect.isclass(target) else target
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return {}, None
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # unresolvable forward references: use what is a real annotation
        hints = {k: p.annotation for k, p in signature.parameters.items() if not isinstance(p.annotation, str)}
    return hints, signature


def check_keywords(values: dict, target: Callable, prefix: str, skip: tuple = ()) -> None:
    """Each entry of `values` against the parameter of `target` it will be passed to."""
    hints, signature = _hints(target)
    if signature is None:
        return
    params = signature.parameters
    open_ended = any(p.kind == p.VAR_KEYWORD for p in params.values())
    name = getattr(target, "__qualname__", str(target))
    for key, value in values.items():
        if key.startswith("_") or key in skip:
            continue
        where = f"{prefix}{key}"
        if key not in params:
            if open_ended:
                continue
            options = ", ".join(k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                                and k not in skip and k != "self")
            raise ConfigError(f"{where} is not an option of {name} (options: {options})")
        kind = hints.get(key, params[key].annotation)
        if value is None and kind is str and params[key].default is params[key].empty:
            continue  # a required path or name left unset: its consumer says what to set
        if not matches(value, kind):
            raise ConfigError(f"{where}={value!r}: expected {_describe(kind)}")


def check_targets(node, prefix: str = "", skip_nodes: tuple = ()) -> None:
    """`check_keywords` for every `_target_` node in a configuration tree (nested ones included)."""
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            check_keywords(node, locate(node["_target_"]), prefix)
        for key, value in node.items():
            if f"{prefix}{key}" not in skip_nodes:
                check_targets(value, f"{prefix}{key}.", skip_nodes)
    elif isinstance(node, list):
        for value in node:
            check_targets(value, prefix, skip_nodes)


def check_finite(node, prefix: str = "") -> None:
    """No infinite or NaN number anywhere: no option of this project means anything with one."""
    if isinstance(node, dict):
        for key, value in node.items():
            check_finite(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_finite(value, f"{prefix}{i}.")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{prefix.rstrip('.')}={node}: expected a finite number")
