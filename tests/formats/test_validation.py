from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens_gated.formats.validation import (
    GATED_PARAM_NAMES,
    GatedSAELoadError,
    check_finite,
    check_keys,
    check_shape,
    count_non_finite,
    gated_shapes,
    positive_int_field,
    read_json_object,
)


def test_gated_shapes():
    assert gated_shapes(3, 5) == {
        "W_enc": (3, 5),
        "W_dec": (5, 3),
        "b_dec": (3,),
        "b_gate": (5,),
        "b_mag": (5,),
        "r_mag": (5,),
    }
    assert tuple(gated_shapes(3, 5)) == GATED_PARAM_NAMES


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"a": 1', "is not readable JSON"),
        ("[1, 2]", "does not hold a JSON object."),
        ("", "is not readable JSON"),
    ],
)
def test_read_json_object_refuses_what_is_not_an_object(
    tmp_path: Path, text: str, words: str
):
    path = tmp_path / "cfg.json"
    path.write_text(text)
    with pytest.raises(GatedSAELoadError) as error:
        read_json_object(path)
    assert str(error.value).startswith(f"{path} {words}")


def test_read_json_object_reads_an_object_and_names_a_missing_file(tmp_path: Path):
    path = tmp_path / "cfg.json"
    path.write_text('{"a": [1], "b": null}')
    assert read_json_object(path) == {"a": [1], "b": None}
    with pytest.raises(GatedSAELoadError) as error:
        read_json_object(tmp_path / "missing.json")
    assert str(error.value).startswith(
        f"{tmp_path / 'missing.json'} is not readable JSON"
    )


@pytest.mark.parametrize("value", [0, -3, 2.0, "8", True, None, [4]])
def test_positive_int_field_refuses_anything_but_a_positive_int(value: Any):
    with pytest.raises(GatedSAELoadError) as error:
        positive_int_field(
            {"dict_size": value}, "dict_size", Path("c.json"), "trainer."
        )
    assert str(error.value) == (
        f"c.json: field 'trainer.dict_size' is {value!r}, expected a positive integer."
    )
    assert positive_int_field({"d": 7}, "d", Path("c.json")) == 7


def test_check_keys_lists_missing_and_unexpected_keys():
    check_keys(Path("w"), ["b", "a"], ("a", "b"))
    with pytest.raises(GatedSAELoadError) as error:
        check_keys(Path("w"), ["a", "c", "d"], ["a", "b"])
    assert str(error.value) == (
        "w: missing key(s) 'b'; unexpected key(s) 'c', 'd'. A gated SAE has exactly a, b."
    )


def test_check_shape_names_both_files():
    check_shape(Path("ae.pt"), "r_mag", (4,), (4,), Path("config.json"))
    with pytest.raises(GatedSAELoadError) as error:
        check_shape(Path("ae.pt"), "r_mag", (4,), (5,), Path("config.json"))
    assert str(error.value) == (
        "ae.pt: key 'r_mag' has shape (4,), expected (5,) from the sizes in config.json."
    )


def test_non_finite_values_are_counted():
    tensor = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0])
    assert count_non_finite(tensor) == 3
    assert count_non_finite(torch.zeros(3)) == 0
    check_finite(Path("w"), "b_mag", torch.ones(2))
    with pytest.raises(GatedSAELoadError) as error:
        check_finite(Path("w"), "b_mag", tensor)
    assert str(error.value) == "w: key 'b_mag' has 3 non-finite value(s) (NaN or inf)."
