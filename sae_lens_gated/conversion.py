"""Take gated SAEs to formats other tools read: SAELens JumpReLU and dictionary_learning.

Also holds :func:`as_gated_sae`, which turns anything gated (the plugin's training class,
SAELens's built-in classes) into the plugin's inference :class:`GatedSAE`, and the
all-or-nothing creation of a new folder that every export uses. The formats themselves live
in :mod:`sae_lens_gated.formats`.
"""

import copy
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAE, TrainingSAEConfig
from sae_lens.util import dtype_to_str

from sae_lens_gated.formats.dictionary_learning import (
    DICTIONARY_LEARNING_CONFIG_FILENAME,
    DICTIONARY_LEARNING_WEIGHTS_FILENAME,
    check_dictionary_learning_compatible,
    dictionary_learning_config,
    state_dict_to_dictionary_learning,
    write_dictionary_learning,
)
from sae_lens_gated.formats.validation import (
    GATED_PARAM_NAMES,
    GatedSAEExportError,
    count_non_finite,
)
from sae_lens_gated.saes.gated_sae import GatedSAE, GatedSAEConfig

__all__ = [
    "EXPORT_FORMATS",
    "ExportFormat",
    "GatedSAEExportError",
    "as_gated_sae",
    "build_gated_sae",
    "check_new_folder",
    "dictionary_learning_state_dict",
    "export_sae",
    "save_dictionary_learning",
    "to_jumprelu",
    "write_new_folder",
]

logger = logging.getLogger(__name__)

# An export's partial folder is ".NAME" + this + "PID-RANDOM", beside the folder NAME.
_PARTIAL_MARK = ".sae-lens-gated-partial-"
# os.access checks the real user unless told otherwise; the effective one is what counts.
_EFFECTIVE_IDS = os.access in os.supports_effective_ids

