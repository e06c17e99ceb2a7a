"""SAELens's gated SAE folder (``cfg.json`` + ``sae_weights.safetensors``): validation and reading.

SAELens writes and reads this format itself; the plugin checks a folder before SAELens
builds anything from it, so a bad file gives one :class:`GatedSAELoadError` naming the file
and the key or field. :func:`saelens_disk_loader` is SAELens's own disk loader with those
checks in front, usable as ``SAE.load_from_disk(path, converter=saelens_disk_loader)``.
"""

from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader
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


def read_saelens_config(path: Path) -> tuple[dict[str, Any], int, int]:
    """Read and check a gated SAE's ``cfg.json``.

    Args:
        path: The ``cfg.json`` file.

    Returns:
        The config as stored, ``d_in`` and ``d_sae``.

    Raises:
        GatedSAELoadError: The file is not a gated SAELens config.
    """
    cfg = read_json_object(path)
    architecture = cfg.get("architecture")
    if architecture != GatedSAEConfig.architecture():
        raise GatedSAELoadError(
            f"{path}: field 'architecture' is {architecture!r}, expected 'gated'."
        )
    d_in = positive_int_field(cfg, "d_in", path)
    d_sae = positive_int_field(cfg, "d_sae", path)
    return cfg, d_in, d_sae


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


def check_saelens_folder(path: str | Path) -> None:
    """Check a SAELens gated SAE folder's ``cfg.json`` and ``sae_weights.safetensors``.

    Raises:
        GatedSAELoadError: Naming the file and the key or field at fault.
    """
    folder = Path(path)
    cfg_path = folder / SAE_CFG_FILENAME
    _, d_in, d_sae = read_saelens_config(cfg_path)
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
    check_saelens_folder(path)
    return sae_lens_disk_loader(path, device, cfg_overrides)
