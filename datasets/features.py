"""Feature stores and segment cropping.

Two on-disk layouts hold the same features:
- the original directory of `.npy` files: `<vid>_rgb.npy` + `<vid>_flow.npy` (video) or `<vid>.npy` (audio);
- one packed HDF5 file per modality (written by `pack_directory`): every video's rows concatenated in one
  `features` dataset, with `video_ids` and `offsets` as the index. A crop then reads only its own rows.

The video feature is always V = rgb + flow, so the packed video file stores that sum.
Every read is validated (shape, dimension, finite values); a bad file is reported by name.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np

from utilities.errors import InputError
from utilities.files import atomic_path
from utilities.log import progress

# Seconds of video per feature row: I3D stacks of 64 frames at 25 fps, VGGish windows of 0.96 s.
STRIDE_S = {"video": 64 / 25, "audio": 0.96}

log = logging.getLogger(__name__)

MODALITIES = ("video", "audio")
H5_SUFFIXES = (".h5", ".hdf5")
PACK_FORMAT = "mmrl-packed-features-v1"


def crop_indices(n_rows: int, start: float, end: float, duration: float) -> tuple[int, int]:
    """Rows [i0, i1) of a video's S = `n_rows` features that cover [start, end].

    The original rule: i0 = int(S·(start/duration)), i1 = int(S·(end/duration)), the quotient first as in its
    `crop_a_segment` (S·end/duration rounds to S−1 for many segments ending at the video's end); when i0 == i1
    take one row (the last row if i0 == S). Deliberate change for annotation anomalies: indices are clamped to
    the video, and start ≥ end or start beyond the video still gives one row, never an empty crop or a zero row.
    """
    if n_rows <= 0:
        raise ValueError(f"cannot crop a feature with {n_rows} rows")
    if not duration > 0:
        raise ValueError(f"cannot crop with a non-positive duration {duration}")
    i0 = min(max(int(n_rows * (start / duration)), 0), n_rows - 1)
    i1 = min(max(int(n_rows * (end / duration)), 0), n_rows)
    if i1 <= i0:
        i1 = i0 + 1
    return i0, i1


class FeatureStore(Protocol):
    """Per-video feature rows of one modality: `crop` reads a segment's rows, `rows` a whole video."""

    path: Path
    dim: int

    def video_ids(self) -> set[str]: ...

    def rows(self, video_id: str) -> np.ndarray: ...

    def crop(self, video_id: str, start: float, end: float, duration: float) -> np.ndarray: ...

    def n_rows(self, video_id: str) -> int: ...


def open_feature_store(path: str | Path, modality: str, dim: int) -> FeatureStore:
    """A directory of `.npy` files or a packed `.h5` file, chosen by the path."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    path = Path(path)
    if path.suffix.lower() in H5_SUFFIXES:
        if not path.is_file():
            raise InputError(f"{path}: packed {modality} feature file not found")
        return H5Store(path, modality, dim)
    if path.is_file():
        raise InputError(
            f"{path}: a file, but {modality} features are a directory of .npy files or a packed file named "
            f"{' or '.join(H5_SUFFIXES)}"
        )
    if not path.is_dir():
        raise InputError(
            f"{path}: {modality} feature directory not found (./download_data.sh fetches the I3D and VGGish features; or give a packed .h5 file)"
        )
    return NpyVideoStore(path, dim) if modality == "video" else NpyAudioStore(path, dim)


def check_features(array: np.ndarray, dim: int, source: str) -> np.ndarray:
    """Reject a feature array that is not (T ≥ 1, dim) or holds NaN/inf; `source` names the file/id."""
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != dim:
        raise InputError(f"{source}: expected a (T, {dim}) feature array with T ≥ 1, got shape {array.shape}")
    if not np.isfinite(array).all():
        bad_row = int(np.argwhere(~np.isfinite(array))[0, 0])
        raise InputError(f"{source}: non-finite values (NaN/inf), first in row {bad_row}")
    return array


def load_npy(path: Path, dim: int) -> np.ndarray:
    """np.load with a clear error for a missing, truncated or malformed file."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: feature file not found") from None
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: unreadable .npy file (truncated or corrupt?): {e}") from None
    return check_features(np.asarray(array, dtype=np.float32), dim, str(path))


def npy_rows(path: Path) -> int:
    """The number of rows of a `.npy` file, from its header alone."""
    try:
        return len(np.load(path, mmap_mode="r", allow_pickle=False))
    except (ValueError, OSError, EOFError, TypeError) as e:
        raise InputError(f"{path}: unreadable .npy file (truncated or corrupt?): {e}") from None


class NpyStore:
    """A directory of `.npy` files, one video's rows per read (`rows` in the subclass); a crop slices them."""

    def __init__(self, path: Path, dim: int):
        self.path, self.dim = Path(path), dim

    def rows(self, video_id: str) -> np.ndarray:
        raise NotImplementedError

    def crop(self, video_id: str, start: float, end: float, duration: float) -> np.ndarray:
        rows = self.rows(video_id)
        i0, i1 = crop_indices(len(rows), start, end, duration)
        return rows[i0:i1]


class NpyVideoStore(NpyStore):
    """The original I3D layout: `<vid>_rgb.npy` and `<vid>_flow.npy` of equal shape; V = rgb + flow."""

    def video_ids(self) -> set[str]:
        names = set(os.listdir(self.path))
        return {
            n[: -len("_rgb.npy")] for n in names if n.endswith("_rgb.npy") and n[:-8] + "_flow.npy" in names
        }

    def rows(self, video_id: str) -> np.ndarray:
        rgb = load_npy(self.path / f"{video_id}_rgb.npy", self.dim)
        flow = load_npy(self.path / f"{video_id}_flow.npy", self.dim)
        if rgb.shape != flow.shape:
            raise InputError(f"{self.path}: {video_id} rgb {rgb.shape} and flow {flow.shape} shapes differ")
        return rgb + flow

    def n_rows(self, video_id: str) -> int:
        return npy_rows(self.path / f"{video_id}_rgb.npy")


