from pathlib import Path

import pytest
import torch

from sae_lens_gated.repro.experiments import (
    SourceConfig,
    check_device,
    prepare_output_folder,
)


def test_check_device_accepts_the_cpu_and_refuses_unknown_names():
    check_device("cpu")
    check_device("cpu:0")
    for name in ("foo", "", "cuda:-1", "cuda:x"):
        with pytest.raises(ValueError, match=f"Unknown device {name!r}"):
            check_device(name)


def test_check_device_knows_how_many_gpus_there_are(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        ValueError, match="'cuda' is not available: PyTorch sees no cuda"
    ):
        check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda")
    check_device("cuda:1")
    with pytest.raises(
        ValueError,
        match=r"'cuda:7' is not available: this machine has 2 cuda device\(s\), "
        "cuda:0 to cuda:1",
    ):
        check_device("cuda:7")


def test_source_settings_are_checked_when_built():
    with pytest.raises(ValueError, match="gated_width must be at least 1, got 0"):
        SourceConfig(gated_width=0)
    with pytest.raises(ValueError, match="context_size must be at least 1"):
        SourceConfig(context_size=0)
    with pytest.raises(ValueError, match="expansion must be a finite number above 0"):
        SourceConfig(expansion=float("nan"))
    with pytest.raises(ValueError, match="Unknown device 'gpu'"):
        SourceConfig(device="gpu")


def test_prepare_output_folder_creates_a_new_folder_and_accepts_an_empty_one(
    tmp_path: Path,
):
    prepare_output_folder(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    prepare_output_folder(tmp_path / "a" / "b")  # empty: free to use


def test_prepare_output_folder_never_touches_a_saved_sae_without_overwrite(
    tmp_path: Path,
):
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_output_folder(tmp_path)
    prepare_output_folder(tmp_path, overwrite=True)
    assert (tmp_path / "cfg.json").read_text() == "{}"  # kept until replaced
    with pytest.raises(NotADirectoryError, match="is a file"):
        prepare_output_folder(tmp_path / "cfg.json", overwrite=True)
