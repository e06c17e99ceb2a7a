"""Load published gated SAEs from any of their formats with one call.

Sources, tried in this order:

1. a local folder (``source``, joined with ``folder`` if given) in SAELens format
   (``cfg.json`` + ``sae_weights.safetensors``) or dictionary_learning / SAEBench format
   (``ae.pt`` + ``config.json``);
2. a SAELens pretrained release (``source``) and SAE id (``folder``), loaded by SAELens's
   own ``from_pretrained``;
3. a Hugging Face repo id (``source``) and a folder in it, in either local format.

Every local file is validated before an SAE is built, and a problem raises one
:class:`GatedSAELoadError` that names the file and the key or field. Source files are only
read.
"""

import json
import logging
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import EntryNotFoundError
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface
from sae_lens.loading.pretrained_saes_directory import (
    get_pretrained_saes_directory,
    get_repo_id_and_folder_name,
)
from sae_lens.saes.sae import SAEMetadata
from sae_lens.util import dtype_to_str, str_to_dtype
from safetensors import safe_open

from sae_lens_gated.conversion import (
    DICTIONARY_LEARNING_CONFIG_FILENAME,
    DICTIONARY_LEARNING_CONFIG_METADATA_KEY,
    DICTIONARY_LEARNING_DICT_CLASS,
    DICTIONARY_LEARNING_WEIGHTS_FILENAME,
    GATED_PARAM_NAMES,
    build_gated_sae,
    dictionary_learning_shapes,
    gated_shapes,
    hook_name_for_submodule,
    state_dict_from_dictionary_learning,
)
from sae_lens_gated.saes.gated_sae import GatedSAE, GatedSAEConfig

logger = logging.getLogger(__name__)

_SAELENS_FILES = (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME)
_DICTIONARY_LEARNING_FILES = (
    DICTIONARY_LEARNING_CONFIG_FILENAME,
    DICTIONARY_LEARNING_WEIGHTS_FILENAME,
)
# A Hugging Face repo id: exactly one slash, no leading dot (which would be a local path).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Pre-6.0 SAELens sometimes saved an all-ones "scaling_factor"; SAELens drops it on load.
_IGNORABLE_ONES_KEY = "scaling_factor"


class GatedSAELoadError(ValueError):
    """A source that cannot be loaded as a gated SAE; the message names file and key."""


def load_gated_sae(
    source: str | Path,
    folder: str | None = None,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
) -> GatedSAE:
    """Load a gated SAE from a local folder, a SAELens release or a Hugging Face repo.

    Args:
        source: A local folder; a SAELens pretrained release name (e.g.
            ``"sae_bench_pythia70m_sweep_gated_ctx128_0730"``); or a Hugging Face repo id
            (``"owner/name"``, downloaded through the local cache and ``HF_HUB_OFFLINE``).
        folder: A subfolder of the local folder or the repo, or the SAE id in a release.
        device: Device of the returned SAE.
        dtype: Dtype of the returned SAE. None keeps what the source records: ``cfg.json``'s
            ``dtype`` for SAELens folders, the tensors' dtype in ``ae.pt``, SAELens's float32
            for releases.

    Returns:
        The plugin's inference :class:`GatedSAE`, with ``cfg.metadata`` filled from the source.

    Raises:
        GatedSAELoadError: The source is not found, not gated, or its files are invalid.
    """
    dtype_name = None if dtype is None else dtype_to_str(str_to_dtype(dtype))
    base = Path(source)
    local = base / folder if folder else base
    if local.is_dir():
        return _load_local_folder(local, device=device, dtype=dtype_name)
    if base.is_dir():
        raise GatedSAELoadError(f"{local} does not exist or is not a folder.")
    if isinstance(source, str):
        if source in get_pretrained_saes_directory():
            return _load_release(source, folder, device, dtype_name)
        if _REPO_ID.fullmatch(source):
            return _load_from_hub(source, folder, device, dtype_name)
    where = repr(str(source)) + (f" (folder {folder!r})" if folder else "")
    raise GatedSAELoadError(
        f"{where} is not a local folder, a SAELens pretrained release or a Hugging Face "
        "repo id ('owner/name')."
    )


