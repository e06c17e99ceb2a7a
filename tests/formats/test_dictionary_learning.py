import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.gated_sae import GatedSAE as BuiltinGatedSAE

import sae_lens_gated
from sae_lens_gated import GatedSAE, GatedSAEConfig, GatedSAELoadError
from sae_lens_gated.formats.dictionary_learning import (
    DICTIONARY_LEARNING_KEY_MAP,
    dictionary_learning_config,
    dictionary_learning_disk_loader,
    dictionary_learning_huggingface_loader,
    dictionary_learning_shapes,
    hook_name_for_submodule,
    read_dictionary_learning_config,
    state_dict_from_dictionary_learning,
    state_dict_to_dictionary_learning,
    submodule_for_hook_name,
    write_dictionary_learning,
)
from tests.helpers import (
    GATED_PARAM_NAMES,
    GATED_RELEASE,
    GATED_RELEASE_SAE_ID,
    assert_matches_dictionary_learning,
    populate_gated_release,
    populate_hub_cache,
    random_dictionary_learning_ae,
    randomize_gated_params,
    write_dictionary_learning_folder,
    write_malicious_ae_pt,
)


@pytest.fixture
def registered_after() -> Iterator[None]:
    yield
    sae_lens_gated.register()


# --- the format -------------------------------------------------------------------------


def test_key_map_shapes_and_round_trip_are_exact():
    assert dictionary_learning_shapes(16, 48) == {
        "encoder.weight": (48, 16),
        "decoder.weight": (16, 48),
        "decoder_bias": (16,),
        "gate_bias": (48,),
        "mag_bias": (48,),
        "r_mag": (48,),
    }
    assert [m.saelens for m in DICTIONARY_LEARNING_KEY_MAP] == GATED_PARAM_NAMES
    ae = random_dictionary_learning_ae(seed=1)
    raw = {k: v.clone() for k, v in ae.state_dict().items()}
    saelens = state_dict_from_dictionary_learning(raw)
    torch.testing.assert_close(saelens["W_enc"], ae.encoder.weight.T, rtol=0, atol=0)
    torch.testing.assert_close(saelens["W_dec"], ae.decoder.weight.T, rtol=0, atol=0)
    torch.testing.assert_close(saelens["b_gate"], ae.gate_bias, rtol=0, atol=0)
    back = state_dict_to_dictionary_learning(saelens)
    assert set(back) == set(raw)
    assert all(torch.equal(back[k], raw[k]) for k in raw)


@pytest.mark.parametrize(
    ("layer", "submodule_name", "hook_name"),
    [
        (3, "resid_post_layer_3", "blocks.3.hook_resid_post"),
        (2, "mlp_out_layer_2", "blocks.2.hook_mlp_out"),
        (7, "attn_out_layer_7", "blocks.7.hook_attn_out"),
        (4, None, "blocks.4.hook_resid_post"),  # SAELens's assumption
        (2, "embed", None),
        (2, "resid_post_layer_3", None),  # layer and name disagree
        (None, "resid_post_layer_3", None),
    ],
)
def test_submodule_names_map_to_hook_names(
    layer: Any, submodule_name: Any, hook_name: str | None
):
    assert hook_name_for_submodule(layer, submodule_name) == hook_name
    if hook_name is not None and submodule_name is not None:
        assert submodule_for_hook_name(hook_name) == (layer, submodule_name)


def test_hook_names_without_a_submodule_keep_what_can_be_told():
    assert submodule_for_hook_name("blocks.5.hook_resid_pre") == (5, None)
    assert submodule_for_hook_name("hook_embed") == (None, None)
    assert submodule_for_hook_name(None) == (None, None)


# --- reading, through SAELens's own loading seam -----------------------------------------


@pytest.mark.usefixtures("registered_after")
@pytest.mark.parametrize("registered", [True, False])
def test_saelens_load_from_disk_with_the_converter_equals_dictionary_learning(
    tmp_path: Path, registered: bool
):
    ae = random_dictionary_learning_ae(seed=2)
    folder = write_dictionary_learning_folder(tmp_path / "trainer_0", ae, layer=3)
    if not registered:
        sae_lens_gated.unregister()

    sae = SAE.load_from_disk(folder, converter=dictionary_learning_disk_loader)

    assert type(sae) is (GatedSAE if registered else BuiltinGatedSAE)
    assert sae.cfg.apply_b_dec_to_input is True
    assert sae.cfg.dtype == "float32"
    assert_matches_dictionary_learning(sae, ae)
    metadata = sae.cfg.metadata
    assert metadata.hook_name == "blocks.3.hook_resid_post"
    assert metadata.model_name == "pythia-70m-deduped"
    assert metadata.context_size == 128
    assert metadata.prepend_bos is True
    assert metadata["dictionary_learning_config"] == json.loads(
        (folder / "config.json").read_text()
    )


