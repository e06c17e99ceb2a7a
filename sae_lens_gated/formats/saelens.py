"""SAELens's gated SAE folder (``cfg.json`` + ``sae_weights.safetensors``): validation and reading.

SAELens writes and reads this format itself; the plugin checks a folder before SAELens
builds anything from it, so a bad file gives one :class:`GatedSAELoadError` naming the file
and the key or field. :func:`saelens_disk_loader` is SAELens's own disk loader with those
checks in front, usable as ``SAE.load_from_disk(path, converter=saelens_disk_loader)``.
"""

import copy
from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import DTYPE_MAP, SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.loading.pretrained_sae_loaders import (
    handle_config_defaulting,
    sae_lens_disk_loader,
)
from sae_lens.saes.sae import SAEMetadata
from safetensors import safe_open

from sae_lens_gated.formats.validation import (
    GATED_PARAM_NAMES,
    GatedSAELoadError,
    check_finite,
    check_keys,
    check_shape,
    gated_shapes,
    positive_int_field,
    read_json_object,
)
from sae_lens_gated.saes.gated_sae import GatedSAEConfig

# The two files of a folder, in the order they are read.
SAELENS_FILES = (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME)
# Pre-6.0 SAELens sometimes saved an all-ones "scaling_factor"; SAELens drops it on load.
_IGNORABLE_ONES_KEY = "scaling_factor"
# Metadata fields SAELens or its users read with a type in mind (None is always allowed).
_STRING = ((str,), "a string or null")
_INTEGER = ((int,), "an integer or null")
_METADATA_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "sae_lens_version": _STRING,
    "sae_lens_training_version": _STRING,
    "model_name": _STRING,
    "model_class_name": _STRING,
    "hook_name": _STRING,
    "hook_name_out": _STRING,
    "dataset_path": _STRING,
    "neuronpedia_id": _STRING,
    "hook_head_index": _INTEGER,
    "hook_head_index_out": _INTEGER,
    "context_size": _INTEGER,
    "prepend_bos": ((bool,), "true, false or null"),
    "model_from_pretrained_kwargs": ((dict,), "an object or null"),
}


def read_saelens_config(
    path: Path, cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], int, int]:
    """Read and check a gated SAE's ``cfg.json``.

    Besides the architecture and sizes, the fields SAELens itself fails on deep inside are
    checked here: ``dtype`` (unless ``cfg_overrides`` replaces it, as SAELens then does),
    ``normalize_activations`` (SAELens's own rule, after its upgrade of pre-6.0 configs)
    and ``metadata`` (an object; version strings; the types of the fields SAELens uses;
    no names that :class:`SAEMetadata` uses itself).

    Args:
        path: The ``cfg.json`` file.
        cfg_overrides: Config fields the loader will set (e.g. a requested ``dtype``).

    Returns:
        The config as stored, ``d_in`` and ``d_sae``.

    Raises:
        GatedSAELoadError: The file is not a gated SAELens config SAELens can read; the
            message names the field.
    """
    cfg = read_json_object(path)
    architecture = cfg.get("architecture")
    if architecture != GatedSAEConfig.architecture():
        raise GatedSAELoadError(
            f"{path}: field 'architecture' is {architecture!r}, expected 'gated'."
        )
    d_in = positive_int_field(cfg, "d_in", path)
    d_sae = positive_int_field(cfg, "d_sae", path)
    if "metadata" in cfg:
        _check_metadata_fields(cfg["metadata"], path, "metadata")
    _check_metadata_fields(cfg, path)  # pre-6.0 configs keep them at the top level
    processed = _saelens_upgraded(cfg, path)
    if "dtype" not in (cfg_overrides or {}):
        dtype = processed.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPE_MAP:
            names = ", ".join(repr(n) for n in DTYPE_MAP if not n.startswith("torch."))
            raise GatedSAELoadError(
                f"{path}: field 'dtype' is {dtype!r}, expected one of {names}."
            )
    normalize = processed.get("normalize_activations", "none")
    try:
        GatedSAEConfig(d_in=d_in, d_sae=d_sae, normalize_activations=normalize)
    except ValueError as error:
        raise GatedSAELoadError(
            f"{path}: field 'normalize_activations' is {normalize!r}, which SAELens does "
            f"not know: {error}"
        ) from error
    return cfg, d_in, d_sae


