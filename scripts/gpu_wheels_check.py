"""Check, before a GPU is lent, that the wheels carried there complete its packages.

The GPU machine has no network: whatever sae-lens-gated needs there must be either in its
image (``scripts/gpu_image.txt``) or among the wheels ``scripts/gpu_wheels.sh`` downloaded
(``scripts/gpu_wheels.txt``). This reads every wheel's own metadata and checks, for that
machine's Python 3.12 on Linux x86-64:

- the folder holds exactly one wheel for each line of the list, at its version;
- every requirement of the package (``pyproject.toml``) and of each wheel, with its
  environment markers and the extras asked for, names a wheel or an image package;
- each such requirement admits the version the wheel has, or the image version where one
  was read on the machine.

With ``--installed`` the image is the running interpreter's packages and markers instead:
``scripts/gpu_check.sh`` runs that on the GPU machine itself, before its steps. With
``--image-needs`` it prints the image's packages that are required, one pip specifier a
line, for ``scripts/gpu_rehearsal.sh`` to install.

usage: python scripts/gpu_wheels_check.py [--installed | --image-needs] [WHEELS_DIR]
       (WHEELS_DIR defaults to .whl; exit 1 on a problem)
"""

import argparse
import importlib.metadata
import sys
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# The GPU machine's interpreter, for requirements' environment markers.
MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}


@dataclass(frozen=True)
class Wheel:
    """One wheel's name, version and requirements (``Requires-Dist``)."""

    name: str
    version: Version
    requires: tuple[Requirement, ...]


def read_pins(path: Path) -> dict[str, Version | None]:
    """``name`` or ``name==version`` lines (``#`` comments), by canonical name."""
    pins: dict[str, Version | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version) if version else None
    return pins


def read_wheel(path: Path) -> Wheel:
    """The metadata of the wheel at ``path``."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode())
    return Wheel(
        name=canonicalize_name(metadata["Name"].strip()),
        version=Version(metadata["Version"].strip()),
        requires=tuple(
            Requirement(line) for line in metadata.get_all("Requires-Dist") or []
        ),
    )


def installed() -> dict[str, Version | None]:
    """The running interpreter's packages, by canonical name."""
    return {
        canonicalize_name(d.metadata["Name"]): Version(d.version)
        for d in importlib.metadata.distributions()
    }


def _applies(requirement: Requirement, markers: dict[str, str], extra: str) -> bool:
    marker = requirement.marker
    return marker is None or marker.evaluate({**markers, "extra": extra})


def requirements(
    wheels: list[Wheel], project: list[Requirement], markers: dict[str, str]
) -> list[tuple[str, Requirement]]:
    """Every requirement that applies under ``markers``, with the package that has it.

    The package's own and each wheel's, and those of the extras a requirement asks of a
    wheel.
    """
    by_name = {wheel.name: wheel for wheel in wheels}
    todo = [("sae-lens-gated", "", list(project))]
    todo += [(w.name, "", list(w.requires)) for w in wheels]
    done: set[tuple[str, str]] = set()
    found: list[tuple[str, Requirement]] = []
    while todo:
        requirer, extra, requires = todo.pop()
        if (requirer, extra) in done:
            continue
        done.add((requirer, extra))
        for requirement in requires:
            if _applies(requirement, markers, extra):
                found.append((requirer, requirement))
                wheel = by_name.get(canonicalize_name(requirement.name))
                if wheel is not None:
                    todo += [
                        (wheel.name, e, list(wheel.requires))
                        for e in requirement.extras
                    ]
    return found


def problems(
    wheels: list[Wheel],
    listed: dict[str, Version | None],
    image: dict[str, Version | None],
    project: list[Requirement],
    markers: dict[str, str] = MARKERS,
) -> list[str]:
    """Everything that would stop the carried wheels from working on the GPU machine.

    Args:
        wheels: The wheels in the folder.
        listed: The wheel list's pins.
        image: The image's packages, with the version where one was read.
        project: The package's own requirements.
        markers: The environment the requirements' markers are evaluated in.

    Returns:
        One line per problem; empty when the wheels complete the image.
    """
    found: list[str] = []
    by_name = {wheel.name: wheel for wheel in wheels}
    for name, version in listed.items():
        wheel = by_name.get(name)
        if wheel is None:
            found.append(f"{name}=={version}: listed, but no wheel in the folder")
        elif wheel.version != version:
            found.append(f"{name}: listed at {version}, the wheel is {wheel.version}")
    for wheel in wheels:
        if wheel.name not in listed:
            found.append(f"{wheel.name}: a wheel in the folder, not in the list")
    for requirer, requirement in requirements(wheels, project, markers):
        name = canonicalize_name(requirement.name)
        wheel = by_name.get(name)
        have = wheel.version if wheel else image.get(name)
        if wheel is None and name not in image:
            found.append(
                f"{requirer}: needs {requirement}, neither a wheel nor in the image"
            )
        elif have is not None and not requirement.specifier.contains(
            have, prereleases=True
        ):
            where = "the wheel" if wheel else "the image"
            found.append(f"{requirer}: needs {requirement}, {where} has {have}")
    return sorted(set(found))


def image_needs(
    wheels: list[Wheel],
    image: dict[str, Version | None],
    project: list[Requirement],
    markers: dict[str, str] = MARKERS,
) -> list[str]:
    """The image's packages that the package and the wheels require, as pip specifiers.

    ``name==version`` where the image's version is known, else ``name``; what a
    rehearsal of the GPU machine installs.
    """
    carried = {wheel.name for wheel in wheels}
    needed = requirements(wheels, project, markers)
    names: set[str] = {canonicalize_name(r.name) for _, r in needed}
    return sorted(
        f"{n}=={image[n]}" if image[n] is not None else n
        for n in names - carried
        if n in image
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheels", type=Path, nargs="?", default=ROOT / ".whl")
    parser.add_argument(
        "--installed",
        action="store_true",
        help="Check against this interpreter's packages, not scripts/gpu_image.txt.",
    )
    parser.add_argument(
        "--image-needs",
        action="store_true",
        help="Print the image's packages that the package and the wheels require.",
    )
    args = parser.parse_args(argv)
    wheels = [read_wheel(path) for path in sorted(args.wheels.glob("*.whl"))]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    if args.installed:
        image = installed()
        markers = {k: str(v) for k, v in default_environment().items()}
    else:
        image, markers = read_pins(ROOT / "scripts" / "gpu_image.txt"), MARKERS
    needs = [Requirement(line) for line in project["dependencies"]]
    if args.image_needs:
        sys.stdout.write("\n".join(image_needs(wheels, image, needs, markers)) + "\n")
        return 0
    found = problems(
        wheels,
        read_pins(ROOT / "scripts" / "gpu_wheels.txt"),
        image,
        needs,
        markers,
    )
    for line in found:
        sys.stderr.write(f"gpu_wheels_check: {line}\n")
    if not found:
        where = "this Python's packages" if args.installed else "the GPU image"
        sys.stdout.write(f"gpu_wheels_check: {len(wheels)} wheels complete {where}\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