def test_disk_loader_keeps_or_converts_the_dtype(tmp_path: Path):
    ae = random_dictionary_learning_ae(seed=3).double()
    folder = write_dictionary_learning_folder(tmp_path / "dl", ae)
    kept = SAE.load_from_disk(folder, converter=dictionary_learning_disk_loader)
    assert kept.cfg.dtype == "float64" and kept.W_enc.dtype == torch.float64
    torch.testing.assert_close(kept.W_enc, ae.encoder.weight.T, rtol=0, atol=0)
    half = SAE.load_from_disk(
        folder, dtype="bfloat16", converter=dictionary_learning_disk_loader
    )
    assert half.cfg.dtype == "bfloat16"
    assert all(getattr(half, n).dtype == torch.bfloat16 for n in GATED_PARAM_NAMES)
    torch.testing.assert_close(half.r_mag, ae.r_mag.to(torch.bfloat16), rtol=0, atol=0)


def test_unrecognised_submodule_leaves_hook_name_unset_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    folder = write_dictionary_learning_folder(
        tmp_path / "odd", random_dictionary_learning_ae(), submodule_name="embed"
    )
    with caplog.at_level(logging.WARNING):
        cfg, _ = dictionary_learning_disk_loader(folder)
    assert cfg["metadata"]["hook_name"] is None
    assert "submodule_name='embed'" in caplog.text


def test_saelens_from_pretrained_with_the_converter_reads_a_release(
    tmp_path: Path, hub_cache: Path
):
    ae = random_dictionary_learning_ae(seed=4)
    local = write_dictionary_learning_folder(tmp_path / "src", ae, layer=3)
    populate_gated_release(hub_cache, local)

    sae = GatedSAE.from_pretrained(
        GATED_RELEASE,
        GATED_RELEASE_SAE_ID,
        converter=dictionary_learning_huggingface_loader,
    )

    assert type(sae) is GatedSAE
    assert_matches_dictionary_learning(sae, ae)
    # The release's own settings (here its Neuronpedia id) land in the metadata.
    assert sae.cfg.metadata.neuronpedia_id == (
        "pythia-70m-deduped/3-sae_bench-gated-res-4k__trainer_0_step_final"
    )
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"


def test_saelens_from_pretrained_with_the_converter_reads_any_repo_folder(
    tmp_path: Path, hub_cache: Path
):
    ae = random_dictionary_learning_ae(seed=5)
    local = write_dictionary_learning_folder(tmp_path / "src", ae, layer=8)
    folder = "GatedSAE_pythia-160m-deduped__0108/resid_post_layer_8/trainer_2"
    populate_hub_cache(
        hub_cache,
        "someone/saebench_pythia-160m",
        {f"{folder}/{name}": local / name for name in ("ae.pt", "config.json")},
    )
    sae = SAE.from_pretrained(
        "someone/saebench_pythia-160m",
        folder,
        converter=dictionary_learning_huggingface_loader,
    )
    assert sae.cfg.metadata.hook_name == "blocks.8.hook_resid_post"
    assert_matches_dictionary_learning(sae, ae)


def test_huggingface_loader_refuses_a_non_gated_folder_before_fetching_weights(
    tmp_path: Path, hub_cache: Path
):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"trainer": {"dict_class": "AutoEncoderTopK", "k": 8}})
    )
    # Only the config is cached: fetching the weights would fail differently (offline).
    populate_hub_cache(hub_cache, "someone/topk", {"l12/config.json": config})
    with pytest.raises(GatedSAELoadError) as error:
        dictionary_learning_huggingface_loader("someone/topk", "l12")
    message = str(error.value)
    assert "config.json: field 'trainer.dict_class' is 'AutoEncoderTopK'" in message


# --- validation -------------------------------------------------------------------------


def _corrupt(path: Path, edit: Any) -> None:
    state = torch.load(path / "ae.pt", weights_only=True)
    edit(state)
    torch.save(state, path / "ae.pt")


def _set(key: str, index: int, value: float) -> Any:
    def edit(state: dict[str, torch.Tensor]) -> None:
        tensor = state[key]
        tensor[torch.unravel_index(torch.tensor(index), tensor.shape)] = value

    return edit


