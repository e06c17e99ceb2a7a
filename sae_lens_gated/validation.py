"""Type and range checks for configuration fields, with errors that name the field.

Configs arrive from Python, from ``cfg.json`` files and from command lines, so a value can
have the wrong type as easily as the wrong range: ``"no"`` for a boolean (truthy), ``20.5``
for a step number (never reached), ``25000`` where a list is expected. Each check raises
:class:`GatedConfigError`, which is both a ``TypeError`` and a ``ValueError`` so callers
that catch either see it.
"""

import math
from collections.abc import Collection
from typing import Any

import torch


class GatedConfigError(TypeError, ValueError):
    """A configuration field has the wrong type or an invalid value."""


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_bool(name: str, value: Any) -> None:
    """``value`` must be ``True`` or ``False`` (not a string or a number)."""
    if not isinstance(value, bool):
        raise GatedConfigError(f"{name} must be true or false, got {_describe(value)}.")


def check_optional_bool(name: str, value: Any) -> None:
    """``value`` must be ``True``, ``False`` or ``None``."""
    if value is not None:
        check_bool(name, value)


def check_int(name: str, value: Any, minimum: int | None = None) -> None:
    """``value`` must be an integer (not a bool or a float), at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise GatedConfigError(f"{name} must be an integer, got {_describe(value)}.")
    if minimum is not None and value < minimum:
        raise GatedConfigError(f"{name} must be >= {minimum}, got {value}.")


def check_float(
    name: str, value: Any, minimum: float = -math.inf, strictly_above: bool = False
) -> None:
    """``value`` must be a finite real number (int or float, not bool or str) in range.

    Args:
        name: The field name, for the message.
        value: The value to check.
        minimum: Lower bound.
        strictly_above: Whether ``value`` must be strictly greater than ``minimum``.
    """
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise GatedConfigError(f"{name} must be a number, got {_describe(value)}.")
    if not math.isfinite(value):
        raise GatedConfigError(f"{name} must be finite, got {value}.")
    if value < minimum or (strictly_above and value == minimum):
        bound = f"> {minimum}" if strictly_above else f">= {minimum}"
        raise GatedConfigError(f"{name} must be {bound}, got {value}.")


def check_int_list(name: str, value: Any, minimum: int | None = None) -> None:
    """``value`` must be a list (or tuple) of integers, each at least ``minimum``."""
    if not isinstance(value, list | tuple):
        example = f"[{value}]" if isinstance(value, int) else "[25000, 50000]"
        raise GatedConfigError(
            f"{name} must be a list of integers, e.g. {example}, got {_describe(value)}."
        )
    for index, item in enumerate(value):
        check_int(f"{name}[{index}]", item, minimum)


def check_optional_device(name: str, value: Any) -> None:
    """``value`` must be None or a torch device name such as ``"cpu"`` or ``"cuda:1"``."""
    if value is None:
        return
    if isinstance(value, str):
        try:
            torch.device(value)
            return
        except RuntimeError:
            pass
    raise GatedConfigError(
        f"{name} must be a device name such as 'cpu' or 'cuda', or None, got "
        f"{_describe(value)}."
    )


def check_choice(name: str, value: Any, choices: Collection[str]) -> None:
    """``value`` must be one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise GatedConfigError(
            f"Unknown {name} {value!r}: expected one of {sorted(choices)}."
        )
