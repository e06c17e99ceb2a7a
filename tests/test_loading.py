import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens.saes.gated_sae import GatedSAE as BuiltinGatedSAE
from sae_lens.saes.gated_sae import GatedSAEConfig as BuiltinGatedSAEConfig
from safetensors.torch import load_file, save_file

import sae_lens_gated
from sae_lens_gated import (
    GatedSAE,
    GatedSAEConfig,
    GatedSAELoadError,
    load_gated_sae,
    to_jumprelu,
)
from tests.helpers import (
    GATED_PARAM_NAMES,
    file_hashes,
    populate_hub_cache,
    random_dictionary_learning_ae,
    randomize_gated_params,
    write_dictionary_learning_folder,
)

RELEASE = "sae_bench_pythia70m_sweep_gated_ctx128_0730"
RELEASE_SAE_ID = "blocks.3.hook_resid_post__trainer_0"
RELEASE_REPO = "canrager/lm_sae"
RELEASE_FOLDER = "pythia70m_sweep_gated_ctx128_0730/resid_post_layer_3/trainer_0"


@pytest.fixture
def registered_after() -> Iterator[None]:
    yield
    sae_lens_gated.register()


def _assert_matches_dictionary_learning(sae: GatedSAE, ae: Any) -> None:
    x = torch.randn(200, ae.activation_dim) * 2
    with torch.no_grad():
        expected_features, expected_out = ae.encode(x), ae(x)
        features, out = sae.encode(x), sae(x)
    # The test must be able to see a wrong gate or magnitude: many features fire.
    assert 0.2 < (expected_features > 0).float().mean() < 0.8
    torch.testing.assert_close(features, expected_features, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)


def _saelens_folder(path: Path, seed: int = 0) -> GatedSAE:
    sae = GatedSAE(GatedSAEConfig(d_in=16, d_sae=48))
    randomize_gated_params(sae, seed=seed)
    sae.save_model(path)
    return sae


def test_dictionary_learning_folder_equals_dictionary_learning_forward(tmp_path: Path):
    ae = random_dictionary_learning_ae(seed=1)
    write_dictionary_learning_folder(tmp_path / "trainer_0", ae, layer=3)

    sae = load_gated_sae(tmp_path / "trainer_0")

    assert type(sae) is GatedSAE
    assert sae.cfg.apply_b_dec_to_input is True
    assert sae.cfg.dtype == "float32"
    _assert_matches_dictionary_learning(sae, ae)
    metadata = sae.cfg.metadata
    assert metadata.hook_name == "blocks.3.hook_resid_post"
    assert metadata.model_name == "pythia-70m-deduped"
    assert metadata.context_size == 128
    assert metadata["dictionary_learning_config"]["trainer"]["l1_penalty"] == 0.1


def test_folder_argument_is_joined_to_a_local_source(tmp_path: Path):
    ae = random_dictionary_learning_ae(seed=2)
    write_dictionary_learning_folder(tmp_path / "sweep" / "resid_post_layer_4", ae, 4)
    sae = load_gated_sae(tmp_path / "sweep", "resid_post_layer_4")
    assert sae.cfg.metadata.hook_name == "blocks.4.hook_resid_post"
    _assert_matches_dictionary_learning(sae, ae)


def test_dictionary_learning_submodule_names_map_to_hooks(tmp_path: Path):
    ae = random_dictionary_learning_ae(seed=3)
    write_dictionary_learning_folder(
        tmp_path / "mlp", ae, layer=2, submodule_name="mlp_out_layer_2"
    )
    write_dictionary_learning_folder(
        tmp_path / "odd", ae, layer=2, submodule_name="embed"
    )
    assert load_gated_sae(tmp_path / "mlp").cfg.metadata.hook_name == (
        "blocks.2.hook_mlp_out"
    )
    assert load_gated_sae(tmp_path / "odd").cfg.metadata.hook_name is None


def test_saelens_folder_loads_the_same_sae(tmp_path: Path):
    saved = _saelens_folder(tmp_path / "sae", seed=4)
    loaded = load_gated_sae(tmp_path / "sae")
    assert type(loaded) is GatedSAE
    x = torch.randn(50, 16)
    for name in GATED_PARAM_NAMES:
        torch.testing.assert_close(getattr(loaded, name), getattr(saved, name))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), saved(x))


@pytest.mark.usefixtures("registered_after")
def test_saelens_folder_written_by_the_builtin_class_loads_unregistered(
    tmp_path: Path,
):
    builtin = BuiltinGatedSAE(BuiltinGatedSAEConfig(d_in=16, d_sae=48))
    randomize_gated_params(builtin, seed=5)
    builtin.save_model(tmp_path / "builtin")
    sae_lens_gated.unregister()
    loaded = load_gated_sae(tmp_path / "builtin")
    assert type(loaded) is GatedSAE
    x = torch.randn(50, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), builtin.encode(x))