ExportFormat = Literal["saelens", "jumprelu", "dictionary_learning"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = (
    "saelens",
    "jumprelu",
    "dictionary_learning",
)


def build_gated_sae(
    cfg: GatedSAEConfig,
    state_dict: Mapping[str, torch.Tensor],
    device: str | torch.device,
    dtype: torch.dtype,
) -> GatedSAE:
    """Build the plugin's :class:`GatedSAE` around the six gated tensors.

    The SAE is created on the meta device and the tensors are assigned, so no random
    initialisation is computed and no second copy of the weights is held.

    Args:
        cfg: The inference config; its ``device`` and ``dtype`` are replaced by the arguments.
        state_dict: Exactly the tensors named in :data:`GATED_PARAM_NAMES`, SAELens layout.
        device: Device of the returned SAE.
        dtype: Dtype of the returned SAE.
    """
    cfg.device = "meta"
    sae = GatedSAE(cfg)
    sae.load_state_dict(dict(state_dict), assign=True)
    return sae.to(device=device, dtype=dtype)


def as_gated_sae(sae: SAE[Any]) -> GatedSAE:
    """Return ``sae`` as the plugin's inference :class:`GatedSAE`.

    The plugin's inference SAE is returned as is; any other gated SAE (the plugin's
    :class:`GatedTrainingSAE`, SAELens's built-in gated classes) is copied into a new one
    with the same tensors, device, dtype and inference config.

    Args:
        sae: Any SAELens SAE whose config says ``architecture="gated"``.
    """
    if type(sae) is GatedSAE:
        return sae
    architecture = sae.cfg.architecture()
    if architecture != GatedSAEConfig.architecture() or not all(
        isinstance(getattr(sae, name, None), torch.Tensor) for name in GATED_PARAM_NAMES
    ):
        raise GatedSAEExportError(
            f"Expected a gated SAE, got {type(sae).__name__} with "
            f"architecture={architecture!r}."
        )
    cfg_dict = (
        sae.cfg.get_inference_sae_cfg_dict()
        if isinstance(sae.cfg, TrainingSAEConfig)
        else sae.cfg.to_dict()
    )
    state = {name: getattr(sae, name).detach().clone() for name in GATED_PARAM_NAMES}
    return build_gated_sae(
        GatedSAEConfig.from_dict(copy.deepcopy(cfg_dict)), state, sae.device, sae.dtype
    )


def _float64_device(tensor: torch.Tensor) -> torch.device:
    # MPS has no float64; compute there on the CPU instead.
    return torch.device("cpu") if tensor.device.type == "mps" else tensor.device


def _finite_gated(sae: SAE[Any]) -> GatedSAE:
    """:func:`as_gated_sae`, refusing an SAE with NaN or inf parameters."""
    gated = as_gated_sae(sae)
    for name in GATED_PARAM_NAMES:
        if bad := count_non_finite(getattr(gated, name)):
            raise GatedSAEExportError(
                f"Refusing to export: {name} has {bad} non-finite value(s) (NaN or inf)."
            )
    return gated


def _check_converted(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse converted tensors that overflowed when cast back to the SAE's dtype."""
    for name, tensor in tensors.items():
        if bad := count_non_finite(tensor):
            raise GatedSAEExportError(
                f"Refusing to export: the {what} {name} has {bad} non-finite value(s) in "
                f"{dtype_to_str(tensor.dtype)} (the conversion overflows that dtype)."
            )


@torch.no_grad()
def to_jumprelu(sae: SAE[Any]) -> JumpReLUSAE:
    """The SAELens :class:`JumpReLUSAE` that computes the same features.

    The same features exactly in real arithmetic; in floating point, exact up to rounding
    at the threshold: an input whose gate pre-activation is within a few rounding errors of
    0 (exactly at the threshold, say) can open the gate in one SAE and not in the other.

    Paper App. E: with ``pre = (x - b_dec) @ W_enc`` and ``z = pre * exp(r_mag) + b_mag``, the
    gate ``pre + b_gate > 0`` is ``z > b_mag - exp(r_mag) * b_gate``, so the gated features
    ``1[pi_gate > 0] * ReLU(z)`` are SAELens's JumpReLU ``ReLU(z) * 1[z > threshold]`` with
    ``W_enc' = W_enc * exp(r_mag)``, ``b_enc = b_mag`` and that threshold (negative thresholds
    included: the ReLU keeps those features non-negative). The decoder, ``b_dec`` and input
    processing are unchanged. Computed in float64, then cast to the SAE's dtype.

    Args:
        sae: Any gated SAE (see :func:`as_gated_sae`).

    Raises:
        GatedSAEExportError: ``sae`` is not gated, has NaN or inf parameters, or its
            JumpReLU parameters overflow its dtype.
    """
    gated = _finite_gated(sae)
    device = _float64_device(gated.W_enc)
    scale = gated.r_mag.to(device, torch.float64).exp()
    W_enc = gated.W_enc.to(device, torch.float64) * scale
    b_mag = gated.b_mag.to(device, torch.float64)
    threshold = b_mag - scale * gated.b_gate.to(device, torch.float64)
    metadata = copy.deepcopy(gated.cfg.metadata)
    metadata["converted_from_architecture"] = GatedSAEConfig.architecture()
    cfg = JumpReLUSAEConfig(
        d_in=gated.cfg.d_in,
        d_sae=gated.cfg.d_sae,
        dtype=gated.cfg.dtype,
        device="meta",
        apply_b_dec_to_input=gated.cfg.apply_b_dec_to_input,
        normalize_activations=gated.cfg.normalize_activations,
        reshape_activations=gated.cfg.reshape_activations,
        metadata=metadata,
    )
    jumprelu = JumpReLUSAE(cfg)
    state = {
        "W_enc": W_enc,
        "b_enc": b_mag,
        "threshold": threshold,
        "W_dec": gated.W_dec.detach().clone(),
        "b_dec": gated.b_dec.detach().clone(),
    }
    state = {k: v.to(gated.device, gated.dtype) for k, v in state.items()}
    _check_converted(state, "JumpReLU")
    jumprelu.load_state_dict(state, assign=True)
    return jumprelu.to(device=gated.device, dtype=gated.dtype)


@torch.no_grad()
def dictionary_learning_state_dict(sae: SAE[Any]) -> dict[str, torch.Tensor]:
    """The ``ae.pt`` state dict of dictionary_learning's ``GatedAutoEncoder`` for ``sae``.

    dictionary_learning always subtracts ``decoder_bias`` before the encoder. For an SAE
    with ``apply_b_dec_to_input=False`` the difference is folded into the biases exactly
    (in float64): ``gate_bias = b_gate + b_dec @ W_enc`` and
    ``mag_bias = b_mag + exp(r_mag) * (b_dec @ W_enc)``.

    Args:
        sae: Any gated SAE (see :func:`as_gated_sae`) without run-time normalization or
            per-head reshaping.
    """
    gated = _finite_gated(sae)
    check_dictionary_learning_compatible(gated.cfg)
    params = {name: getattr(gated, name).detach() for name in GATED_PARAM_NAMES}
    if not gated.cfg.apply_b_dec_to_input:
        device = _float64_device(gated.W_enc)
        shift = params["b_dec"].to(device, torch.float64) @ params["W_enc"].to(
            device, torch.float64
        )
        scale = params["r_mag"].to(device, torch.float64).exp()
        params["b_gate"] = (params["b_gate"].to(device, torch.float64) + shift).to(
            gated.device, gated.dtype
        )
        params["b_mag"] = (
            params["b_mag"].to(device, torch.float64) + scale * shift
        ).to(gated.device, gated.dtype)
        _check_converted(
            {"gate_bias": params["b_gate"], "mag_bias": params["b_mag"]},
            "dictionary_learning",
        )
    return state_dict_to_dictionary_learning(params)


def check_new_folder(path: str | Path) -> None:
    """Raise an ``OSError`` unless a new folder can be written at ``path``.

    ``path`` must be absent or an empty folder (not a symbolic link, even to one), and the
    nearest existing folder above it must allow creating files. Meant to run before any
    work, so a bad destination is reported before a long load or conversion.

    Raises:
        FileExistsError: ``path`` is a file, a non-empty folder or a symbolic link.
        NotADirectoryError: Something above ``path`` is a file.
        PermissionError: The folder ``path`` would be created in is not writable.
    """
    path = Path(path)
    if path.is_symlink():
        raise FileExistsError(
            f"Refusing to write to {path}: it is a symbolic link (to "
            f"{os.readlink(path)}); give the path of a new or empty folder instead."
        )
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"Refusing to write to {path}: it already exists and is not an empty folder."
        )
    # The parents are created as needed: what counts is the nearest one that exists.
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise NotADirectoryError(
            f"Refusing to write to {path}: {parent} is not a folder."
        )
    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=_EFFECTIVE_IDS):
        raise PermissionError(
            f"Refusing to write to {path}: cannot create files in {parent}."
        )


