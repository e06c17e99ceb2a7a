import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file

from sae_lens_gated import GatedSAE, GatedSAEConfig, GatedSAELoadError, to_jumprelu
from sae_lens_gated.formats.saelens import check_saelens_folder, saelens_disk_loader
from tests.helpers import GATED_PARAM_NAMES, write_saelens_folder


def _corrupt(path: Path, edit: Any) -> None:
    state = load_file(path / "sae_weights.safetensors")
    edit(state)
    save_file(state, path / "sae_weights.safetensors")


def _set(key: str, index: int, value: float) -> Any:
    def edit(state: dict[str, torch.Tensor]) -> None:
        tensor = state[key]
        tensor[torch.unravel_index(torch.tensor(index), tensor.shape)] = value

    return edit


def test_saelens_load_from_disk_with_the_converter_loads_a_valid_folder(
    tmp_path: Path,
):
    saved = write_saelens_folder(tmp_path / "sl", seed=1)
    loaded = SAE.load_from_disk(tmp_path / "sl", converter=saelens_disk_loader)
    assert type(loaded) is GatedSAE
    for name in GATED_PARAM_NAMES:
        torch.testing.assert_close(
            getattr(loaded, name), getattr(saved, name), rtol=0, atol=0
        )


def test_saelens_load_from_disk_with_the_converter_refuses_an_invalid_folder(
    tmp_path: Path,
):
    write_saelens_folder(tmp_path / "sl")
    _corrupt(tmp_path / "sl", lambda s: s.update(W_enc=s["W_enc"][:, :40].contiguous()))
    # Control: SAELens's own loader fails deep inside torch, naming no file.
    with pytest.raises(RuntimeError, match="size mismatch"):
        SAE.load_from_disk(tmp_path / "sl")
    with pytest.raises(GatedSAELoadError) as error:
        SAE.load_from_disk(tmp_path / "sl", converter=saelens_disk_loader)
    assert str(error.value) == (
        f"{tmp_path / 'sl' / 'sae_weights.safetensors'}: key 'W_enc' has shape "
        f"(16, 40), expected (16, 48) from the sizes in {tmp_path / 'sl' / 'cfg.json'}."
    )


