import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers import load_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_wheels_check.py"


check = load_module(SCRIPT)


def _wheel(folder: Path, name: str, version: str, *requires: str) -> Path:
    """A wheel holding only its metadata, as pip downloads it."""
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            f"{name}-{version}.dist-info/METADATA", "\n".join(lines) + "\n"
        )
    return path


def _problems(
    tmp_path: Path,
    wheels: list[tuple[str, ...]],
    listed: dict[str, str],
    image: dict[str, str | None],
    project: tuple[str, ...] = (),
) -> list[str]:
    read = [check.read_wheel(_wheel(tmp_path, *spec)) for spec in wheels]
    return check.problems(
        read,
        {k: Version(v) for k, v in listed.items()},
        {k: Version(v) if v else None for k, v in image.items()},
        [Requirement(r) for r in project],
    )


def test_wheels_that_complete_the_image_pass(tmp_path: Path):
    found = _problems(
        tmp_path,
        [
            ("sae-lens", "6.1", "transformers>=5,<6", "Plotly_Express>=0.4"),
            ("plotly-express", "0.4.1", "pandas"),
        ],
        listed={"sae-lens": "6.1", "plotly-express": "0.4.1"},
        image={"transformers": "5.17.0", "pandas": None},
        project=("sae-lens>=6",),
    )
    assert found == []


def test_a_requirement_found_nowhere_or_at_an_excluded_version_is_named(tmp_path: Path):
    found = _problems(
        tmp_path,
        [("sae-lens", "6.1", "transformers>=5.20", "scipy", "nltk>=4")],
        listed={"sae-lens": "6.1", "nltk": "3.9"},
        image={"transformers": "5.17.0"},
        project=("sae-lens<6",),
    )
    assert found == [
        "nltk==3.9: listed, but no wheel in the folder",
        "sae-lens-gated: needs sae-lens<6, the wheel has 6.1",
        "sae-lens: needs nltk>=4, neither a wheel nor in the image",
        "sae-lens: needs scipy, neither a wheel nor in the image",
        "sae-lens: needs transformers>=5.20, the image has 5.17.0",
    ]


def test_markers_are_those_of_the_gpu_machines_python_and_extras_are_followed(
    tmp_path: Path,
):
    found = _problems(
        tmp_path,
        [
            (
                "wandb",
                "0.31",
                "tomli; python_version < '3.11'",
                "eval[weave]",
                "boto3; extra == 'aws'",
                "numpy>=3; python_version >= '3.12'",
            ),
            ("eval", "1.0", "weave-core; extra == 'weave'", "ax; extra == 'ax'"),
        ],
        listed={"wandb": "0.31", "eval": "1.0"},
        image={"numpy": "2.5.2"},
    )
    # tomli (Python < 3.11) and boto3, ax (extras nobody asked for) are not needed.
    assert found == [
        'eval: needs weave-core; extra == "weave", neither a wheel nor in the image',
        'wandb: needs numpy>=3; python_version >= "3.12", the image has 2.5.2',
    ]


def test_a_wheel_of_another_version_or_not_listed_is_named(tmp_path: Path):
    found = _problems(
        tmp_path,
        [("dill", "0.4.0"), ("extra-thing", "1.0")],
        listed={"dill": "0.4.1"},
        image={},
    )
    assert found == [
        "dill: listed at 0.4.1, the wheel is 0.4.0",
        "extra-thing: a wheel in the folder, not in the list",
    ]


def test_the_lists_cover_the_packages_own_requirements():
    # What the GPU machine imports sae-lens-gated with: each requirement is carried or there.
    listed = check.read_pins(ROOT / "scripts" / "gpu_wheels.txt")
    image = check.read_pins(ROOT / "scripts" / "gpu_image.txt")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        name = check.canonicalize_name(requirement.name)
        version = listed.get(name) or image.get(name)
        assert name in listed or name in image, line
        assert version is None or requirement.specifier.contains(version), line
    assert image["torch"] == Version("2.11.0") and image["transformers"] is not None


def test_the_command_exits_1_and_names_each_problem(tmp_path: Path):
    _wheel(tmp_path, "sae-lens", "6.54.12", "somewhere-else>=1")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    errors = done.stderr.splitlines()
    assert (
        "gpu_wheels_check: sae-lens: needs somewhere-else>=1, neither a wheel nor in the image"
        in errors
    )
    # Every other listed package is missing from this folder, one line each.
    listed = check.read_pins(ROOT / "scripts" / "gpu_wheels.txt")
    assert sum("listed, but no wheel" in e for e in errors) == len(listed) - 1


def test_image_needs_lists_the_image_packages_required_with_their_read_versions(
    tmp_path: Path,
):
    wheels = [
        check.read_wheel(_wheel(tmp_path, *spec))
        for spec in [
            ("sae-lens", "6.1", "Transformers>=5", "nltk", "plotly[express]"),
            ("nltk", "3.9", "joblib", "regex; python_version < '3.12'"),
            ("plotly", "7.1", "narwhals; extra == 'express'", "boto3; extra == 'aws'"),
        ]
    ]
    image: dict[str, Version | None] = {
        "transformers": Version("5.17.0"),
        "joblib": None,
        "narwhals": None,
        "regex": None,
        "scipy": None,  # in the image, required by nothing here
    }
    needs = check.image_needs(wheels, image, [Requirement("torch>=2")])
    # torch is required but not in this image: the check names it, not this list.
    assert needs == ["joblib", "narwhals", "transformers==5.17.0"]