def _partial_folder_pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        re.escape(f".{name}{_PARTIAL_MARK}") + r"(?P<pid>\d+)-[0-9a-f]{8}"
    )


def _process_is_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


def _remove_stale_partial_folders(path: Path) -> None:
    """Remove what exports to ``path`` left behind when they were killed mid-write."""
    if os.name != "posix":  # os.kill(pid, 0) is not a harmless probe elsewhere
        return
    pattern = _partial_folder_pattern(path.name)
    try:
        entries = list(path.parent.iterdir())
    except OSError:  # a folder we may write to but not list
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if (
            match is None
            or entry.is_symlink()
            or not entry.is_dir()
            or _process_is_alive(int(match["pid"]))
        ):
            continue
        logger.info("Removing %s, left by an export that was interrupted.", entry)
        shutil.rmtree(entry, ignore_errors=True)


def _make_partial_folder(path: Path) -> Path:
    """Create the hidden sibling of ``path`` that an export writes into."""
    while True:
        partial = path.with_name(
            f".{path.name}{_PARTIAL_MARK}{os.getpid()}-{secrets.token_hex(4)}"
        )
        try:
            # Unlike tempfile.mkdtemp's 0700, the folder gets the umask's permissions,
            # which it keeps once renamed to path.
            partial.mkdir()
        except FileExistsError:
            continue
        return partial


