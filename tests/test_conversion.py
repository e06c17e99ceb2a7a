import contextlib
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens.saes.gated_sae import GatedSAE as BuiltinGatedSAE
from sae_lens.saes.gated_sae import GatedSAEConfig as BuiltinGatedSAEConfig
from sae_lens.saes.gated_sae import GatedTrainingSAE as BuiltinGatedTrainingSAE
from sae_lens.saes.gated_sae import (
    GatedTrainingSAEConfig as BuiltinGatedTrainingSAEConfig,
)
from sae_lens.saes.jumprelu_sae import JumpReLUSAE
from sae_lens.saes.sae import SAE
from safetensors.torch import save_file

import sae_lens_gated.conversion as conversion
from sae_lens_gated import (
    GatedSAE,
    GatedSAEConfig,
    GatedSAEExportError,
    GatedTrainingSAE,
    load_gated_sae,
    save_dictionary_learning,
    to_jumprelu,
)
from sae_lens_gated.conversion import export_sae
from tests.helpers import (
    DEVICES,
    build_gated_training_cfg,
    dictionary_learning_module,
    file_hashes,
    random_dictionary_learning_ae,
    randomize_gated_params,
    write_dictionary_learning_folder,
)


def _random_gated(
    kind: str = "plugin",
    apply_b_dec_to_input: bool = True,
    dtype: str = "float32",
    seed: int = 0,
) -> SAE[Any]:
    if kind == "training":
        sae: SAE[Any] = GatedTrainingSAE(
            build_gated_training_cfg(
                apply_b_dec_to_input=apply_b_dec_to_input, dtype=dtype
            )
        )
    elif kind == "builtin_training":
        sae = BuiltinGatedTrainingSAE(
            BuiltinGatedTrainingSAEConfig(
                d_in=16, d_sae=48, apply_b_dec_to_input=apply_b_dec_to_input
            )
        )
    else:
        cls, cfg_cls = (
            (GatedSAE, GatedSAEConfig)
            if kind == "plugin"
            else (BuiltinGatedSAE, BuiltinGatedSAEConfig)
        )
        sae = cls(
            cfg_cls(
                d_in=16,
                d_sae=48,
                apply_b_dec_to_input=apply_b_dec_to_input,
                dtype=dtype,
            )
        )
    randomize_gated_params(sae, seed=seed)
    return sae


def _inputs(
    n: int = 300, d_in: int = 16, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return torch.randn(n, d_in, dtype=dtype) * 1.5


# --- gated -> JumpReLU ----------------------------------------------------------------


def test_to_jumprelu_parameters_and_features_equal_hand_computed_values():
    sae = GatedSAE(GatedSAEConfig(d_in=2, d_sae=2))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
        sae.W_dec.copy_(torch.tensor([[0.5, -1.0], [2.0, 0.25]]))
        sae.b_dec.zero_()
        sae.r_mag.copy_(torch.tensor([math.log(2.0), 0.0]))
        sae.b_gate.copy_(torch.tensor([0.5, -1.0]))
        sae.b_mag.copy_(torch.tensor([0.25, 2.0]))

    jumprelu = to_jumprelu(sae)

    torch.testing.assert_close(jumprelu.W_enc, torch.tensor([[2.0, 2.0], [6.0, -1.0]]))
    torch.testing.assert_close(jumprelu.b_enc, torch.tensor([0.25, 2.0]))
    # threshold = b_mag - exp(r_mag) * b_gate: feature 0's is negative.
    torch.testing.assert_close(jumprelu.threshold, torch.tensor([-0.75, 3.0]))
    torch.testing.assert_close(jumprelu.W_dec, sae.W_dec)
    x = torch.tensor([[1.0, 0.0], [0.0, -0.5], [0.5, -0.5], [-0.4, 0.0]])
    # Row 4: feature 0's gate is open (pre + b_gate = 0.1) but pi_mag = -0.55 lies
    # between the negative threshold and 0, so the ReLU keeps it at 0.
    expected = torch.tensor([[2.25, 4.0], [0.0, 0.0], [0.0, 3.5], [0.0, 0.0]])
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), expected)
        torch.testing.assert_close(jumprelu.encode(x), expected)
        torch.testing.assert_close(jumprelu(x), sae(x))


