"""What ``import sae_lens_gated`` loads: the library, not the reproduction harness."""

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sae_lens_gated"


def _core_modules() -> list[str]:
    """Every module outside ``repro/`` and the command line."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[1] in ("repro", "cli", "__main__"):
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_the_core_never_imports_the_harness_or_matplotlib():
    modules = _core_modules()
    assert "sae_lens_gated.conversion" in modules
    assert "sae_lens_gated.saes.gated_sae" in modules
    assert not any("repro" in name for name in modules)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] == 'matplotlib'\n"
        "          or m.startswith('sae_lens_gated.repro')]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=PACKAGE.parent,  # this checkout's package, whatever is installed
    )
    assert result.returncode == 0, result.stderr