# name: (edit of sae_weights.safetensors, expected words, key named)
CORRUPTIONS: dict[str, tuple[Any, str, str]] = {
    "missing key": (lambda s: s.pop("r_mag"), "missing key(s) 'r_mag'", "r_mag"),
    "extra key": (
        lambda s: s.update(threshold=torch.zeros(48)),
        "unexpected key(s) 'threshold'",
        "threshold",
    ),
    "NaN weight": (
        _set("b_gate", 7, float("nan")),
        "has 1 non-finite value(s)",
        "b_gate",
    ),
    "inf weight": (
        _set("W_enc", 3, float("-inf")),
        "has 1 non-finite value(s)",
        "W_enc",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_validation_errors_name_file_and_key(tmp_path: Path, corruption: str):
    edit, words, key = CORRUPTIONS[corruption]
    write_saelens_folder(tmp_path / "sl")
    _corrupt(tmp_path / "sl", edit)
    with pytest.raises(GatedSAELoadError) as error:
        check_saelens_folder(tmp_path / "sl")
    message = str(error.value)
    assert str(tmp_path / "sl" / "sae_weights.safetensors") in message
    assert words in message and f"'{key}'" in message


def test_shape_mismatch_with_the_config_is_an_error(tmp_path: Path):
    write_saelens_folder(tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps({**cfg, "d_in": 15}))
    with pytest.raises(GatedSAELoadError, match=r"'W_enc' has shape \(16, 48\), "):
        check_saelens_folder(tmp_path / "sl")


def test_all_ones_scaling_factor_of_old_saelens_saves_is_ignored(tmp_path: Path):
    saved = write_saelens_folder(tmp_path / "sl")
    _corrupt(tmp_path / "sl", lambda s: s.update(scaling_factor=torch.ones(48)))
    _, state = saelens_disk_loader(tmp_path / "sl")
    assert set(state) == set(GATED_PARAM_NAMES)
    torch.testing.assert_close(state["W_enc"], saved.W_enc, rtol=0, atol=0)
    _corrupt(tmp_path / "sl", _set("scaling_factor", 0, 2.0))
    with pytest.raises(GatedSAELoadError, match="unexpected key 'scaling_factor'"):
        saelens_disk_loader(tmp_path / "sl")


def test_non_gated_saelens_folder_is_refused(tmp_path: Path):
    gated = GatedSAE(GatedSAEConfig(d_in=16, d_sae=48))
    to_jumprelu(gated).save_model(tmp_path / "jumprelu")
    with pytest.raises(GatedSAELoadError) as error:
        check_saelens_folder(tmp_path / "jumprelu")
    assert str(error.value) == (
        f"{tmp_path / 'jumprelu' / 'cfg.json'}: field 'architecture' is 'jumprelu', "
        "expected 'gated'."
    )


@pytest.mark.parametrize(
    ("field", "value"), [("d_in", 0), ("d_sae", "48"), ("d_sae", True)]
)
def test_bad_sizes_are_refused(tmp_path: Path, field: str, value: Any):
    write_saelens_folder(tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(GatedSAELoadError) as error:
        check_saelens_folder(tmp_path / "sl")
    assert str(error.value) == (
        f"{tmp_path / 'sl' / 'cfg.json'}: field '{field}' is {value!r}, expected a "
        "positive integer."
    )


@pytest.mark.parametrize("keep_bytes", [40, -100])
def test_truncated_safetensors_is_refused(tmp_path: Path, keep_bytes: int):
    write_saelens_folder(tmp_path / "sl")
    weights = tmp_path / "sl" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep_bytes])
    with pytest.raises(GatedSAELoadError) as error:
        check_saelens_folder(tmp_path / "sl")
    assert f"{weights} is not a readable safetensors file" in str(error.value)


# --- cfg.json fields SAELens would choke on -----------------------------------------------


def _edit_cfg(folder: Path, **fields: Any) -> Path:
    cfg_path = folder / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(fields)
    cfg_path.write_text(json.dumps(cfg))
    return cfg_path


def _metadata_with(folder: Path, **fields: Any) -> dict[str, Any]:
    metadata = json.loads((folder / "cfg.json").read_text())["metadata"]
    return {**metadata, **fields}


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("float17", "is 'float17', expected one of 'float32', 'float64', 'float16', "),
        (5, "is 5, expected one of 'float32', "),
        (["float32"], "is ['float32'], expected one of 'float32', "),
        (None, "is None, expected one of 'float32', "),
    ],
)
def test_unknown_dtype_is_refused(tmp_path: Path, value: Any, words: str):
    write_saelens_folder(tmp_path / "sl")
    cfg_path = _edit_cfg(tmp_path / "sl", dtype=value)
    with pytest.raises(GatedSAELoadError) as error:
        SAE.load_from_disk(tmp_path / "sl", converter=saelens_disk_loader)
    assert str(error.value).startswith(f"{cfg_path}: field 'dtype' {words}")


def test_a_requested_dtype_replaces_a_bad_or_missing_one(tmp_path: Path):
    saved = write_saelens_folder(tmp_path / "sl")
    _edit_cfg(tmp_path / "sl", dtype="float17")
    # As in SAELens, a requested dtype replaces the field, so the file still loads.
    loaded = SAE.load_from_disk(
        tmp_path / "sl", dtype="float64", converter=saelens_disk_loader
    )
    assert loaded.cfg.dtype == "float64"
    torch.testing.assert_close(loaded.W_enc, saved.W_enc.double(), rtol=0, atol=0)


