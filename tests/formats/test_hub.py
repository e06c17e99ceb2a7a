from pathlib import Path
from typing import Any

import pytest
from huggingface_hub.utils import EntryNotFoundError

import sae_lens_gated.formats.hub as hub
from sae_lens_gated.formats.dictionary_learning import (
    dictionary_learning_huggingface_loader,
)
from sae_lens_gated.formats.hub import (
    HubFileMissingError,
    check_hub_path,
    download_hub_file,
)
from sae_lens_gated.formats.validation import GatedSAELoadError
from tests.helpers import populate_hub_cache


@pytest.mark.parametrize(
    ("folder", "expected"),
    [(None, ""), ("", ""), ("/layer_3/", "layer_3"), ("a/b..c/d", "a/b..c/d")],
)
def test_folders_inside_the_repo_are_accepted(folder: str | None, expected: str):
    assert check_hub_path("owner/name", folder) == expected


@pytest.mark.parametrize("folder", ["..", "a/../b", "a/..", "/../x", "a\\..\\b"])
def test_folders_climbing_out_are_refused(folder: str):
    with pytest.raises(GatedSAELoadError, match="has a '..' segment"):
        check_hub_path("owner/name", folder)


@pytest.mark.parametrize("repo_id", ["owner/..", "owner/a--b", "a/b/c", "owner/-x"])
def test_invalid_repo_ids_are_refused(repo_id: str):
    with pytest.raises(GatedSAELoadError) as error:
        check_hub_path(repo_id, None)
    assert str(error.value).startswith(
        f"{repo_id!r} is not a valid Hugging Face repo id: "
    )


def test_a_cached_file_is_found_offline(tmp_path: Path, hub_cache: Path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    populate_hub_cache(
        hub_cache, "owner/name", {"l3/config.json": tmp_path / "config.json"}
    )
    path = download_hub_file("owner/name", "/l3/", "config.json")
    assert path.read_text() == '{"a": 1}'
    assert hub_cache in path.parents


def test_a_file_missing_from_the_offline_cache_is_one_clear_error(hub_cache: Path):
    with pytest.raises(HubFileMissingError) as error:
        download_hub_file("owner/name", "l3", "ae.pt")
    assert str(error.value) == (
        "Hugging Face repo 'owner/name', file 'l3/ae.pt' is not in the local Hugging "
        "Face cache, and the network is off (HF_HUB_OFFLINE=1)."
    )
    assert list(hub_cache.iterdir()) == []


def test_a_file_missing_from_the_repo_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch,
):
    def missing(**kwargs: Any) -> str:
        raise EntryNotFoundError(f"404: {kwargs['filename']}")

    monkeypatch.setattr(hub, "hf_hub_download", missing)
    with pytest.raises(HubFileMissingError) as error:
        download_hub_file("owner/name", None, "cfg.json")
    assert (
        str(error.value)
        == "Hugging Face repo 'owner/name', file 'cfg.json' does not exist."
    )


def test_the_dictionary_learning_converter_refuses_a_folder_climbing_out(
    monkeypatch: pytest.MonkeyPatch,
):
    downloads: list[Any] = []
    monkeypatch.setattr(hub, "hf_hub_download", lambda **kw: downloads.append(kw))
    with pytest.raises(GatedSAELoadError, match="folder '../x' has a '..' segment"):
        dictionary_learning_huggingface_loader("owner/name", "../x")
    assert downloads == []