def _load_local_folder(
    path: str | Path, *, device: str = "cpu", dtype: str | None = None
) -> GatedSAE:
    """Load a local SAELens or dictionary_learning gated SAE folder (format detected).

    Args:
        path: A folder with ``cfg.json`` + ``sae_weights.safetensors`` (SAELens) or
            ``ae.pt`` + ``config.json`` (dictionary_learning / SAEBench).
        device: Device of the returned SAE.
        dtype: Dtype of the returned SAE (None: as the source records).
    """
    path = Path(path)
    names = {p.name for p in path.iterdir()}
    if set(_SAELENS_FILES) <= names:
        return _load_saelens_folder(path, device, dtype)
    if set(_DICTIONARY_LEARNING_FILES) <= names:
        return _load_dictionary_learning_folder(path, device, dtype)
    found = ", ".join(sorted(names)[:20]) or "nothing"
    raise GatedSAELoadError(
        f"{path} is neither a SAELens SAE folder ({' + '.join(_SAELENS_FILES)}) nor a "
        f"dictionary_learning one ({' + '.join(_DICTIONARY_LEARNING_FILES)}); found: "
        f"{found}."
    )


def _load_saelens_folder(path: Path, device: str, dtype: str | None) -> GatedSAE:
    cfg_path = path / SAE_CFG_FILENAME
    cfg = _read_json_object(cfg_path)
    architecture = cfg.get("architecture")
    if architecture != GatedSAEConfig.architecture():
        raise GatedSAELoadError(
            f"{cfg_path}: field 'architecture' is {architecture!r}, expected 'gated'."
        )
    d_in, d_sae = _dimension(cfg, "d_in", cfg_path), _dimension(cfg, "d_sae", cfg_path)
    weights_path = path / SAE_WEIGHTS_FILENAME
    try:
        with safe_open(weights_path, framework="pt", device="cpu") as f:  # type: ignore[no-untyped-call]
            keys = set(f.keys())
            extra_ones = keys & {_IGNORABLE_ONES_KEY}
            _check_keys(weights_path, keys - extra_ones, GATED_PARAM_NAMES)
            expected = gated_shapes(d_in, d_sae)
            for key in GATED_PARAM_NAMES:
                shape = tuple(f.get_slice(key).get_shape())
                _check_shape(weights_path, key, shape, expected[key], cfg_path)
            for key in sorted(keys):
                tensor = f.get_tensor(key)
                if key in extra_ones and not bool((tensor == 1).all()):
                    raise GatedSAELoadError(
                        f"{weights_path}: unexpected key {key!r} (a finetuning scaling "
                        "factor that is not all ones, which gated SAEs do not support)."
                    )
                _check_finite(weights_path, key, tensor)
    except GatedSAELoadError:
        raise
    except Exception as error:
        raise GatedSAELoadError(
            f"{weights_path} is not a readable safetensors file (truncated or corrupt?): "
            f"{error}"
        ) from error
    return GatedSAE.load_from_disk(path, device=device, dtype=dtype)


def _load_dictionary_learning_folder(
    path: Path, device: str, dtype: str | None
) -> GatedSAE:
    config_path = path / DICTIONARY_LEARNING_CONFIG_FILENAME
    config = _read_json_object(config_path)
    trainer = config.get("trainer")
    if not isinstance(trainer, dict):
        raise GatedSAELoadError(
            f"{config_path}: field 'trainer' is missing or not an object."
        )
    dict_class = trainer.get("dict_class")
    if dict_class != DICTIONARY_LEARNING_DICT_CLASS:
        raise GatedSAELoadError(
            f"{config_path}: field 'trainer.dict_class' is {dict_class!r}, expected "
            f"{DICTIONARY_LEARNING_DICT_CLASS!r} (only gated SAEs are loaded)."
        )
    d_in = _dimension(trainer, "activation_dim", config_path, "trainer.")
    d_sae = _dimension(trainer, "dict_size", config_path, "trainer.")

    weights_path = path / DICTIONARY_LEARNING_WEIGHTS_FILENAME
    raw = _load_plain_state_dict(weights_path)
    expected = dictionary_learning_shapes(d_in, d_sae)
    _check_keys(weights_path, raw, expected)
    for key, shape in expected.items():
        _check_shape(weights_path, key, tuple(raw[key].shape), shape, config_path)
        _check_finite(weights_path, key, raw[key])

    stored_dtype = raw[next(iter(expected))].dtype
    try:
        dtype_name = dtype or dtype_to_str(stored_dtype)
    except ValueError as error:
        raise GatedSAELoadError(
            f"{weights_path}: tensors are {stored_dtype}, which SAELens does not support; "
            "pass dtype= to convert."
        ) from error
    cfg = GatedSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        dtype=dtype_name,
        device=device,
        # dictionary_learning always subtracts decoder_bias before the encoder.
        apply_b_dec_to_input=True,
        metadata=SAEMetadata(**_dictionary_learning_metadata(config, config_path)),
    )
    return build_gated_sae(
        cfg,
        state_dict_from_dictionary_learning(raw),
        device,
        str_to_dtype(dtype_name),
    )