@pytest.mark.parametrize(
    ("kind", "apply_b_dec_to_input", "dtype"),
    [
        ("plugin", True, "float32"),
        ("plugin", False, "float32"),
        ("plugin", True, "float64"),
        ("training", True, "float32"),
        ("builtin", False, "float32"),
        ("builtin_training", True, "float32"),
    ],
)
def test_jumprelu_features_equal_gated_on_random_inputs(
    kind: str, apply_b_dec_to_input: bool, dtype: str
):
    sae = _random_gated(kind, apply_b_dec_to_input, dtype, seed=1)
    jumprelu = to_jumprelu(sae)
    assert type(jumprelu) is JumpReLUSAE
    assert jumprelu.cfg.apply_b_dec_to_input is apply_b_dec_to_input
    assert jumprelu.cfg.dtype == dtype and jumprelu.W_enc.dtype == sae.W_enc.dtype
    x = _inputs(dtype=sae.W_enc.dtype)
    with torch.no_grad():
        features, expected = jumprelu.encode(x), sae.encode(x)
        assert 0.2 < (expected > 0).float().mean() < 0.8
        tol = 1e-12 if dtype == "float64" else 1e-5
        torch.testing.assert_close(features, expected, rtol=tol, atol=tol)
        torch.testing.assert_close(jumprelu(x), sae(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("to", conversion.EXPORT_FORMATS)
def test_every_export_of_an_sae_on_a_device_equals_the_cpu_sae(
    tmp_path: Path, device: str, to: Any
):
    cpu = _random_gated("training", apply_b_dec_to_input=False, dtype="float64", seed=3)
    sae = _random_gated("training", apply_b_dec_to_input=False, dtype="float64", seed=3)
    sae.to(device)
    if to == "jumprelu":
        jumprelu = to_jumprelu(sae)
        assert jumprelu.W_enc.device.type == device
    export_sae(sae, tmp_path / to, to=to)
    # Every format loads back on the CPU as the same SAE (the JumpReLU folder in SAELens).
    if to == "jumprelu":
        exported: SAE[Any] = SAE.load_from_disk(tmp_path / to, dtype="float64")
        assert type(exported) is JumpReLUSAE
    else:
        exported = load_gated_sae(tmp_path / to, dtype="float64")
    x = _inputs(dtype=torch.float64)
    with torch.no_grad():
        expected = cpu.encode(x)
        assert 0.2 < (expected > 0).float().mean() < 0.8
        torch.testing.assert_close(exported.encode(x), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(exported(x), cpu(x), rtol=1e-12, atol=1e-12)


def _plugin_gated(seed: int) -> GatedSAE:
    sae = GatedSAE(GatedSAEConfig(d_in=16, d_sae=48))
    randomize_gated_params(sae, seed=seed)
    return sae


def _with_negative_thresholds(sae: GatedSAE) -> torch.Tensor:
    """Make every other feature's threshold negative; returns the thresholds."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        half = torch.arange(sae.cfg.d_sae) % 2 == 0
        magnitude = torch.rand(sae.cfg.d_sae, generator=gen) * 0.5 + 0.3
        sae.b_gate.copy_(torch.where(half, magnitude, sae.b_gate))
        sae.b_mag.copy_(torch.where(half, -magnitude, sae.b_mag))
        return sae.b_mag - sae.r_mag.exp() * sae.b_gate


def test_negative_thresholds_keep_the_relu():
    sae = _plugin_gated(seed=3)
    thresholds = _with_negative_thresholds(sae)
    assert (thresholds < 0).sum() >= sae.cfg.d_sae // 2
    jumprelu = to_jumprelu(sae)
    x = _inputs(2000)
    with torch.no_grad():
        z = (x - sae.b_dec) @ sae.W_enc * sae.r_mag.exp() + sae.b_mag
        gate_open_but_negative = (z > thresholds) & (z < 0)
        # The inputs exercise the case where a plain z * 1[z > threshold] goes negative.
        assert gate_open_but_negative.sum() > 100
        features = jumprelu.encode(x)
        torch.testing.assert_close(features, sae.encode(x), rtol=1e-5, atol=1e-5)
        assert (features[gate_open_but_negative] == 0).all()
        assert (features >= 0).all()


def _at_gate_boundary(
    sae: GatedSAE, feature: int, offset: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """An input whose gate pre-activation for ``feature`` is ``offset`` (float64 exact)."""
    W_enc = sae.W_enc.detach().double()
    w = W_enc[:, feature]
    v = torch.randn(sae.cfg.d_in, generator=gen, dtype=torch.float64)
    target = -sae.b_gate.detach().double()[feature] + offset
    u = v + (target - v @ w) / (w @ w) * w
    return u + sae.b_dec.detach().double() * sae.cfg.apply_b_dec_to_input


def test_jumprelu_matches_gated_just_either_side_of_every_gate_boundary():
    sae = _plugin_gated(seed=4)
    thresholds = _with_negative_thresholds(sae).detach()
    jumprelu = to_jumprelu(sae)
    gen = torch.Generator().manual_seed(5)
    d_sae = sae.cfg.d_sae
    # eps is 1e-3 relative to the gate bias: far above float32 rounding of pre (~1e-6).
    eps = 1e-3 * sae.b_gate.detach().double().abs().clamp_min(1.0)
    above = torch.stack([_at_gate_boundary(sae, i, eps[i], gen) for i in range(d_sae)])
    below = torch.stack([_at_gate_boundary(sae, i, -eps[i], gen) for i in range(d_sae)])
    diagonal = torch.arange(d_sae)
    with torch.no_grad():
        for x, side in ((above.float(), 1.0), (below.float(), -1.0)):
            gate = (x - sae.b_dec) @ sae.W_enc + sae.b_gate
            assert (gate[diagonal, diagonal].sign() == side).all()
            features = jumprelu.encode(x)
            torch.testing.assert_close(features, sae.encode(x), rtol=1e-5, atol=1e-5)
            on_boundary = features[diagonal, diagonal]
            if side < 0:
                assert (on_boundary == 0).all()
            else:
                # Just above, a positive-threshold feature jumps to threshold + e^r * eps.
                jump = (thresholds + sae.r_mag.exp() * eps.float()).clamp_min(0)
                torch.testing.assert_close(on_boundary, jump, rtol=1e-3, atol=1e-4)
                assert (on_boundary[thresholds > 0] > 0).all()


def test_jumprelu_keeps_config_and_metadata():
    sae = _random_gated()
    sae.cfg.metadata.hook_name = "blocks.3.hook_resid_post"
    sae.cfg.metadata.model_name = "pythia-70m-deduped"
    cfg = to_jumprelu(sae).cfg
    assert cfg.architecture() == "jumprelu"
    assert (cfg.d_in, cfg.d_sae, cfg.device) == (16, 48, "cpu")
    assert cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert cfg.metadata.model_name == "pythia-70m-deduped"
    assert cfg.metadata.converted_from_architecture == "gated"
    assert sae.cfg.metadata.converted_from_architecture is None


def test_non_gated_sae_is_refused(tmp_path: Path):
    jumprelu = to_jumprelu(_random_gated())
    with pytest.raises(GatedSAEExportError, match="architecture='jumprelu'"):
        to_jumprelu(jumprelu)
    with pytest.raises(GatedSAEExportError, match="Expected a gated SAE"):
        save_dictionary_learning(jumprelu, tmp_path / "dl")
    assert list(tmp_path.iterdir()) == []


# --- SAELens <-> dictionary_learning ---------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "apply_b_dec_to_input"),
    [("plugin", True), ("plugin", False), ("training", False), ("builtin", True)],
)
def test_saved_dictionary_learning_sae_equals_the_gated_sae(
    tmp_path: Path, kind: str, apply_b_dec_to_input: bool
):
    sae = _random_gated(kind, apply_b_dec_to_input, seed=6)
    ae_path, config_path = save_dictionary_learning(sae, tmp_path / "dl")
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == [
        "ae.pt",
        "config.json",
    ]

    ae = dictionary_learning_module().GatedAutoEncoder.from_pretrained(str(ae_path))
    x = _inputs()
    with torch.no_grad():
        expected = sae.encode(x)
        assert 0.2 < (expected > 0).float().mean() < 0.8
        torch.testing.assert_close(ae.encode(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ae(x), sae(x), rtol=1e-5, atol=1e-5)
    # Without input centering the biases must carry the fold; with it, they are copied.
    folded = not torch.equal(ae.gate_bias, getattr(sae, "b_gate"))
    assert folded is (not apply_b_dec_to_input)

    trainer = json.loads(config_path.read_text())["trainer"]
    assert trainer["dict_class"] == "GatedAutoEncoder"
    assert (trainer["activation_dim"], trainer["dict_size"]) == (16, 48)
    reloaded = load_gated_sae(tmp_path / "dl")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), sae(x), rtol=1e-5, atol=1e-5)


def test_dictionary_learning_round_trip_is_exact(tmp_path: Path):
    ae = random_dictionary_learning_ae(seed=7)
    source = write_dictionary_learning_folder(tmp_path / "src", ae, layer=3)

    sae = load_gated_sae(source)
    save_dictionary_learning(sae, tmp_path / "dst")

    original = torch.load(source / "ae.pt", weights_only=True)
    written = torch.load(tmp_path / "dst" / "ae.pt", weights_only=True)
    assert set(written) == set(original)
    for key, value in original.items():
        assert torch.equal(written[key], value), key
    assert json.loads((tmp_path / "dst" / "config.json").read_text()) == json.loads(
        (source / "config.json").read_text()
    )


def test_dictionary_learning_config_is_filled_from_saelens_metadata(tmp_path: Path):
    sae = _random_gated()
    sae.cfg.metadata.hook_name = "blocks.5.hook_mlp_out"
    sae.cfg.metadata.model_name = "gpt2"
    sae.cfg.metadata.context_size = 256
    _, config_path = save_dictionary_learning(sae, tmp_path / "dl")
    config = json.loads(config_path.read_text())
    assert config["trainer"] == {
        "dict_class": "GatedAutoEncoder",
        "trainer_class": "GatedSAETrainer",
        "activation_dim": 16,
        "dict_size": 48,
        "layer": 5,
        "lm_name": "gpt2",
        "submodule_name": "mlp_out_layer_5",
    }
    assert config["buffer"] == {"ctx_len": 256}
    assert load_gated_sae(tmp_path / "dl").cfg.metadata.hook_name == (
        "blocks.5.hook_mlp_out"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("normalize_activations", "layer_norm"), ("reshape_activations", "hook_z")],
)
def test_unrepresentable_saes_are_refused_and_nothing_is_written(
    tmp_path: Path, field: str, value: str
):
    overrides: dict[str, Any] = {field: value}
    sae = GatedSAE(GatedSAEConfig(d_in=16, d_sae=48, **overrides))
    with pytest.raises(GatedSAEExportError, match=f"{field}='{value}'"):
        save_dictionary_learning(sae, tmp_path / "dl")
    assert list(tmp_path.iterdir()) == []


def test_existing_non_empty_destination_is_refused_and_untouched(tmp_path: Path):
    sae = _random_gated()
    destination = tmp_path / "dst"
    destination.mkdir()
    (destination / "ae.pt").write_bytes(b"someone else's file")
    before = file_hashes(tmp_path)
    for to in conversion.EXPORT_FORMATS:
        with pytest.raises(
            FileExistsError, match=f"Refusing to write to {destination}"
        ):
            export_sae(sae, destination, to)
    assert file_hashes(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]

    (tmp_path / "empty").mkdir()
    written = export_sae(sae, tmp_path / "empty", "dictionary_learning")
    assert [p.name for p in written] == ["ae.pt", "config.json"]


def test_failed_export_leaves_no_partial_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def fail(*_args: Any, **_kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(conversion.torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_dictionary_learning(_random_gated(), tmp_path / "dl")
    assert list(tmp_path.iterdir()) == []


# --- the destination folder -------------------------------------------------------------


def _partial_name(name: str, pid: int | str, suffix: str = "0123abcd") -> str:
    return f".{name}.sae-lens-gated-partial-{pid}-{suffix}"


_PARTIAL = re.compile(r"\.dst\.sae-lens-gated-partial-(?P<pid>\d+)-[0-9a-f]{8}")

_KILLED_EXPORT = """
import os
import signal
import sys
from sae_lens_gated.conversion import write_new_folder

def write(folder):
    (folder / "ae.pt").write_bytes(b"half written")
    os.kill(os.getpid(), signal.SIGKILL)

write_new_folder(sys.argv[1], write)
"""


def _write_one_file(folder: Path) -> None:
    (folder / "weights.bin").write_bytes(b"complete")


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_killed_export_leaves_a_recognisable_folder_the_next_run_removes(
    tmp_path: Path,
):
    dst = tmp_path / "dst"
    killed = subprocess.Popen(
        [sys.executable, "-c", _KILLED_EXPORT, str(dst)], stderr=subprocess.PIPE
    )
    _, stderr = killed.communicate()
    assert killed.returncode == -signal.SIGKILL, stderr.decode()
    (partial,) = tmp_path.iterdir()
    match = _PARTIAL.fullmatch(partial.name)
    assert match is not None, partial.name
    assert int(match["pid"]) == killed.pid
    assert (partial / "ae.pt").read_bytes() == b"half written"

    written = conversion.write_new_folder(dst, _write_one_file)

    assert written == [dst / "weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_only_stale_partial_folders_of_the_same_destination_are_removed(
    tmp_path: Path,
):
    dead = _dead_pid()
    stale = tmp_path / _partial_name("dst", dead)
    kept = [
        tmp_path / _partial_name("dst", os.getpid()),  # a live export
        tmp_path / _partial_name("other", dead),  # another destination
        tmp_path / (_partial_name("dst", dead) + ".bak"),  # not the exact pattern
        tmp_path / _partial_name("dst", dead, "0123ABCD"),
        tmp_path / _partial_name("dst", "12x"),
    ]
    for folder in [stale, *kept]:
        folder.mkdir()
        (folder / "ae.pt").write_bytes(b"partial")
    not_a_folder = tmp_path / _partial_name("dst", dead, "feedbeef")
    not_a_folder.write_bytes(b"a file")

    conversion.write_new_folder(tmp_path / "dst", _write_one_file)

    assert not stale.exists()
    assert all((folder / "ae.pt").read_bytes() == b"partial" for folder in kept)
    assert not_a_folder.read_bytes() == b"a file"


@pytest.mark.parametrize("to", conversion.EXPORT_FORMATS)
def test_exported_folders_get_permissions_from_the_umask(tmp_path: Path, to: Any):
    previous = os.umask(0o027)
    try:
        export_sae(_random_gated(), tmp_path / "dst", to)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "dst").stat().st_mode) == 0o750


@pytest.mark.parametrize("target", ["empty folder", "nothing"])
def test_symlinked_destination_is_refused_before_any_work(tmp_path: Path, target: str):
    real = tmp_path / "real"
    if target == "empty folder":
        real.mkdir()
    link = tmp_path / "dst"
    link.symlink_to(real, target_is_directory=True)
    for call in (
        lambda: conversion.check_new_folder(link),
        lambda: export_sae(_random_gated(), link, "saelens"),
    ):
        with pytest.raises(FileExistsError) as error:
            call()
        assert str(error.value) == (
            f"Refusing to write to {link}: it is a symbolic link (to {real}); give "
            "the path of a new or empty folder instead."
        )
    assert os.readlink(link) == str(real)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["dst", "real"] if target == "empty folder" else ["dst"]
    )
    assert target == "nothing" or list(real.iterdir()) == []


@contextlib.contextmanager
def _without_root_privileges() -> Iterator[None]:
    """Run the block as ``nobody`` when the tests run as root, who may write anywhere."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_destination_in_an_unwritable_folder_is_refused_before_any_work():
    # Outside tmp_path, whose parents only root may enter.
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        sae = _random_gated()
        with _without_root_privileges():
            for dst in (locked / "dst", locked / "new" / "dst"):
                for call in (
                    lambda: conversion.check_new_folder(dst),
                    lambda: export_sae(sae, dst, "dictionary_learning"),
                ):
                    with pytest.raises(PermissionError) as error:
                        call()
                    assert str(error.value) == (
                        f"Refusing to write to {dst}: cannot create files in {locked}."
                    )
        assert list(locked.iterdir()) == []
    finally:
        (base / "locked").chmod(0o755)
        shutil.rmtree(base)


def test_destination_under_a_file_is_refused_before_any_work(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError) as error:
        export_sae(_random_gated(), tmp_path / "file" / "dst", "saelens")
    assert str(error.value) == (
        f"Refusing to write to {tmp_path / 'file' / 'dst'}: {tmp_path / 'file'} is not "
        "a folder."
    )


# --- non-finite parameters ----------------------------------------------------------------


def _with_non_finite(sae: SAE[Any], name: str, count: int) -> SAE[Any]:
    with torch.no_grad():
        getattr(sae, name).view(-1)[:count] = float("nan")
    return sae


@pytest.mark.parametrize("to", conversion.EXPORT_FORMATS)
@pytest.mark.parametrize(("name", "count"), [("b_gate", 1), ("W_enc", 3)])
def test_exports_refuse_non_finite_parameters(
    tmp_path: Path, to: Any, name: str, count: int
):
    sae = _with_non_finite(_random_gated(), name, count)
    with pytest.raises(GatedSAEExportError) as error:
        export_sae(sae, tmp_path / "dst", to)
    assert str(error.value) == (
        f"Refusing to export: {name} has {count} non-finite value(s) (NaN or inf)."
    )
    assert list(tmp_path.iterdir()) == []


def test_to_jumprelu_and_save_dictionary_learning_refuse_non_finite_parameters(
    tmp_path: Path,
):
    sae = _with_non_finite(_random_gated(), "r_mag", 2)
    with pytest.raises(GatedSAEExportError, match="r_mag has 2 non-finite value"):
        to_jumprelu(sae)
    with pytest.raises(GatedSAEExportError, match="r_mag has 2 non-finite value"):
        save_dictionary_learning(sae, tmp_path / "dl")
    assert list(tmp_path.iterdir()) == []


def test_to_jumprelu_refuses_an_encoder_that_overflows_the_dtype():
    sae = _plugin_gated(seed=0)
    with torch.no_grad():
        sae.r_mag[5] = 100.0  # exp(100) * W_enc is finite in float64, not in float32
    with pytest.raises(GatedSAEExportError) as error:
        to_jumprelu(sae)
    message = str(error.value)
    assert message.startswith("Refusing to export: the JumpReLU W_enc has ")
    assert "non-finite value(s) in float32" in message


# --- what vanilla SAELens reads ---------------------------------------------------------

_LOAD_WITHOUT_PLUGIN = """
import sys
import torch
from safetensors.torch import load_file
from sae_lens import SAE, GatedSAE, JumpReLUSAE
for folder, cls in ((sys.argv[1], GatedSAE), (sys.argv[2], JumpReLUSAE)):
    sae = SAE.load_from_disk(folder)
    assert type(sae) is cls, type(sae)
    expected = load_file(sys.argv[3])
    torch.testing.assert_close(sae.encode(expected["x"]), expected["features"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(expected["x"]), expected["out"], rtol=1e-5, atol=1e-5)
assert not any(name.startswith("sae_lens_gated") for name in sys.modules)
print("loaded-without-plugin")
"""


def test_loaded_and_converted_saes_load_in_vanilla_saelens(tmp_path: Path):
    ae = random_dictionary_learning_ae(seed=8)
    sae = load_gated_sae(write_dictionary_learning_folder(tmp_path / "dl", ae))
    gated_files = export_sae(sae, tmp_path / "gated", "saelens")
    jumprelu_files = export_sae(sae, tmp_path / "jumprelu", "jumprelu")
    assert [p.name for p in gated_files] == [p.name for p in jumprelu_files]
    assert json.loads((tmp_path / "gated" / "cfg.json").read_text())[
        "architecture"
    ] == ("gated")
    x = _inputs()
    with torch.no_grad():
        expected = {"x": x, "features": ae.encode(x), "out": ae(x)}
    save_file(expected, tmp_path / "expected.safetensors")

    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD_WITHOUT_PLUGIN,
            str(tmp_path / "gated"),
            str(tmp_path / "jumprelu"),
            str(tmp_path / "expected.safetensors"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "loaded-without-plugin" in result.stdout
