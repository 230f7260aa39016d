"""`make setup`: Java is checked before the long install, and a new TORCH_VERSION installs again."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def make(folder: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    return subprocess.run(
        [MAKE, "--no-print-directory", *args], cwd=folder, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def checkout(tmp_path) -> Path:
    for name in ("Makefile", "requirements.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path


def test_missing_java_stops_setup_before_installing(checkout, tmp_path_factory):
    bin_dir = tmp_path_factory.mktemp("bin")  # a PATH with a shell but no java (and no python)
    for tool in ("sh", "test", "touch", "rm"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    result = make(checkout, "setup", "PYTHON=python-that-must-not-run", path=str(bin_dir))
    assert result.returncode != 0
    assert "Java is missing" in result.stdout
    assert "python-that-must-not-run" not in result.stdout + result.stderr
    assert not (checkout / ".venv").exists()


def test_a_new_torch_version_installs_again(checkout):
    (checkout / ".venv").mkdir()
    (checkout / ".venv" / ".installed-torch-2.13.0").touch()  # set up with the Makefile's version
    assert "pip install" not in make(checkout, "-n", "setup").stdout
    planned = make(checkout, "-n", "setup", "TORCH_VERSION=2.14.0").stdout
    assert "pip install --quiet torch==2.14.0" in planned and "-r requirements.txt" in planned
    cpu = make(
        checkout, "-n", "setup", "TORCH_VERSION=2.14.0", "TORCH_INDEX=https://download.pytorch.org/whl/cpu"
    )
    assert "torch==2.14.0 --index-url https://download.pytorch.org/whl/cpu" in cpu.stdout
