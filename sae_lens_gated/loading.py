"""Load published gated SAEs from any of their formats with one call.

Sources, tried in this order:

1. a local folder (``source``, joined with ``folder`` if given) in SAELens format
   (``cfg.json`` + ``sae_weights.safetensors``) or dictionary_learning / SAEBench format
   (``ae.pt`` + ``config.json``);
2. a SAELens pretrained release (``source``) and SAE id (``folder``), loaded by SAELens's
   own ``from_pretrained`` (with the plugin's checked converter for dictionary_learning
   releases);
3. a Hugging Face repo id (``source``) and a folder in it, in either local format.

Each format is read by its module in :mod:`sae_lens_gated.formats`, which validates every
file before an SAE is built; a problem raises one :class:`GatedSAELoadError` that names the
file and the key or field. Source files are only read.
"""

import re
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import LocalEntryNotFoundError
from sae_lens.loading.pretrained_sae_loaders import (
    PretrainedSaeDiskLoader,
    PretrainedSaeHuggingfaceLoader,
    get_conversion_loader_name,
    load_sae_config_from_huggingface,
)
from sae_lens.loading.pretrained_saes_directory import (
    get_pretrained_saes_directory,
    get_repo_id_and_folder_name,
)
from sae_lens.util import dtype_to_str, str_to_dtype

from sae_lens_gated.formats.dictionary_learning import (
    DICTIONARY_LEARNING_FILES,
    dictionary_learning_disk_loader,
    dictionary_learning_huggingface_loader,
)
from sae_lens_gated.formats.hub import (
    OFFLINE_NOTE,
    HubFileMissingError,
    check_hub_path,
    download_hub_file,
)
from sae_lens_gated.formats.saelens import SAELENS_FILES, saelens_disk_loader
from sae_lens_gated.formats.validation import (
    GATED_PARAM_NAMES,
    GatedSAELoadError,
    check_finite,
)
from sae_lens_gated.saes.gated_sae import GatedSAE, GatedSAEConfig

__all__ = ["GatedSAELoadError", "load_gated_sae"]

# A Hugging Face repo id: exactly one slash, no leading dot (which would be a local path).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Each local format: its files and the converter that reads (and checks) them.
_FORMATS: tuple[tuple[tuple[str, str], PretrainedSaeDiskLoader], ...] = (
    (SAELENS_FILES, saelens_disk_loader),
    (DICTIONARY_LEARNING_FILES, dictionary_learning_disk_loader),
)
# SAELens's converters the plugin replaces by its own checked reader, by SAELens's name.
_RELEASE_CONVERTERS: dict[str, PretrainedSaeHuggingfaceLoader] = {
    "dictionary_learning_1": dictionary_learning_huggingface_loader,
}


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


def _load_local_folder(path: Path, device: str, dtype: str | None) -> GatedSAE:
    """Load a local SAELens or dictionary_learning gated SAE folder (format detected)."""
    names = {p.name for p in path.iterdir()}
    for files, converter in _FORMATS:
        if set(files) <= names:
            return GatedSAE.load_from_disk(
                path, device=device, dtype=dtype, converter=converter
            )
    found = ", ".join(sorted(names)[:20]) or "nothing"
    raise GatedSAELoadError(
        f"{path} is neither a SAELens SAE folder ({' + '.join(SAELENS_FILES)}) nor a "
        f"dictionary_learning one ({' + '.join(DICTIONARY_LEARNING_FILES)}); found: "
        f"{found}."
    )


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
    repo_id, folder_name = get_repo_id_and_folder_name(release, sae_id)
    where = (
        f"SAELens release {release!r}, SAE id {sae_id!r} (Hugging Face repo "
        f"{repo_id!r}, folder {folder_name!r})"
    )
    converter = _RELEASE_CONVERTERS.get(get_conversion_loader_name(release))
    try:
        if converter is None:
            _check_release_is_gated(release, sae_id, device, where)
        # SAELens's own from_pretrained, with the plugin's checked reader where it has
        # one; the plugin's class resolves "gated" to itself, registered or not.
        sae = GatedSAE.from_pretrained(
            release,
            sae_id,
            device=device,
            dtype=dtype or "float32",
            converter=converter,
        )
    except (HubFileMissingError, LocalEntryNotFoundError) as error:
        if hf_constants.HF_HUB_OFFLINE:
            raise GatedSAELoadError(
                f"{where} is not in the local Hugging Face cache, and {OFFLINE_NOTE}."
            ) from error
        raise GatedSAELoadError(f"{where} could not be fetched: {error}") from error
    if converter is None:
        for name in GATED_PARAM_NAMES:
            check_finite(Path(repo_id) / folder_name, name, getattr(sae, name))
    return sae


def _check_release_is_gated(release: str, sae_id: str, device: str, where: str) -> None:
    """Refuse a release SAELens does not describe as gated, before its weights download."""
    architecture = load_sae_config_from_huggingface(release, sae_id, device=device).get(
        "architecture"
    )
    if architecture != GatedSAEConfig.architecture():
        raise GatedSAELoadError(
            f"{where}: config field 'architecture' is {architecture!r}, expected 'gated'."
        )


def _load_from_hub(
    repo_id: str, folder: str | None, device: str, dtype: str | None
) -> GatedSAE:
    folder = check_hub_path(repo_id, folder)
    for files, converter in _FORMATS:
        try:
            paths = [download_hub_file(repo_id, folder, name) for name in files]
        except HubFileMissingError:
            continue
        # Both files come from one snapshot folder of the cache.
        return GatedSAE.load_from_disk(
            paths[0].parent, device=device, dtype=dtype, converter=converter
        )
    offline = " (offline: only the local cache was searched)"
    raise GatedSAELoadError(
        f"{repo_id!r} is not a local folder, and Hugging Face repo {repo_id!r}, folder "
        f"{folder or '.'!r} has neither {' + '.join(SAELENS_FILES)} nor "
        f"{' + '.join(DICTIONARY_LEARNING_FILES)}"
        f"{offline if hf_constants.HF_HUB_OFFLINE else ''}."
    )
