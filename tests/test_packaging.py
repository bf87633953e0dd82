"""Issue 18: the wheel and sdist `python -m build` makes hold what they must, and the wheel
installs into a fresh venv, with its declared dependencies, and runs from there."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.processes import clean_env

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# What the checkout holds that is no source: never copied, never left behind.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".data",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "secrets",
    "*.sqlite3*",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """Wheel, sdist and the build's output, built from a copy of the tree so that the
    checkout gets no build/, dist/ or *.egg-info."""
    tree = tmp_path_factory.mktemp("tree") / "coap-auth"
    shutil.copytree(ROOT, tree, ignore=NOT_SOURCE, symlinks=True)
    out = tree.parent / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(tree)],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = out.glob("coap_auth-*.whl")
    (sdist,) = out.glob("coap_auth-*.tar.gz")
    return wheel, sdist, result.stdout + result.stderr


def test_build_has_no_setuptools_warnings(built: tuple[Path, Path, str]) -> None:
    *_, output = built
    assert "Deprecat" not in output and "SetuptoolsWarning" not in output, output[-3000:]


def test_wheel_holds_both_packages_and_their_type_marker(built: tuple[Path, Path, str]) -> None:
    wheel, _, _ = built
    assert wheel.name == f"coap_auth-{VERSION}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "coap_auth/cli/__init__.py",
        "coap_auth/store/sqlite.py",
        "device_client/__init__.py",
        "device_client/py.typed",
    ):
        assert module in names, module
    assert not any(name.startswith(("tests/", "examples/", "bench/")) for name in names)
    entry_points = (
        zipfile.ZipFile(wheel).read(f"coap_auth-{VERSION}.dist-info/entry_points.txt").decode()
    )
    assert "coap-auth = coap_auth.cli:main" in entry_points


def test_sdist_is_the_whole_source_release(built: tuple[Path, Path, str]) -> None:
    _, sdist, _ = built
    prefix = f"coap_auth-{VERSION}/"
    names = {name.removeprefix(prefix) for name in tarfile.open(sdist).getnames()}
    for needed in (
        "README.md",
        "pyproject.toml",
        "MANIFEST.in",
        "Makefile",
        "deploy/Dockerfile",
        "deploy/compose.yaml",
        "deploy/coap-auth.service",
        "examples/sensor.py",
        "tests/processes.py",
        "device_client/py.typed",
    ):
        assert needed in names, needed
    if (ROOT / "docs").is_dir():  # docs/protocol.md, docs/configuration.md
        for doc in (ROOT / "docs").rglob("*.md"):
            assert str(doc.relative_to(ROOT)) in names, doc
    assert not any("__pycache__" in name or name.startswith("deploy/secrets") for name in names)


def test_wheel_installs_in_a_fresh_venv_and_runs(
    built: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """A venv with nothing but the wheel and the dependencies it declares, resolved by pip
    from the configured index (pip's cache makes it a few seconds): what a user gets."""
    wheel, _, _ = built
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    python = venv / "bin" / "python"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            f"{wheel}[postgres]",
        ],  # the container's install line
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    command = venv / "bin" / "coap-auth"
    env = clean_env()
    env.pop("PYTHONPATH", None)
    version = subprocess.run(
        [command, "--version"], capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"coap-auth {VERSION}"
    where = subprocess.run(
        [python, "-c", "import coap_auth, asyncpg; print(coap_auth.__file__)"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=tmp_path,
    )
    assert where.stdout.startswith(str(venv)), where  # not this checkout
    data_dir = tmp_path / "data"
    init = subprocess.run(
        [command, "init", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert init.returncode == 0, init.stderr
    assert (data_dir / "coap-auth.sqlite3").exists() and (data_dir / "master.key").exists()
    listed = subprocess.run(
        [command, "keys", "list", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert listed.returncode == 0 and re.search(r"\bactive\b", listed.stdout), listed


def test_checkout_gets_no_build_output() -> None:
    ignored = (ROOT / ".gitignore").read_text().split()
    for pattern in ("build/", "dist/", "*.egg-info/", "deploy/secrets/"):
        assert pattern in ignored, pattern
    assert not (ROOT / "build").exists() and not (ROOT / "dist").exists()
