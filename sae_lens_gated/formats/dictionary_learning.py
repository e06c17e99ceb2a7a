"""dictionary_learning's gated SAE folder (``ae.pt`` + ``config.json``), as SAEBench publishes it.

The whole format lives here: file names, the key map to SAELens's names, the mapping between
dictionary_learning's submodule names and TransformerLens hook names, the validated reader
and the writer. The reader is also offered the way SAELens loads everything else, as
converters for ``SAE.load_from_disk(path, converter=dictionary_learning_disk_loader)`` and
``SAE.from_pretrained(release, sae_id, converter=dictionary_learning_huggingface_loader)``.
"""

import copy
import dataclasses
import json
import logging
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from sae_lens import __version__ as sae_lens_version
from sae_lens.saes.sae import SAE, SAEConfig
from sae_lens.util import dtype_to_str, str_to_dtype

from sae_lens_gated.formats.hub import download_hub_file
from sae_lens_gated.formats.validation import (
    GatedSAEExportError,
    GatedSAELoadError,
    check_finite,
    check_keys,
    check_shape,
    gated_shapes,
    positive_int_field,
    read_json_object,
)
from sae_lens_gated.saes.gated_sae import GatedSAEConfig

logger = logging.getLogger(__name__)

DICTIONARY_LEARNING_WEIGHTS_FILENAME = "ae.pt"
DICTIONARY_LEARNING_CONFIG_FILENAME = "config.json"
# The two files of a folder, in the order they are read (the config says what to expect).
DICTIONARY_LEARNING_FILES = (
    DICTIONARY_LEARNING_CONFIG_FILENAME,
    DICTIONARY_LEARNING_WEIGHTS_FILENAME,
)
DICTIONARY_LEARNING_DICT_CLASS = "GatedAutoEncoder"
DICTIONARY_LEARNING_TRAINER_CLASS = "GatedSAETrainer"
# Metadata key under which a loaded dictionary_learning config.json is kept, so that
# exporting back writes the same training record.
DICTIONARY_LEARNING_CONFIG_METADATA_KEY = "dictionary_learning_config"


class KeyMapping(NamedTuple):
    """How one SAELens gated tensor is stored by dictionary_learning's ``GatedAutoEncoder``.

    Attributes:
        saelens: Name in SAELens (``sae_weights.safetensors``).
        dictionary_learning: Name in dictionary_learning's ``ae.pt`` state dict.
        transposed: Whether dictionary_learning stores the transpose (``nn.Linear`` layout).
    """

    saelens: str
    dictionary_learning: str
    transposed: bool


# The one key map, used by the reader and the writer alike.
DICTIONARY_LEARNING_KEY_MAP: tuple[KeyMapping, ...] = (
    KeyMapping("W_enc", "encoder.weight", True),
    KeyMapping("W_dec", "decoder.weight", True),
    KeyMapping("b_dec", "decoder_bias", False),
    KeyMapping("b_gate", "gate_bias", False),
    KeyMapping("b_mag", "mag_bias", False),
    KeyMapping("r_mag", "r_mag", False),
)

# dictionary_learning names the hooked submodule "<kind>_layer_<n>"; SAELens uses
# TransformerLens hook names. SAELens's own converter assumes resid_post.
_SUBMODULE_KINDS_TO_HOOKS = {
    "resid_post": "hook_resid_post",
    "mlp_out": "hook_mlp_out",
    "attn_out": "hook_attn_out",
}
_SUBMODULE_NAME = re.compile(r"(?P<kind>[a-z_]+?)_layer_(?P<layer>\d+)")
_HOOK_NAME = re.compile(r"blocks\.(?P<layer>\d+)\.(?P<hook>hook_[a-z_]+)")
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(GatedSAEConfig))