@pytest.mark.parametrize("value", ["bogus", "layernorm", 3, True, None])
def test_unknown_normalize_activations_is_refused(tmp_path: Path, value: Any):
    write_saelens_folder(tmp_path / "sl")
    cfg_path = _edit_cfg(tmp_path / "sl", normalize_activations=value)
    with pytest.raises(GatedSAELoadError) as error:
        SAE.load_from_disk(tmp_path / "sl", converter=saelens_disk_loader)
    message = str(error.value)
    assert message.startswith(
        f"{cfg_path}: field 'normalize_activations' is {value!r}, which SAELens does "
        "not know: "
    )
    assert "expected_average_only_in" in message  # SAELens's own list


@pytest.mark.parametrize(
    ("metadata", "field", "words"),
    [
        ([1, 2], "metadata", "is a list, expected an object"),
        ("gpt2", "metadata", "is a str, expected an object"),
        (None, "metadata", "is None, expected an object"),
        (
            {"sae_lens_version": 6},
            "metadata.sae_lens_version",
            "is 6, expected a string",
        ),
        (
            {"sae_lens_version": "six"},
            "metadata.sae_lens_version",
            "is 'six', expected a version number",
        ),
        ({"hook_name": 3}, "metadata.hook_name", "is 3, expected a string or null"),
        (
            {"context_size": "128"},
            "metadata.context_size",
            "is '128', expected an integer or null",
        ),
        (
            {"prepend_bos": "yes"},
            "metadata.prepend_bos",
            "is 'yes', expected true, false or null",
        ),
        (
            {"model_from_pretrained_kwargs": [1]},
            "metadata.model_from_pretrained_kwargs",
            "is [1], expected an object or null",
        ),
        (
            {"to_dict": 1},
            "metadata.to_dict",
            "is a name SAELens's SAEMetadata uses itself",
        ),
        (
            {"__class__": "x"},
            "metadata.__class__",
            "is a name SAELens's SAEMetadata uses itself",
        ),
    ],
)
def test_malformed_metadata_is_refused(
    tmp_path: Path, metadata: Any, field: str, words: str
):
    write_saelens_folder(tmp_path / "sl")
    if isinstance(metadata, dict):
        metadata = _metadata_with(tmp_path / "sl", **metadata)
    cfg_path = _edit_cfg(tmp_path / "sl", metadata=metadata)
    with pytest.raises(GatedSAELoadError) as error:
        SAE.load_from_disk(tmp_path / "sl", converter=saelens_disk_loader)
    assert str(error.value).startswith(f"{cfg_path}: field '{field}' {words}")


def test_top_level_fields_of_pre_6_configs_are_checked_too(tmp_path: Path):
    write_saelens_folder(tmp_path / "sl")
    cfg_path = tmp_path / "sl" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["metadata"]
    cfg_path.write_text(json.dumps({**cfg, "hook_name": 3}))
    with pytest.raises(GatedSAELoadError) as error:
        check_saelens_folder(tmp_path / "sl")
    assert str(error.value).startswith(
        f"{cfg_path}: field 'hook_name' is 3, expected a string or null"
    )


def test_a_pre_6_config_with_valid_fields_still_loads(tmp_path: Path):
    saved = write_saelens_folder(tmp_path / "sl", seed=2)
    cfg_path = tmp_path / "sl" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["metadata"]
    cfg.update(
        hook_name="blocks.0.hook_resid_pre",
        model_name="gpt2",
        context_size=128,
        normalize_activations=False,  # pre-6.0 SAELens wrote a bool; SAELens maps it
    )
    cfg_path.write_text(json.dumps(cfg))
    loaded = SAE.load_from_disk(tmp_path / "sl", converter=saelens_disk_loader)
    assert loaded.cfg.normalize_activations == "none"
    assert loaded.cfg.metadata.hook_name == "blocks.0.hook_resid_pre"
    assert loaded.cfg.metadata.context_size == 128
    torch.testing.assert_close(loaded.W_enc, saved.W_enc, rtol=0, atol=0)
