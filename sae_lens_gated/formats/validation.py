"""Checks shared by the format readers and exporters, and the errors they raise.

Every check names the file and the key or field it is about, so one message tells a user
what to fix.
"""

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

# The six tensors of a gated SAE, in SAELens's names.
GATED_PARAM_NAMES: tuple[str, ...] = (
    "W_enc",
    "W_dec",
    "b_dec",
    "b_gate",
    "b_mag",
    "r_mag",
)


class GatedSAELoadError(ValueError):
    """A source that cannot be loaded as a gated SAE; the message names file and key."""


class GatedSAEExportError(ValueError):
    """A gated SAE that cannot be written exactly in the requested format."""


def gated_shapes(d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
    """Expected SAELens shape of each gated tensor."""
    return {
        "W_enc": (d_in, d_sae),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
        "b_gate": (d_sae,),
        "b_mag": (d_sae,),
        "r_mag": (d_sae,),
    }


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; anything else is a :class:`GatedSAELoadError`."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as error:
        raise GatedSAELoadError(f"{path} is not readable JSON: {error}") from error
    if not isinstance(value, dict):
        raise GatedSAELoadError(f"{path} does not hold a JSON object.")
    return value


def positive_int_field(
    mapping: Mapping[str, Any], key: str, path: Path, prefix: str = ""
) -> int:
    """``mapping[key]``, which must be a positive integer (a dimension).

    Args:
        mapping: The parsed JSON object (or a part of it).
        key: The field.
        path: The file it was read from, for the message.
        prefix: Where ``mapping`` sits in the file (e.g. ``"trainer."``), for the message.
    """
    value = mapping.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise GatedSAELoadError(
            f"{path}: field '{prefix}{key}' is {value!r}, expected a positive integer."
        )
    return value


def check_keys(path: Path, found: Iterable[str], expected: Iterable[str]) -> None:
    """Raise unless the keys in ``path`` are exactly ``expected`` (lists what differs)."""
    found_set, expected_set = set(found), set(expected)
    problems = []
    if missing := sorted(expected_set - found_set):
        problems.append(f"missing key(s) {', '.join(map(repr, missing))}")
    if extra := sorted(found_set - expected_set):
        problems.append(f"unexpected key(s) {', '.join(map(repr, extra))}")
    if problems:
        raise GatedSAELoadError(
            f"{path}: {'; '.join(problems)}. A gated SAE has exactly "
            f"{', '.join(sorted(expected_set))}."
        )


def check_shape(
    path: Path,
    key: str,
    actual: tuple[int, ...],
    expected: tuple[int, ...],
    config_path: Path,
) -> None:
    """Raise unless tensor ``key`` in ``path`` has the shape ``config_path``'s sizes give."""
    if actual != expected:
        raise GatedSAELoadError(
            f"{path}: key {key!r} has shape {actual}, expected {expected} from the sizes "
            f"in {config_path}."
        )


def count_non_finite(tensor: torch.Tensor) -> int:
    """How many values of ``tensor`` are NaN or infinite."""
    return int((~torch.isfinite(tensor)).sum().item())


def check_finite(path: Path, key: str, tensor: torch.Tensor) -> None:
    """Raise if tensor ``key`` read from ``path`` holds a NaN or an infinity."""
    if bad := count_non_finite(tensor):
        raise GatedSAELoadError(
            f"{path}: key {key!r} has {bad} non-finite value(s) (NaN or inf)."
        )