def test_dtype_and_device_are_respected(tmp_path: Path):
    ae = random_dictionary_learning_ae(seed=6)
    write_dictionary_learning_folder(tmp_path / "dl", ae)
    saved = _saelens_folder(tmp_path / "sl", seed=6)
    for path, expected in (
        (tmp_path / "dl", ae.encoder.weight.T),
        (tmp_path / "sl", saved.W_enc),
    ):
        sae = load_gated_sae(path, device="cpu", dtype="float64")
        assert sae.cfg.dtype == "float64" and sae.cfg.device == "cpu"
        assert all(getattr(sae, n).dtype == torch.float64 for n in GATED_PARAM_NAMES)
        torch.testing.assert_close(sae.W_enc, expected.double(), rtol=0, atol=0)
        half = load_gated_sae(path, dtype=torch.bfloat16)
        assert half.cfg.dtype == "bfloat16" and half.W_dec.dtype == torch.bfloat16


def test_loading_never_modifies_the_source_files(tmp_path: Path):
    write_dictionary_learning_folder(tmp_path / "dl", random_dictionary_learning_ae())
    _saelens_folder(tmp_path / "sl")
    (tmp_path / "sl" / "sparsity.safetensors").write_bytes(b"not read")
    before = file_hashes(tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    for folder in ("dl", "sl"):
        load_gated_sae(tmp_path / folder, dtype="float64").save_model(
            tmp_path / "out" / folder
        )
    after = file_hashes(tmp_path)
    assert {k: after[k] for k in before} == before
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())


# --- validation -------------------------------------------------------------------------


def _corrupt_dictionary_learning(path: Path, edit: Any) -> None:
    state = torch.load(path / "ae.pt", weights_only=True)
    edit(state)
    torch.save(state, path / "ae.pt")


def _corrupt_saelens(path: Path, edit: Any) -> None:
    state = load_file(path / "sae_weights.safetensors")
    edit(state)
    save_file(state, path / "sae_weights.safetensors")


def _set(key: str, index: int, value: float) -> Any:
    def edit(state: dict[str, torch.Tensor]) -> None:
        tensor = state[key]
        tensor[torch.unravel_index(torch.tensor(index), tensor.shape)] = value

    return edit


# name: (dictionary_learning edit, SAELens edit, expected words, key in ae.pt, key in
# sae_weights.safetensors)
CORRUPTIONS: dict[str, tuple[Any, Any, str, str, str]] = {
    "missing key": (
        lambda s: s.pop("r_mag"),
        lambda s: s.pop("r_mag"),
        "missing key(s) 'r_mag'",
        "r_mag",
        "r_mag",
    ),
    "extra key": (
        lambda s: s.update(threshold=torch.zeros(48)),
        lambda s: s.update(threshold=torch.zeros(48)),
        "unexpected key(s) 'threshold'",
        "threshold",
        "threshold",
    ),
    "NaN weight": (
        _set("gate_bias", 7, float("nan")),
        _set("b_gate", 7, float("nan")),
        "has 1 non-finite value(s)",
        "gate_bias",
        "b_gate",
    ),
    "inf weight": (
        _set("encoder.weight", 3, float("inf")),
        _set("W_enc", 3, float("-inf")),
        "has 1 non-finite value(s)",
        "encoder.weight",
        "W_enc",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_dictionary_learning_validation_errors_name_file_and_key(
    tmp_path: Path, corruption: str
):
    edit, _, words, key, _ = CORRUPTIONS[corruption]
    folder = write_dictionary_learning_folder(
        tmp_path / "dl", random_dictionary_learning_ae()
    )
    _corrupt_dictionary_learning(folder, edit)
    with pytest.raises(GatedSAELoadError) as error:
        load_gated_sae(folder)
    message = str(error.value)
    assert str(folder / "ae.pt") in message
    assert words in message and f"'{key}'" in message


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_saelens_validation_errors_name_file_and_key(tmp_path: Path, corruption: str):
    _, edit, words, _, key = CORRUPTIONS[corruption]
    _saelens_folder(tmp_path / "sl")
    _corrupt_saelens(tmp_path / "sl", edit)
    with pytest.raises(GatedSAELoadError) as error:
        load_gated_sae(tmp_path / "sl")
    message = str(error.value)
    assert str(tmp_path / "sl" / "sae_weights.safetensors") in message
    assert words in message and f"'{key}'" in message


def test_shape_mismatch_with_the_config_is_an_error(tmp_path: Path):
    folder = write_dictionary_learning_folder(
        tmp_path / "dl", random_dictionary_learning_ae(), dict_size=40
    )
    with pytest.raises(GatedSAELoadError) as error:
        load_gated_sae(folder)
    message = str(error.value)
    assert str(folder / "ae.pt") in message and str(folder / "config.json") in message
    assert "'encoder.weight' has shape (48, 16), expected (40, 16)" in message

    _saelens_folder(tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps({**cfg, "d_in": 15}))
    with pytest.raises(GatedSAELoadError, match=r"'W_enc' has shape \(16, 48\), "):
        load_gated_sae(tmp_path / "sl")


def test_all_ones_scaling_factor_of_old_saelens_saves_is_ignored(tmp_path: Path):
    saved = _saelens_folder(tmp_path / "sl")
    _corrupt_saelens(tmp_path / "sl", lambda s: s.update(scaling_factor=torch.ones(48)))
    torch.testing.assert_close(load_gated_sae(tmp_path / "sl").W_enc, saved.W_enc)
    _corrupt_saelens(tmp_path / "sl", _set("scaling_factor", 0, 2.0))
    with pytest.raises(GatedSAELoadError, match="unexpected key 'scaling_factor'"):
        load_gated_sae(tmp_path / "sl")


def test_topk_dictionary_learning_folder_is_refused(tmp_path: Path):
    folder = tmp_path / "topk"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "trainer": {
                    "dict_class": "AutoEncoderTopK",
                    "trainer_class": "TopKTrainer",
                    "activation_dim": 16,
                    "dict_size": 48,
                    "k": 8,
                },
                "buffer": {"ctx_len": 128},
            }
        )
    )
    torch.save(
        {
            "encoder.weight": torch.randn(48, 16),
            "encoder.bias": torch.zeros(48),
            "decoder.weight": torch.randn(16, 48),
            "b_dec": torch.zeros(16),
            "k": torch.tensor(8),
            "threshold": torch.tensor(-1.0),
        },
        folder / "ae.pt",
    )
    with pytest.raises(GatedSAELoadError) as error:
        load_gated_sae(folder)
    message = str(error.value)
    assert str(folder / "config.json") in message
    assert "'trainer.dict_class' is 'AutoEncoderTopK'" in message