# name: (edit of ae.pt, expected words, key named)
CORRUPTIONS: dict[str, tuple[Any, str, str]] = {
    "missing key": (lambda s: s.pop("r_mag"), "missing key(s) 'r_mag'", "r_mag"),
    "extra key": (
        lambda s: s.update(threshold=torch.zeros(48)),
        "unexpected key(s) 'threshold'",
        "threshold",
    ),
    "NaN weight": (
        _set("gate_bias", 7, float("nan")),
        "has 1 non-finite value(s)",
        "gate_bias",
    ),
    "inf weight": (
        _set("encoder.weight", 3, float("inf")),
        "has 1 non-finite value(s)",
        "encoder.weight",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_validation_errors_name_file_and_key(tmp_path: Path, corruption: str):
    edit, words, key = CORRUPTIONS[corruption]
    folder = write_dictionary_learning_folder(
        tmp_path / "dl", random_dictionary_learning_ae()
    )
    _corrupt(folder, edit)
    with pytest.raises(GatedSAELoadError) as error:
        dictionary_learning_disk_loader(folder)
    message = str(error.value)
    assert str(folder / "ae.pt") in message
    assert words in message and f"'{key}'" in message


def test_shape_mismatch_with_the_config_is_an_error(tmp_path: Path):
    folder = write_dictionary_learning_folder(
        tmp_path / "dl", random_dictionary_learning_ae(), dict_size=40
    )
    with pytest.raises(GatedSAELoadError) as error:
        dictionary_learning_disk_loader(folder)
    message = str(error.value)
    assert str(folder / "ae.pt") in message and str(folder / "config.json") in message
    assert "'encoder.weight' has shape (48, 16), expected (40, 16)" in message


@pytest.mark.parametrize(
    ("trainer", "words"),
    [
        (
            {"dict_class": "AutoEncoderTopK", "activation_dim": 16, "dict_size": 48},
            "field 'trainer.dict_class' is 'AutoEncoderTopK', expected 'GatedAutoEncoder'",
        ),
        (
            {"dict_class": "GatedAutoEncoder", "activation_dim": 0, "dict_size": 48},
            "field 'trainer.activation_dim' is 0, expected a positive integer",
        ),
        (
            {"dict_class": "GatedAutoEncoder", "activation_dim": 16, "dict_size": 4.5},
            "field 'trainer.dict_size' is 4.5, expected a positive integer",
        ),
        (None, "field 'trainer' is missing or not an object"),
    ],
)
def test_config_errors_name_file_and_field(tmp_path: Path, trainer: Any, words: str):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}}))
    with pytest.raises(GatedSAELoadError) as error:
        read_dictionary_learning_config(path)
    assert str(error.value).startswith(f"{path}: {words}")


def test_truncated_ae_pt_is_refused(tmp_path: Path):
    folder = write_dictionary_learning_folder(
        tmp_path / "dl", random_dictionary_learning_ae()
    )
    weights = folder / "ae.pt"
    weights.write_bytes(weights.read_bytes()[:-500])
    with pytest.raises(GatedSAELoadError, match="is not a readable PyTorch checkpoint"):
        dictionary_learning_disk_loader(folder)


def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path):
    ae = random_dictionary_learning_ae()
    # Control: the payload really does create its file when unpickled unsafely.
    control = write_dictionary_learning_folder(tmp_path / "control", ae)
    write_malicious_ae_pt(control, tmp_path / "control-marker")
    torch.load(control / "ae.pt", weights_only=False)
    assert (tmp_path / "control-marker").exists()

    folder = write_dictionary_learning_folder(tmp_path / "evil", ae)
    marker = tmp_path / "pwned-marker"
    write_malicious_ae_pt(folder, marker)
    with pytest.raises(GatedSAELoadError) as error:
        dictionary_learning_disk_loader(folder)
    message = str(error.value)
    assert f"Refusing to load {folder / 'ae.pt'}" in message
    assert "would execute code" in message
    assert not marker.exists()


# --- writing ----------------------------------------------------------------------------


def test_config_is_filled_from_saelens_metadata():
    sae = GatedSAE(GatedSAEConfig(d_in=16, d_sae=48))
    sae.cfg.metadata.hook_name = "blocks.5.hook_mlp_out"
    sae.cfg.metadata.model_name = "gpt2"
    sae.cfg.metadata.context_size = 256
    assert dictionary_learning_config(sae) == {
        "trainer": {
            "dict_class": "GatedAutoEncoder",
            "trainer_class": "GatedSAETrainer",
            "activation_dim": 16,
            "dict_size": 48,
            "layer": 5,
            "lm_name": "gpt2",
            "submodule_name": "mlp_out_layer_5",
        },
        "buffer": {"ctx_len": 256},
    }


def test_written_folder_reads_back_exactly(tmp_path: Path):
    sae = GatedSAE(GatedSAEConfig(d_in=16, d_sae=48))
    randomize_gated_params(sae, seed=6)
    params = {name: getattr(sae, name) for name in GATED_PARAM_NAMES}
    tmp_path.joinpath("dl").mkdir()
    weights, config = write_dictionary_learning(
        tmp_path / "dl",
        state_dict_to_dictionary_learning(params),
        dictionary_learning_config(sae),
    )
    assert (weights.name, config.name) == ("ae.pt", "config.json")
    _, state = dictionary_learning_disk_loader(tmp_path / "dl")
    for name in GATED_PARAM_NAMES:
        assert torch.equal(state[name], params[name].detach()), name