class NpyAudioStore(NpyStore):
    """The original VGGish layout: `<vid>.npy`."""

    def video_ids(self) -> set[str]:
        return {n[:-4] for n in os.listdir(self.path) if n.endswith(".npy")}

    def rows(self, video_id: str) -> np.ndarray:
        return load_npy(self.path / f"{video_id}.npy", self.dim)

    def n_rows(self, video_id: str) -> int:
        return npy_rows(self.path / f"{video_id}.npy")


class H5Store:
    """A packed HDF5 file. Its `features` dataset is stored contiguously and uncompressed, so it is read
    through a NumPy memory map of the file: a crop is a plain slice (no HDF5 call per read), and pages are
    shared between DataLoader workers. The map is opened lazily in each process."""

    def __init__(self, path: Path, modality: str, dim: int):
        self.path, self.modality, self.dim = Path(path), modality, dim
        self._features_map: np.ndarray | None = None
        self._pid: int | None = None
        with h5py.File(self.path, "r") as f:
            self._index = self._read_index(f)
            self._offset, self._shape = f["features"].id.get_offset(), f["features"].shape
        if self._offset is None:
            raise InputError(
                f"{self.path}: features are not stored contiguously; repack with --procedure pack_features"
            )

    def _read_index(self, f: h5py.File) -> dict[str, tuple[int, int]]:
        if f.attrs.get("format") != PACK_FORMAT or not {"features", "video_ids", "offsets"} <= set(f):
            raise InputError(
                f"{self.path}: not a packed feature file (write one with --procedure pack_features)"
            )
        if f.attrs.get("modality") != self.modality:
            raise InputError(
                f"{self.path}: holds {f.attrs.get('modality')} features, but {self.modality} expected"
            )
        if f["features"].shape[1] != self.dim:
            raise InputError(f"{self.path}: features are {f['features'].shape[1]}-d, expected {self.dim}")
        ids = [v.decode() if isinstance(v, bytes) else str(v) for v in f["video_ids"][()]]
        offsets = f["offsets"][()]
        return {vid: (int(offsets[i]), int(offsets[i + 1])) for i, vid in enumerate(ids)}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_features_map": None, "_pid": None}

    def _features(self) -> np.ndarray:
        if self._features_map is None or self._pid != os.getpid():
            self._features_map = np.memmap(self.path, np.float32, "r", offset=self._offset, shape=self._shape)
            self._pid = os.getpid()
        return self._features_map

    def close(self) -> None:
        self._features_map = None

    def video_ids(self) -> set[str]:
        return set(self._index)

    def _span(self, video_id: str) -> tuple[int, int]:
        try:
            return self._index[video_id]
        except KeyError:
            raise InputError(f"{self.path}: no {self.modality} features for video {video_id}") from None

    def n_rows(self, video_id: str) -> int:
        begin, stop = self._span(video_id)
        return stop - begin

    def rows(self, video_id: str) -> np.ndarray:
        begin, stop = self._span(video_id)
        return check_features(self._features()[begin:stop], self.dim, f"{self.path} [{video_id}]")

    def crop(self, video_id: str, start: float, end: float, duration: float) -> np.ndarray:
        begin, stop = self._span(video_id)
        i0, i1 = crop_indices(stop - begin, start, end, duration)
        rows = self._features()[begin + i0 : begin + i1]
        return check_features(rows, self.dim, f"{self.path} [{video_id}]")


def pack_directory(features_dir: str | Path, modality: str, out: str | Path, dim: int) -> int:
    """Pack a directory of `.npy` features into one HDF5 file, verify it, return the number of videos.

    Written to a temporary file and renamed, so an interrupted run never leaves a half-written `out`.
    """
    source = open_feature_store(features_dir, modality, dim)
    if not isinstance(source, NpyStore):
        raise InputError(f"{features_dir}: --features_dir must be a directory of .npy files")
    ids = sorted(source.video_ids())
    if not ids:
        raise InputError(f"{features_dir}: no {modality} .npy features found")
    out = Path(out)
    with atomic_path(out) as tmp:
        lengths = [source.n_rows(video_id) for video_id in ids]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        with h5py.File(tmp, "w") as f:
            f.attrs.update(format=PACK_FORMAT, modality=modality)
            features = f.create_dataset(
                "features", shape=(int(offsets[-1]), dim), dtype=np.float32
            )  # contiguous
            for i, video_id in enumerate(
                progress(ids, desc=f"packing {modality}", total=len(ids), unit="video")
            ):
                rows = source.rows(video_id)
                if len(rows) != lengths[i]:
                    raise InputError(f"{features_dir}: {video_id} changed while it was being packed")
                features[offsets[i] : offsets[i + 1]] = rows
            f.create_dataset("video_ids", data=np.array(ids, dtype=h5py.string_dtype()))
            f.create_dataset("offsets", data=offsets)
        packed = H5Store(tmp, modality, dim)
        try:
            for video_id in progress(ids, desc="verifying", total=len(ids), unit="video"):
                if not np.array_equal(packed.rows(video_id), source.rows(video_id)):
                    raise InputError(
                        f"{out}: verification failed for {video_id}: packed rows differ from the .npy"
                    )
        finally:
            packed.close()
    log.info("packed %d %s videos (%d rows) into %s", len(ids), modality, sum(lengths), out)
    return len(ids)
