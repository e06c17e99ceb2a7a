import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens.saes.gated_sae import GatedSAE as BuiltinGatedSAE
from sae_lens.saes.gated_sae import GatedSAEConfig as BuiltinGatedSAEConfig
from safetensors.torch import load_file, save_file

import sae_lens_gated
import sae_lens_gated.formats.hub as hub
from sae_lens_gated import (
    GatedSAE,
    GatedSAELoadError,
    load_gated_sae,
)
from tests.helpers import (
    DEVICES,
    GATED_PARAM_NAMES,
    GATED_RELEASE,
    GATED_RELEASE_FOLDER,
    GATED_RELEASE_REPO,
    GATED_RELEASE_SAE_ID,
    assert_matches_dictionary_learning,
    file_hashes,
    populate_gated_release,
    populate_hub_cache,
    random_dictionary_learning_ae,
    randomize_gated_params,
    write_dictionary_learning_folder,
    write_malicious_ae_pt,
    write_saelens_folder,
)


@pytest.fixture
def registered_after() -> Iterator[None]:
    yield
    sae_lens_gated.register()


def test_dictionary_learning_folder_equals_dictionary_learning_forward(tmp_path: Path):
    ae = random_dictionary_learning_ae(seed=1)
    write_dictionary_learning_folder(tmp_path / "trainer_0", ae, layer=3)

    sae = load_gated_sae(tmp_path / "trainer_0")

    assert type(sae) is GatedSAE
    assert sae.cfg.apply_b_dec_to_input is True
    assert sae.cfg.dtype == "float32"
    assert_matches_dictionary_learning(sae, ae)
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
    assert_matches_dictionary_learning(sae, ae)


def test_saelens_folder_loads_the_same_sae(tmp_path: Path):
    saved = write_saelens_folder(tmp_path / "sae", seed=4)
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


@pytest.mark.parametrize("device", DEVICES)
def test_dtype_and_device_are_respected(tmp_path: Path, device: str):
    ae = random_dictionary_learning_ae(seed=6)
    write_dictionary_learning_folder(tmp_path / "dl", ae)
    saved = write_saelens_folder(tmp_path / "sl", seed=6)
    for path, expected in (
        (tmp_path / "dl", ae.encoder.weight.T),
        (tmp_path / "sl", saved.W_enc),
    ):
        sae = load_gated_sae(path, device=device, dtype="float64")
        assert sae.cfg.dtype == "float64" and sae.cfg.device == device
        for name in GATED_PARAM_NAMES:
            param = getattr(sae, name)
            assert param.dtype == torch.float64 and param.device.type == device, name
        torch.testing.assert_close(sae.W_enc.cpu(), expected.double(), rtol=0, atol=0)
        x = torch.randn(8, sae.cfg.d_in, dtype=torch.float64)
        on_cpu = load_gated_sae(path, dtype="float64")
        with torch.no_grad():
            torch.testing.assert_close(sae(x.to(device)).cpu(), on_cpu(x))
        half = load_gated_sae(path, device=device, dtype=torch.bfloat16)
        assert half.cfg.dtype == "bfloat16" and half.W_dec.dtype == torch.bfloat16
        assert half.W_dec.device.type == device


def test_loading_never_modifies_the_source_files(tmp_path: Path):
    write_dictionary_learning_folder(tmp_path / "dl", random_dictionary_learning_ae())
    write_saelens_folder(tmp_path / "sl")
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


# --- validation (each format's checks: tests/formats) ----------------------------------


def test_both_formats_are_validated_before_anything_is_built(tmp_path: Path):
    folder = write_dictionary_learning_folder(
        tmp_path / "dl", random_dictionary_learning_ae(), dict_size=40
    )
    with pytest.raises(GatedSAELoadError, match="'encoder.weight' has shape"):
        load_gated_sae(folder)
    write_saelens_folder(tmp_path / "sl")
    state = load_file(tmp_path / "sl" / "sae_weights.safetensors")
    state["b_mag"][3] = float("nan")
    save_file(state, tmp_path / "sl" / "sae_weights.safetensors")
    with pytest.raises(GatedSAELoadError, match="'b_mag' has 1 non-finite value"):
        load_gated_sae(tmp_path / "sl")


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
        load_gated_sae(GATED_RELEASE, "blocks.3.nope")
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
    assert_matches_dictionary_learning(sae, ae)


