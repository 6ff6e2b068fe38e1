"""The package as users get it: layout, laziness, console script, typing marker."""

from __future__ import annotations

import ast
import importlib.resources
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import refattn

ROOT = Path(__file__).resolve().parents[1]
#: The spec proper: it sees arrays only through their namespace.
CORE = ("attention", "checks", "namespace", "positions", "scores", "softmax")
FRAMEWORKS = {"numpy", "torch", "cupy", "jax", "array_api_strict", "ml_dtypes"}


def _run(code: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_importing_refattn_imports_no_framework(tmp_path: Path) -> None:
    code = (
        "import refattn, refattn.backends, sys; "
        "print([m for m in ('torch', 'cupy', 'array_api_strict') if m in sys.modules])"
    )
    assert _run(code, tmp_path) == "[]"


def test_backends_are_installed_as_refattn_backends_only(tmp_path: Path) -> None:
    code = (
        "import importlib.util as u; "
        "print(u.find_spec('backends') is None, u.find_spec('refattn.backends') is not None)"
    )
    assert _run(code, tmp_path) == "True True"


@pytest.mark.parametrize("module", CORE)
def test_the_spec_imports_no_framework(module: str) -> None:
    tree = ast.parse((ROOT / "refattn" / f"{module}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    roots = {name.split(".")[0] for name in imported}
    assert not roots & FRAMEWORKS, f"refattn/{module}.py imports {roots & FRAMEWORKS}"
    assert not any(n.startswith(("refattn.backends", "refattn.testing")) for n in imported)


def test_py_typed_marker_ships() -> None:
    assert importlib.resources.files("refattn").joinpath("py.typed").is_file()


def test_console_script_runs() -> None:
    script = shutil.which("refattn", path=str(Path(sys.executable).parent))
    assert script is not None
    done = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"refattn {refattn.__version__}"


def test_wheel_maps_backends_under_refattn(tmp_path: Path) -> None:
    """A plain (non-editable) build puts backends/ at refattn/backends/, nowhere else."""
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "refattn", "backends", "tests"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("refattn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "refattn/backends/__init__.py" in names
    assert "refattn/backends/torch.py" in names
    assert "refattn/backends/cupy_kernels/decode.py" in names
    assert "refattn/backends/cupy_kernels/split_kv_decode.cu" in names  # package data
    assert "refattn/testing/oracle.py" in names  # the oracle is part of the product
    assert not [n for n in names if n.startswith("refattn/tests/")]  # the suite is not
    assert "refattn/py.typed" in names
    assert not [n for n in names if n.startswith(("backends/", "tests/"))]