def test_non_gated_saelens_folder_is_refused(tmp_path: Path):
    gated = GatedSAE(GatedSAEConfig(d_in=16, d_sae=48))
    to_jumprelu(gated).save_model(tmp_path / "jumprelu")
    with pytest.raises(GatedSAELoadError) as error:
        load_gated_sae(tmp_path / "jumprelu")
    message = str(error.value)
    assert str(tmp_path / "jumprelu" / "cfg.json") in message
    assert "field 'architecture' is 'jumprelu', expected 'gated'" in message


@pytest.mark.parametrize("keep_bytes", [40, -100])
def test_truncated_safetensors_is_refused(tmp_path: Path, keep_bytes: int):
    _saelens_folder(tmp_path / "sl")
    weights = tmp_path / "sl" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep_bytes])
    with pytest.raises(GatedSAELoadError) as error:
        load_gated_sae(tmp_path / "sl")
    assert f"{weights} is not a readable safetensors file" in str(error.value)


def test_truncated_ae_pt_is_refused(tmp_path: Path):
    folder = write_dictionary_learning_folder(
        tmp_path / "dl", random_dictionary_learning_ae()
    )
    weights = folder / "ae.pt"
    weights.write_bytes(weights.read_bytes()[:-500])
    with pytest.raises(GatedSAELoadError, match="is not a readable PyTorch checkpoint"):
        load_gated_sae(folder)


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: it creates a file, as an attack could."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path):
    ae = random_dictionary_learning_ae()
    state = {k: v.cpu() for k, v in ae.state_dict().items()}
    # Control: the payload really does create its file when unpickled unsafely.
    control = tmp_path / "control-marker"
    torch.save({**state, "payload": _CreatesFile(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()

    folder = write_dictionary_learning_folder(tmp_path / "evil", ae)
    marker = tmp_path / "pwned-marker"
    torch.save({**state, "payload": _CreatesFile(marker)}, folder / "ae.pt")
    with pytest.raises(GatedSAELoadError) as error:
        load_gated_sae(folder)
    message = str(error.value)
    assert f"Refusing to load {folder / 'ae.pt'}" in message
    assert "would execute code" in message
    assert not marker.exists()


@pytest.mark.usefixtures("hub_cache")
def test_unknown_sources_are_clear_errors(tmp_path: Path):
    with pytest.raises(
        GatedSAELoadError, match="'no-such-sae' is not a local folder, a"
    ):
        load_gated_sae("no-such-sae")
    with pytest.raises(GatedSAELoadError, match="does not exist or is not a folder"):
        load_gated_sae(tmp_path, "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("")
    with pytest.raises(GatedSAELoadError, match="found: notes.txt"):
        load_gated_sae(tmp_path / "other")
    with pytest.raises(GatedSAELoadError, match="has no SAE id 'blocks.3.nope'"):
        load_gated_sae(RELEASE, "blocks.3.nope")
    with pytest.raises(GatedSAELoadError) as error:
        load_gated_sae("someone/not-cached", "trainer_0")
    message = str(error.value)
    assert "'someone/not-cached' is not a local folder" in message
    assert "only the local cache was searched" in message


# --- the Hugging Face hub and SAELens releases, through a local cache --------------------


def test_hub_dictionary_learning_folder(tmp_path: Path, hub_cache: Path):
    ae = random_dictionary_learning_ae(seed=7)
    local = write_dictionary_learning_folder(tmp_path / "src", ae, layer=8)
    folder = "GatedSAE_pythia-160m-deduped__0108/resid_post_layer_8/trainer_2"
    populate_hub_cache(
        hub_cache,
        "someone/saebench_pythia-160m",
        {f"{folder}/{name}": local / name for name in ("ae.pt", "config.json")},
    )
    sae = load_gated_sae("someone/saebench_pythia-160m", folder)
    assert sae.cfg.metadata.hook_name == "blocks.8.hook_resid_post"
    _assert_matches_dictionary_learning(sae, ae)


def test_hub_saelens_folder(tmp_path: Path, hub_cache: Path):
    saved = _saelens_folder(tmp_path / "src", seed=8)
    populate_hub_cache(
        hub_cache,
        "someone/gated-saes",
        {
            f"layer_3/{name}": tmp_path / "src" / name
            for name in ("cfg.json", "sae_weights.safetensors")
        },
    )
    loaded = load_gated_sae("someone/gated-saes", "layer_3")
    x = torch.randn(50, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), saved(x))


def _populate_release(tmp_path: Path, hub_cache: Path, ae: Any) -> Path:
    local = write_dictionary_learning_folder(tmp_path / "src", ae, layer=3)
    populate_hub_cache(
        hub_cache,
        RELEASE_REPO,
        {f"{RELEASE_FOLDER}/{n}": local / n for n in ("ae.pt", "config.json")},
    )
    return local


@pytest.mark.usefixtures("registered_after")
@pytest.mark.parametrize("registered", [True, False])
def test_saelens_release_loads_through_from_pretrained(
    tmp_path: Path, hub_cache: Path, registered: bool
):
    ae = random_dictionary_learning_ae(seed=9)
    local = _populate_release(tmp_path, hub_cache, ae)
    if not registered:
        sae_lens_gated.unregister()

    sae = load_gated_sae(RELEASE, RELEASE_SAE_ID)

    assert type(sae) is GatedSAE
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert sae.cfg.metadata.model_name == "pythia-70m-deduped"
    assert sae.cfg.metadata.context_size == 128
    _assert_matches_dictionary_learning(sae, ae)
    # SAELens's converter and the plugin's own reader agree on the same files.
    direct = load_gated_sae(local)
    for name in GATED_PARAM_NAMES:
        torch.testing.assert_close(getattr(sae, name), getattr(direct, name))


def test_non_gated_release_is_refused_before_its_weights_are_fetched(
    tmp_path: Path, hub_cache: Path
):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "trainer": {
                    "dict_class": "AutoEncoderTopK",
                    "activation_dim": 16,
                    "dict_size": 48,
                    "k": 8,
                    "layer": 12,
                    "lm_name": "google/gemma-2-2b",
                },
                "buffer": {"ctx_len": 128},
            }
        )
    )
    folder = "gemma-2-2b_topk_width-2pow12_date-1109/resid_post_layer_12/trainer_0"
    # Only the config is in the cache: loading the weights would fail differently.
    populate_hub_cache(
        hub_cache,
        "canrager/saebench_gemma-2-2b_width-2pow12_date-1109",
        {f"{folder}/config.json": config},
    )
    with pytest.raises(GatedSAELoadError, match="'architecture' is 'topk', expected"):
        load_gated_sae(
            "sae_bench_gemma-2-2b_topk_width-2pow12_date-1109",
            "blocks.12.hook_resid_post__trainer_0",
        )


def test_hub_cache_files_are_not_modified(tmp_path: Path, hub_cache: Path):
    _populate_release(tmp_path, hub_cache, random_dictionary_learning_ae(seed=10))
    before = file_hashes(hub_cache)
    links = {p: os.readlink(p) for p in hub_cache.rglob("*") if p.is_symlink()}
    load_gated_sae(RELEASE, RELEASE_SAE_ID)
    load_gated_sae(RELEASE_REPO, RELEASE_FOLDER)
    assert file_hashes(hub_cache) == before
    assert {p: os.readlink(p) for p in hub_cache.rglob("*") if p.is_symlink()} == links
