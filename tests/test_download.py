"""download_data.sh's fetch / checksum / resume / unpack logic, on local file:// URLs."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "download_data.sh"
pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def remote(tmp_path):
    """A 'server' folder with a features zip and an annotation file, and a manifest for them."""
    server = tmp_path / "server"
    server.mkdir()
    with zipfile.ZipFile(server / "feats.zip", "w") as archive:
        archive.writestr("feats/v_a.npy", b"x" * 5000)
    (server / "train.csv").write_text("video_id\tcaption\n" * 200)
    data = tmp_path / "data"
    manifest = tmp_path / "manifest.txt"
    manifest.write_text(
        f"file://{server}/train.csv {md5(server / 'train.csv')} {data} no\n"
        f"file://{server}/feats.zip {md5(server / 'feats.zip')} {data} yes\n"
    )
    return server, data, manifest


def run(manifest: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MMRL_MANIFEST": str(manifest)}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


def test_download_unpack_and_rerun(remote):
    server, data, manifest = remote
    first = run(manifest)
    assert first.returncode == 0, first.stderr
    assert (data / "feats" / "v_a.npy").read_bytes() == b"x" * 5000
    assert md5(data / "train.csv") == md5(server / "train.csv")
    second = run(manifest)
    assert second.returncode == 0
    assert "already downloaded" in second.stdout and "already unpacked" in second.stdout
    assert run(manifest, "--verify-only").returncode == 0


def test_resumes_a_partial_download(remote):
    server, data, manifest = remote
    data.mkdir()
    full = (server / "train.csv").read_bytes()
    (data / "train.csv.part").write_bytes(full[:1000])
    result = run(manifest)
    assert result.returncode == 0, result.stderr
    assert (data / "train.csv").read_bytes() == full
    assert not (data / "train.csv.part").exists()


def test_checksum_mismatch_fails_clearly(remote):
    server, data, manifest = remote
    manifest.write_text(f"file://{server}/train.csv {'0' * 32} {data} no\n")
    result = run(manifest)
    assert result.returncode != 0
    assert f"md5 mismatch for {data}/train.csv: expected {'0' * 32}" in result.stderr
    assert (data / "train.csv.bad").exists() and not (data / "train.csv").exists()
    verify = run(manifest, "--verify-only")
    assert verify.returncode != 0 and f"missing: {data}/train.csv" in verify.stdout


def test_unreachable_url_fails_clearly(remote, tmp_path):
    _, data, manifest = remote
    manifest.write_text(f"file://{tmp_path}/nowhere.zip {'0' * 32} {data} yes\n")
    result = run(manifest)
    assert result.returncode != 0 and "could not download" in result.stderr