def write_new_folder(path: str | Path, write: Callable[[Path], object]) -> list[Path]:
    """Create the folder ``path`` with ``write(folder)``, all or nothing.

    ``path`` is checked first (:func:`check_new_folder`): an existing non-empty folder is
    never overwritten. Files are written into a hidden sibling folder,
    ``.NAME.sae-lens-gated-partial-PID-RANDOM``, renamed to ``path`` only once ``write``
    has returned; on an error it is removed. A process killed mid-write leaves it behind,
    and the next write to the same ``path`` removes it once process PID has ended.

    Args:
        path: The folder to create; an empty existing folder is replaced.
        write: Writes the files into the folder it is given.

    Returns:
        The written files, in ``path``.
    """
    path = Path(path)
    check_new_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partial_folders(path)
    partial = _make_partial_folder(path)
    try:
        write(partial)
        names = sorted(p.name for p in partial.iterdir())
        if path.exists():
            path.rmdir()
        partial.rename(path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return [path / name for name in names]


def save_dictionary_learning(sae: SAE[Any], path: str | Path) -> tuple[Path, Path]:
    """Save a gated SAE as dictionary_learning's ``ae.pt`` + ``config.json``.

    ``dictionary_learning.GatedAutoEncoder.from_pretrained(path / "ae.pt")`` then computes
    the same features and reconstructions (see :func:`dictionary_learning_state_dict` for
    the ``apply_b_dec_to_input=False`` fold and what is refused). ``ae.pt`` is a plain state
    dict of tensors, loadable with ``torch.load(..., weights_only=True)``. The folder is
    created all or nothing, and an existing non-empty ``path`` is refused.

    Args:
        sae: Any gated SAE (see :func:`as_gated_sae`).
        path: The folder to create.

    Returns:
        The paths of ``ae.pt`` and ``config.json``.
    """
    check_new_folder(path)
    state = dictionary_learning_state_dict(sae)
    config = dictionary_learning_config(sae)
    write_new_folder(
        path, lambda folder: write_dictionary_learning(folder, state, config)
    )
    path = Path(path)
    return (
        path / DICTIONARY_LEARNING_WEIGHTS_FILENAME,
        path / DICTIONARY_LEARNING_CONFIG_FILENAME,
    )


def export_sae(sae: SAE[Any], path: str | Path, to: ExportFormat) -> list[Path]:
    """Write a gated SAE to a new folder in one of the supported formats.

    Args:
        sae: Any gated SAE (see :func:`as_gated_sae`).
        path: The folder to create (an existing non-empty folder is refused).
        to: ``"saelens"`` (``"gated"`` SAELens folder), ``"jumprelu"`` (SAELens JumpReLU
            folder, :func:`to_jumprelu`) or ``"dictionary_learning"``
            (:func:`save_dictionary_learning`).

    Returns:
        The written files.
    """
    if to not in EXPORT_FORMATS:
        raise ValueError(f"Unknown format {to!r}: expected one of {EXPORT_FORMATS}.")
    check_new_folder(path)
    if to == "dictionary_learning":
        return list(save_dictionary_learning(sae, path))
    if to == "saelens":
        target: SAE[Any] = _finite_gated(sae)
    else:
        target = to_jumprelu(sae)
    return write_new_folder(path, target.save_model)