def _dictionary_learning_metadata(
    config: dict[str, Any], config_path: Path
) -> dict[str, Any]:
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
        "sae_lens_training_version": None,
        "model_name": lm_name.split("/")[-1] if isinstance(lm_name, str) else None,
        "hook_name": hook_name,
        "hook_head_index": None,
        "context_size": buffer.get("ctx_len") if isinstance(buffer, dict) else None,
        "prepend_bos": True,
        DICTIONARY_LEARNING_CONFIG_METADATA_KEY: config,
    }


def _load_release(
    release: str, sae_id: str | None, device: str, dtype: str | None
) -> GatedSAE:
    saes = get_pretrained_saes_directory()[release].saes_map
    if sae_id is None or sae_id not in saes:
        some = ", ".join(list(saes)[:5])
        raise GatedSAELoadError(
            f"SAELens release {release!r} has no SAE id {sae_id!r}; pass one as folder= "
            f"(e.g. {some}, ...)."
        )
    # The config alone says whether the release is gated, before any weights download.
    architecture = load_sae_config_from_huggingface(release, sae_id, device=device).get(
        "architecture"
    )
    if architecture != GatedSAEConfig.architecture():
        raise GatedSAELoadError(
            f"SAELens release {release!r}, SAE id {sae_id!r}: config field 'architecture' "
            f"is {architecture!r}, expected 'gated'."
        )
    # The plugin's class resolves "gated" to itself, registered or not.
    sae = GatedSAE.from_pretrained(
        release, sae_id, device=device, dtype=dtype or "float32"
    )
    repo_id, folder_name = get_repo_id_and_folder_name(release, sae_id)
    for name in GATED_PARAM_NAMES:
        _check_finite(Path(repo_id) / folder_name, name, getattr(sae, name))
    return sae


def _load_from_hub(
    repo_id: str, folder: str | None, device: str, dtype: str | None
) -> GatedSAE:
    loaders: tuple[tuple[tuple[str, str], Callable[..., GatedSAE]], ...] = (
        (_SAELENS_FILES, _load_saelens_folder),
        (_DICTIONARY_LEARNING_FILES, _load_dictionary_learning_folder),
    )
    for names, loader in loaders:
        try:
            paths = [
                Path(
                    hf_hub_download(
                        repo_id=repo_id,
                        filename=f"{folder.strip('/')}/{name}" if folder else name,
                    )
                )
                for name in names
            ]
        except EntryNotFoundError:
            continue
        # Both files come from one snapshot folder of the cache.
        return loader(paths[0].parent, device, dtype)
    offline = " (offline: only the local cache was searched)"
    raise GatedSAELoadError(
        f"{repo_id!r} is not a local folder, and Hugging Face repo {repo_id!r}, folder "
        f"{folder or '.'!r} has neither "
        f"{' + '.join(_SAELENS_FILES)} nor {' + '.join(_DICTIONARY_LEARNING_FILES)}"
        f"{offline if hf_constants.HF_HUB_OFFLINE else ''}."
    )


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as error:
        raise GatedSAELoadError(f"{path} is not readable JSON: {error}") from error
    if not isinstance(value, dict):
        raise GatedSAELoadError(f"{path} does not hold a JSON object.")
    return value


def _dimension(
    mapping: Mapping[str, Any], key: str, path: Path, prefix: str = ""
) -> int:
    value = mapping.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise GatedSAELoadError(
            f"{path}: field '{prefix}{key}' is {value!r}, expected a positive integer."
        )
    return value


def _load_plain_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a tensors-only ``torch.save`` checkpoint without running any pickled code."""
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


def _check_keys(path: Path, found: Iterable[str], expected: Iterable[str]) -> None:
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


def _check_shape(
    path: Path,
    key: str,
    actual: tuple[int, ...],
    expected: tuple[int, ...],
    config_path: Path,
) -> None:
    if actual != expected:
        raise GatedSAELoadError(
            f"{path}: key {key!r} has shape {actual}, expected {expected} from the sizes "
            f"in {config_path}."
        )


def _check_finite(path: Path, key: str, tensor: torch.Tensor) -> None:
    bad = int((~torch.isfinite(tensor)).sum().item())
    if bad:
        raise GatedSAELoadError(
            f"{path}: key {key!r} has {bad} non-finite value(s) (NaN or inf)."
        )