def test_hub_saelens_folder(tmp_path: Path, hub_cache: Path):
    saved = write_saelens_folder(tmp_path / "src", seed=8)
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
    populate_gated_release(hub_cache, local)
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

    sae = load_gated_sae(GATED_RELEASE, GATED_RELEASE_SAE_ID)

    assert type(sae) is GatedSAE
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert sae.cfg.metadata.model_name == "pythia-70m-deduped"
    assert sae.cfg.metadata.context_size == 128
    assert_matches_dictionary_learning(sae, ae)
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
    with pytest.raises(GatedSAELoadError) as error:
        load_gated_sae(
            "sae_bench_gemma-2-2b_topk_width-2pow12_date-1109",
            "blocks.12.hook_resid_post__trainer_0",
        )
    message = str(error.value)
    assert f"{folder}/config.json: field 'trainer.dict_class' is 'AutoEncoderTopK'" in (
        message
    )


@pytest.mark.parametrize(
    ("release", "sae_id", "repo_id", "folder"),
    [
        (GATED_RELEASE, GATED_RELEASE_SAE_ID, GATED_RELEASE_REPO, GATED_RELEASE_FOLDER),
        # A release in a format the plugin leaves to SAELens's own converter.
        (
            "gpt2-small-res-jb",
            "blocks.0.hook_resid_pre",
            "jbloom/GPT2-Small-SAEs-Reformatted",
            "blocks.0.hook_resid_pre",
        ),
    ],
)
def test_release_missing_from_the_offline_cache_is_a_clear_error(
    hub_cache: Path, release: str, sae_id: str, repo_id: str, folder: str
):
    assert list(hub_cache.iterdir()) == []
    with pytest.raises(GatedSAELoadError) as error:
        load_gated_sae(release, sae_id)
    assert str(error.value) == (
        f"SAELens release {release!r}, SAE id {sae_id!r} (Hugging Face repo "
        f"{repo_id!r}, folder {folder!r}) is not in the local Hugging Face cache, and "
        "the network is off (HF_HUB_OFFLINE=1)."
    )


def test_release_with_a_malicious_ae_pt_is_refused_without_running_it(
    tmp_path: Path, hub_cache: Path
):
    local = write_dictionary_learning_folder(
        tmp_path / "src", random_dictionary_learning_ae(), layer=3
    )
    marker = tmp_path / "pwned-marker"
    write_malicious_ae_pt(local, marker)
    snapshot = populate_gated_release(hub_cache, local)
    with pytest.raises(GatedSAELoadError) as error:
        load_gated_sae(GATED_RELEASE, GATED_RELEASE_SAE_ID)
    message = str(error.value)
    assert f"Refusing to load {snapshot / GATED_RELEASE_FOLDER / 'ae.pt'}" in message
    assert "would execute code" in message
    assert not marker.exists()


def test_release_with_wrong_shapes_is_refused(tmp_path: Path, hub_cache: Path):
    local = write_dictionary_learning_folder(
        tmp_path / "src", random_dictionary_learning_ae(), layer=3, dict_size=40
    )
    snapshot = populate_gated_release(hub_cache, local)
    with pytest.raises(GatedSAELoadError) as error:
        load_gated_sae(GATED_RELEASE, GATED_RELEASE_SAE_ID)
    assert str(error.value) == (
        f"{snapshot / GATED_RELEASE_FOLDER / 'ae.pt'}: key 'encoder.weight' has shape "
        f"(48, 16), expected (40, 16) from the sizes in "
        f"{snapshot / GATED_RELEASE_FOLDER / 'config.json'}."
    )


@pytest.mark.parametrize(
    ("repo_id", "folder", "words"),
    [
        ("someone/repo", "a/../../b", "folder 'a/../../b' has a '..' segment"),
        ("someone/repo", "..", "folder '..' has a '..' segment"),
        ("someone/..", None, "'someone/..' is not a valid Hugging Face repo id"),
        ("someone/a..b", "x", "'someone/a..b' is not a valid Hugging Face repo id"),
    ],
)
def test_bad_hub_paths_are_refused_before_any_download(
    monkeypatch: pytest.MonkeyPatch,
    hub_cache: Path,
    repo_id: str,
    folder: str | None,
    words: str,
):
    downloads: list[Any] = []
    monkeypatch.setattr(hub, "hf_hub_download", lambda **kw: downloads.append(kw))
    with pytest.raises(GatedSAELoadError, match=re.escape(words)):
        load_gated_sae(repo_id, folder)
    assert downloads == []
    assert list(hub_cache.iterdir()) == []


def test_hub_cache_files_are_not_modified(tmp_path: Path, hub_cache: Path):
    _populate_release(tmp_path, hub_cache, random_dictionary_learning_ae(seed=10))
    before = file_hashes(hub_cache)
    links = {p: os.readlink(p) for p in hub_cache.rglob("*") if p.is_symlink()}
    load_gated_sae(GATED_RELEASE, GATED_RELEASE_SAE_ID)
    load_gated_sae(GATED_RELEASE_REPO, GATED_RELEASE_FOLDER)
    assert file_hashes(hub_cache) == before
    assert {p: os.readlink(p) for p in hub_cache.rglob("*") if p.is_symlink()} == links