def _check_metadata_fields(metadata: Any, path: Path, prefix: str = "") -> None:
    if not isinstance(metadata, dict):
        kind = "None" if metadata is None else f"a {type(metadata).__name__}"
        raise GatedSAELoadError(
            f"{path}: field '{prefix}' is {kind}, expected an object."
        )
    dotted = f"{prefix}." if prefix else ""
    for key, value in metadata.items():
        if prefix and hasattr(SAEMetadata, key):
            raise GatedSAELoadError(
                f"{path}: field '{dotted}{key}' is a name SAELens's SAEMetadata uses "
                "itself (setting it would break the loaded SAE); rename or remove it."
            )
        if key not in _METADATA_FIELD_TYPES or value is None:
            continue
        types, expected = _METADATA_FIELD_TYPES[key]
        # bool is an int subclass; only prepend_bos wants one.
        if not isinstance(value, types) or (
            bool not in types and isinstance(value, bool)
        ):
            raise GatedSAELoadError(
                f"{path}: field '{dotted}{key}' is {value!r}, expected {expected}."
            )


def _saelens_upgraded(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """The config as SAELens reads it (pre-6.0 layouts upgraded), by SAELens's own code."""
    try:
        return handle_config_defaulting(copy.deepcopy(cfg))
    except ValueError as error:  # packaging's InvalidVersion: the version is not one
        metadata = cfg.get("metadata") or {}
        field = (
            "sae_lens_version"
            if cfg.get("sae_lens_version")
            else "metadata.sae_lens_version"
        )
        value = cfg.get("sae_lens_version") or metadata.get("sae_lens_version")
        raise GatedSAELoadError(
            f"{path}: field '{field}' is {value!r}, expected a version number such as "
            f"'6.5.0' ({error})."
        ) from error


def check_saelens_weights(path: Path, d_in: int, d_sae: int, cfg_path: Path) -> None:
    """Check ``sae_weights.safetensors`` holds exactly the gated tensors, finite, right-sized.

    Args:
        path: The ``sae_weights.safetensors`` file.
        d_in: ``d_in`` from the config.
        d_sae: ``d_sae`` from the config.
        cfg_path: The config the sizes come from, for messages.

    Raises:
        GatedSAELoadError: The file is unreadable or its tensors are not a gated SAE's.
    """
    try:
        with safe_open(path, framework="pt", device="cpu") as f:  # type: ignore[no-untyped-call]
            keys = set(f.keys())
            extra_ones = keys & {_IGNORABLE_ONES_KEY}
            check_keys(path, keys - extra_ones, GATED_PARAM_NAMES)
            expected = gated_shapes(d_in, d_sae)
            for key in GATED_PARAM_NAMES:
                shape = tuple(f.get_slice(key).get_shape())
                check_shape(path, key, shape, expected[key], cfg_path)
            for key in sorted(keys):
                tensor: torch.Tensor = f.get_tensor(key)
                if key in extra_ones and not bool((tensor == 1).all()):
                    raise GatedSAELoadError(
                        f"{path}: unexpected key {key!r} (a finetuning scaling factor "
                        "that is not all ones, which gated SAEs do not support)."
                    )
                check_finite(path, key, tensor)
    except GatedSAELoadError:
        raise
    except Exception as error:
        raise GatedSAELoadError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {error}"
        ) from error


def check_saelens_folder(
    path: str | Path, cfg_overrides: dict[str, Any] | None = None
) -> None:
    """Check a SAELens gated SAE folder's ``cfg.json`` and ``sae_weights.safetensors``.

    Args:
        path: The folder.
        cfg_overrides: Config fields the loader will set (see :func:`read_saelens_config`).

    Raises:
        GatedSAELoadError: Naming the file and the key or field at fault.
    """
    folder = Path(path)
    cfg_path = folder / SAE_CFG_FILENAME
    _, d_in, d_sae = read_saelens_config(cfg_path, cfg_overrides)
    check_saelens_weights(folder / SAE_WEIGHTS_FILENAME, d_in, d_sae, cfg_path)


def saelens_disk_loader(
    path: str | Path,
    device: str = "cpu",
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SAELens's own disk loader, after :func:`check_saelens_folder`.

    A SAELens ``PretrainedSaeDiskLoader``:
    ``SAE.load_from_disk(path, converter=saelens_disk_loader)`` loads the folder as SAELens
    does, but a folder that is not a valid gated SAE is refused first.

    Args:
        path: The folder with ``cfg.json`` and ``sae_weights.safetensors``.
        device: Device of the returned tensors.
        cfg_overrides: Config fields to set (e.g. ``dtype``).

    Returns:
        SAELens's config dict and state dict.
    """
    check_saelens_folder(path, cfg_overrides)
    return sae_lens_disk_loader(path, device, cfg_overrides)