def dictionary_learning_shapes(d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
    """Expected dictionary_learning shape of each tensor in ``ae.pt``."""
    shapes = gated_shapes(d_in, d_sae)
    return {
        m.dictionary_learning: shapes[m.saelens][::-1]
        if m.transposed
        else shapes[m.saelens]
        for m in DICTIONARY_LEARNING_KEY_MAP
    }


def state_dict_from_dictionary_learning(
    state: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Rename (and transpose) a dictionary_learning ``GatedAutoEncoder`` state dict."""
    return {
        m.saelens: (
            state[m.dictionary_learning].T
            if m.transposed
            else state[m.dictionary_learning]
        ).contiguous()
        for m in DICTIONARY_LEARNING_KEY_MAP
    }


def state_dict_to_dictionary_learning(
    params: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The ``GatedAutoEncoder`` state dict (on the CPU) of the six SAELens gated tensors."""
    return {
        m.dictionary_learning: (
            params[m.saelens].T if m.transposed else params[m.saelens]
        )
        .detach()
        .contiguous()
        .cpu()
        .clone()
        for m in DICTIONARY_LEARNING_KEY_MAP
    }


def hook_name_for_submodule(layer: Any, submodule_name: Any) -> str | None:
    """The TransformerLens hook of a dictionary_learning ``(layer, submodule_name)``.

    A missing ``submodule_name`` means the residual stream after the layer, as SAELens's
    dictionary_learning converter assumes; an unrecognised one gives None.
    """
    if not isinstance(layer, int):
        return None
    kind = "resid_post"
    if isinstance(submodule_name, str):
        match = _SUBMODULE_NAME.fullmatch(submodule_name)
        if match is None or int(match["layer"]) != layer:
            return None
        kind = match["kind"]
    hook = _SUBMODULE_KINDS_TO_HOOKS.get(kind)
    return None if hook is None else f"blocks.{layer}.{hook}"


def submodule_for_hook_name(hook_name: Any) -> tuple[int | None, str | None]:
    """dictionary_learning's ``(layer, submodule_name)`` for a TransformerLens hook name.

    The inverse of :func:`hook_name_for_submodule`; parts that cannot be told are None.
    """
    if not isinstance(hook_name, str):
        return None, None
    match = _HOOK_NAME.fullmatch(hook_name)
    if match is None:
        return None, None
    layer = int(match["layer"])
    for kind, hook in _SUBMODULE_KINDS_TO_HOOKS.items():
        if hook == match["hook"]:
            return layer, f"{kind}_layer_{layer}"
    return layer, None


# --- reading ----------------------------------------------------------------------------


def read_dictionary_learning_config(path: Path) -> tuple[dict[str, Any], int, int]:
    """Read and check a gated SAE's ``config.json``.

    Args:
        path: The ``config.json`` file.

    Returns:
        The whole config, ``activation_dim`` (d_in) and ``dict_size`` (d_sae).

    Raises:
        GatedSAELoadError: The file is not a gated dictionary_learning config.
    """
    config = read_json_object(path)
    trainer = config.get("trainer")
    if not isinstance(trainer, dict):
        raise GatedSAELoadError(f"{path}: field 'trainer' is missing or not an object.")
    dict_class = trainer.get("dict_class")
    if dict_class != DICTIONARY_LEARNING_DICT_CLASS:
        raise GatedSAELoadError(
            f"{path}: field 'trainer.dict_class' is {dict_class!r}, expected "
            f"{DICTIONARY_LEARNING_DICT_CLASS!r} (only gated SAEs are loaded)."
        )
    d_in = positive_int_field(trainer, "activation_dim", path, "trainer.")
    d_sae = positive_int_field(trainer, "dict_size", path, "trainer.")
    return config, d_in, d_sae


def read_plain_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a tensors-only ``torch.save`` checkpoint without running any pickled code.

    Raises:
        GatedSAELoadError: The file would run code or build anything but tensors, is
            truncated or corrupt, or is not a dict of tensors.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[-1][:300]
        raise GatedSAELoadError(
            f"Refusing to load {path}: it is not a plain tensor checkpoint, and reading it "
            f"would execute code or build objects other than tensors ({reason})."
        ) from error
    except Exception as error:
        raise GatedSAELoadError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {error}"
        ) from error
    if not isinstance(loaded, dict):
        raise GatedSAELoadError(
            f"{path} holds a {type(loaded).__name__}, expected a state dict of tensors."
        )
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise GatedSAELoadError(
                f"{path}: key {key!r} holds a {type(value).__name__}, expected a tensor."
            )
    return loaded


def read_ae_pt(
    path: Path, d_in: int, d_sae: int, config_path: Path
) -> dict[str, torch.Tensor]:
    """Read ``ae.pt`` and check it holds exactly the gated tensors, finite, of the right shapes.

    Args:
        path: The ``ae.pt`` file.
        d_in: ``activation_dim`` from the config.
        d_sae: ``dict_size`` from the config.
        config_path: The config the sizes come from, for messages.

    Returns:
        The state dict, in dictionary_learning's names and layout.
    """
    raw = read_plain_state_dict(path)
    expected = dictionary_learning_shapes(d_in, d_sae)
    check_keys(path, raw, expected)
    for key, shape in expected.items():
        check_shape(path, key, tuple(raw[key].shape), shape, config_path)
        check_finite(path, key, raw[key])
    return raw


def _metadata(config: dict[str, Any], config_path: Path) -> dict[str, Any]:
    """SAELens metadata for a dictionary_learning config, as SAELens's converter fills it."""
    trainer: dict[str, Any] = config["trainer"]
    buffer = config.get("buffer")
    lm_name = trainer.get("lm_name")
    hook_name = hook_name_for_submodule(
        trainer.get("layer"), trainer.get("submodule_name")
    )
    if hook_name is None and trainer.get("submodule_name") is not None:
        logger.warning(
            "%s: no TransformerLens hook for layer=%r, submodule_name=%r; hook_name is "
            "left unset.",
            config_path,
            trainer.get("layer"),
            trainer.get("submodule_name"),
        )
    return {
        # Marks the config as SAELens 6 layout, so SAELens keeps this metadata as is.
        "sae_lens_version": sae_lens_version,
        "sae_lens_training_version": None,
        "model_name": lm_name.split("/")[-1] if isinstance(lm_name, str) else None,
        "hook_name": hook_name,
        "hook_head_index": None,
        "context_size": buffer.get("ctx_len") if isinstance(buffer, dict) else None,
        "prepend_bos": True,
        DICTIONARY_LEARNING_CONFIG_METADATA_KEY: config,
    }


def _read_folder(
    config_path: Path,
    weights: Callable[[], Path],
    device: str,
    cfg_overrides: dict[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check a folder's two files; SAELens's config dict and state dict for them.

    ``weights`` gives the ``ae.pt`` path only once the config has been checked, so a
    download of the weights happens only for a gated SAE.
    """
    config, d_in, d_sae = read_dictionary_learning_config(config_path)
    weights_path = weights()
    raw = read_ae_pt(weights_path, d_in, d_sae, config_path)
    overrides = dict(cfg_overrides or {})
    requested = overrides.pop("dtype", None)
    if requested is not None:
        dtype_name = dtype_to_str(str_to_dtype(requested))
    else:
        stored_dtype = raw["encoder.weight"].dtype
        try:
            dtype_name = dtype_to_str(stored_dtype)
        except ValueError as error:
            raise GatedSAELoadError(
                f"{weights_path}: tensors are {stored_dtype}, which SAELens does not "
                "support; pass dtype= to convert."
            ) from error
    device = overrides.pop("device", None) or device
    metadata = _metadata(config, config_path)
    cfg: dict[str, Any] = {
        "architecture": GatedSAEConfig.architecture(),
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": dtype_name,
        "device": device,
        # dictionary_learning always subtracts decoder_bias before the encoder.
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    # SAELens passes config fields and metadata (e.g. a release's neuronpedia_id) alike.
    for key, value in overrides.items():
        (cfg if key in _CONFIG_FIELDS else metadata)[key] = value
    dtype = str_to_dtype(dtype_name)
    state = {
        name: tensor.to(device=device, dtype=dtype)
        for name, tensor in state_dict_from_dictionary_learning(raw).items()
    }
    return cfg, state


def dictionary_learning_disk_loader(
    path: str | Path,
    device: str = "cpu",
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a local dictionary_learning gated SAE folder, checked, for SAELens.

    A SAELens ``PretrainedSaeDiskLoader``:
    ``SAE.load_from_disk(path, converter=dictionary_learning_disk_loader)`` returns the
    gated SAE that computes what dictionary_learning's ``GatedAutoEncoder`` computes. The
    files are validated first (see :func:`read_dictionary_learning_config` and
    :func:`read_ae_pt`); ``ae.pt`` is read with ``weights_only=True``.

    Args:
        path: The folder with ``ae.pt`` and ``config.json``.
        device: Device of the returned tensors.
        cfg_overrides: Config fields (e.g. ``dtype``) or metadata to set; without a
            ``dtype``, the dtype of the tensors in ``ae.pt`` is kept.

    Returns:
        SAELens's config dict and the state dict in SAELens's names.

    Raises:
        GatedSAELoadError: A file is missing, not gated, or invalid.
    """
    folder = Path(path)
    return _read_folder(
        folder / DICTIONARY_LEARNING_CONFIG_FILENAME,
        lambda: folder / DICTIONARY_LEARNING_WEIGHTS_FILENAME,
        device,
        cfg_overrides,
    )


def dictionary_learning_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]:
    """Read a dictionary_learning gated SAE folder of a Hugging Face repo, checked, for SAELens.

    A SAELens ``PretrainedSaeHuggingfaceLoader``: pass it as ``converter=`` to
    ``SAE.from_pretrained(release, sae_id, ...)``. ``config.json`` is fetched and checked
    first, so a folder that is not gated is refused before its weights are downloaded;
    ``ae.pt`` is then read as by :func:`dictionary_learning_disk_loader`.

    Args:
        repo_id: The Hugging Face repo.
        folder_name: The folder in the repo.
        device: Device of the returned tensors.
        force_download: Download even if the files are cached.
        cfg_overrides: As for :func:`dictionary_learning_disk_loader`.

    Returns:
        SAELens's config dict, the state dict and no feature sparsity (None).
    """

    def download(name: str) -> Path:
        return download_hub_file(repo_id, folder_name, name, force_download)

    cfg, state = _read_folder(
        download(DICTIONARY_LEARNING_CONFIG_FILENAME),
        lambda: download(DICTIONARY_LEARNING_WEIGHTS_FILENAME),
        device,
        cfg_overrides,
    )
    return cfg, state, None


# --- writing ----------------------------------------------------------------------------


def check_dictionary_learning_compatible(cfg: SAEConfig) -> None:
    """Raise :class:`GatedSAEExportError` if ``GatedAutoEncoder`` cannot compute this SAE."""
    if cfg.normalize_activations != "none":
        raise GatedSAEExportError(
            f"dictionary_learning's GatedAutoEncoder takes raw activations, but this SAE has "
            f"normalize_activations={cfg.normalize_activations!r}. Fold a constant scaling "
            "factor in first (sae.fold_activation_norm_scaling_factor(factor)); run-time "
            "normalizations cannot be represented."
        )
    if cfg.reshape_activations != "none":
        raise GatedSAEExportError(
            f"dictionary_learning's GatedAutoEncoder has no notion of per-head activations, "
            f"but this SAE has reshape_activations={cfg.reshape_activations!r}."
        )


def dictionary_learning_config(sae: SAE[Any]) -> dict[str, Any]:
    """The ``config.json`` dictionary_learning writes next to a ``GatedAutoEncoder``.

    A config kept from a dictionary_learning source (metadata key
    ``dictionary_learning_config``) is reused; the architecture fields and sizes are always
    set from the SAE, and ``layer``, ``lm_name``, ``submodule_name`` and ``buffer.ctx_len``
    are filled from the SAELens metadata where the kept config lacks them (None if unknown).

    Args:
        sae: Any gated SAE.
    """
    metadata = sae.cfg.metadata
    kept = metadata.get(DICTIONARY_LEARNING_CONFIG_METADATA_KEY) or {}
    config: dict[str, Any] = copy.deepcopy(dict(kept))
    trainer: dict[str, Any] = dict(config.get("trainer") or {})
    layer, submodule_name = submodule_for_hook_name(metadata.get("hook_name"))
    trainer.setdefault("trainer_class", DICTIONARY_LEARNING_TRAINER_CLASS)
    trainer.setdefault("layer", layer)
    trainer.setdefault("lm_name", metadata.get("model_name"))
    trainer.setdefault("submodule_name", submodule_name)
    trainer.update(
        dict_class=DICTIONARY_LEARNING_DICT_CLASS,
        activation_dim=sae.cfg.d_in,
        dict_size=sae.cfg.d_sae,
    )
    buffer: dict[str, Any] = dict(config.get("buffer") or {})
    buffer.setdefault("ctx_len", metadata.get("context_size"))
    config["trainer"] = trainer
    config["buffer"] = buffer
    return config


def write_dictionary_learning(
    folder: Path, state_dict: Mapping[str, torch.Tensor], config: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``ae.pt`` (a plain state dict of tensors) and ``config.json`` into ``folder``.

    Args:
        folder: An existing folder.
        state_dict: The ``GatedAutoEncoder`` state dict
            (see :func:`state_dict_to_dictionary_learning`).
        config: The ``config.json`` content (see :func:`dictionary_learning_config`).

    Returns:
        The paths of ``ae.pt`` and ``config.json``.
    """
    weights_path = folder / DICTIONARY_LEARNING_WEIGHTS_FILENAME
    config_path = folder / DICTIONARY_LEARNING_CONFIG_FILENAME
    torch.save(dict(state_dict), weights_path)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=4)
    return weights_path, config_path
