"""Feature stores and cropping: the spec's index rule (hand-computed), the real sample features, bad files."""

from __future__ import annotations

import pickle
import shutil

import h5py
import numpy as np
import pytest

from datasets.captioning.activitynet import read_captions_csv
from datasets.features import H5Store, crop_indices, open_feature_store, pack_directory
from utilities.errors import InputError

SAMPLE_DURATION = 35.155


@pytest.mark.parametrize(
    ("n_rows", "start", "end", "expected"),
    [
        (14, 0.0, SAMPLE_DURATION, (0, 14)),  # the whole sample video
        (36, 0.0, SAMPLE_DURATION, (0, 36)),
        (14, 10.0, 20.0, (3, 7)),  # int(3.98), int(7.96)
        (14, 9.0, 9.5, (3, 4)),  # i0 == i1 == 3: one row
        (14, SAMPLE_DURATION, SAMPLE_DURATION, (13, 14)),  # i0 == S: the last row
        (14, 20.0, 10.0, (7, 8)),  # start > end (anomaly): one row at i0, never empty
        (14, 30.0, 40.0, (11, 14)),  # end > duration (anomaly): clamped to the video
        (14, 50.0, 60.0, (13, 14)),  # a segment past the video: the last row
    ],
)
def test_crop_indices_follow_the_spec_rule(n_rows, start, end, expected):
    assert crop_indices(n_rows, start, end, SAMPLE_DURATION) == expected


def test_segment_ending_at_the_video_end_keeps_the_last_row():
    # in floating point 12 * 31.65 / 31.65 is 11.999999999999998 but 12 * (31.65 / 31.65) is 12.0
    assert crop_indices(12, 20.0, 31.65, 31.65) == (7, 12)


def original_crop(n_rows: int, start: float, end: float, duration: float) -> tuple[int, int] | None:
    """The original's `crop_a_segment`, written out plainly: quotients first, then truncation; i0 == i1 takes
    one row (the last if i0 == S); the slice clamps i1 to S. None where its slice would be empty."""
    i0, i1 = int(n_rows * (start / duration)), int(n_rows * (end / duration))
    if i0 == i1:
        i0, i1 = (n_rows - 1, n_rows) if i0 == n_rows else (i0, i0 + 1)
    i1 = min(i1, n_rows)
    return (i0, i1) if i0 < i1 else None


def test_crops_of_every_real_train_row_match_the_original(shared_data):
    """Every row of the real train.csv, with the row counts of its I3D (25 fps, 64-frame stacks) and VGGish
    (0.96 s windows) features: the original's indices for well-formed rows; for anomalous rows (start ≥ end,
    end > duration) the same where the original's slice is not empty, and always 1..S rows inside the video."""
    segments = read_captions_csv(shared_data / "activitynet" / "train.csv").segments
    assert len(segments) > 30_000
    for s in segments:
        well_formed = 0 <= s.start < s.end <= s.duration
        for n_rows in {max(1, int(s.duration * 25 / 64)), max(1, int(s.duration / 0.96))}:
            i0, i1 = crop_indices(n_rows, s.start, s.end, s.duration)
            assert 0 <= i0 < i1 <= n_rows, (s, n_rows)
            expected = original_crop(n_rows, s.start, s.end, s.duration)
            if well_formed or expected is not None:
                assert (i0, i1) == expected, (s, n_rows)


def sample_dirs(shared_data, tmp_path):
    """The real sample features in the original directory layout."""
    video, audio = tmp_path / "i3d", tmp_path / "vggish"
    video.mkdir()
    audio.mkdir()
    src = shared_data / "sample_features"
    shutil.copy(src / "women_long_jump_rgb.npy", video / "wlj_rgb.npy")
    shutil.copy(src / "women_long_jump_flow.npy", video / "wlj_flow.npy")
    shutil.copy(src / "women_long_jump_vggish.npy", audio / "wlj.npy")
    return video, audio


def test_real_sample_features_crop_as_the_spec_says(shared_data, tmp_path):
    video_dir, audio_dir = sample_dirs(shared_data, tmp_path)
    video = open_feature_store(video_dir, "video", 1024)
    audio = open_feature_store(audio_dir, "audio", 128)
    rgb = np.load(video_dir / "wlj_rgb.npy")
    flow = np.load(video_dir / "wlj_flow.npy")
    whole = video.crop("wlj", 0.0, SAMPLE_DURATION, SAMPLE_DURATION)
    assert whole.shape == (14, 1024)
    np.testing.assert_array_equal(whole, rgb + flow)
    assert audio.crop("wlj", 0.0, SAMPLE_DURATION, SAMPLE_DURATION).shape == (36, 128)
    np.testing.assert_array_equal(video.crop("wlj", 10.0, 20.0, SAMPLE_DURATION), (rgb + flow)[3:7])
    # audio: int(36·10/35.155) = 10, int(36·20/35.155) = 20
    np.testing.assert_array_equal(
        audio.crop("wlj", 10.0, 20.0, SAMPLE_DURATION), np.load(audio_dir / "wlj.npy")[10:20]
    )


def test_packed_hdf5_gives_the_same_crops_and_forks_without_a_map(shared_data, tmp_path):
    video_dir, audio_dir = sample_dirs(shared_data, tmp_path)
    for modality, folder, dim in (("video", video_dir, 1024), ("audio", audio_dir, 128)):
        out = tmp_path / f"{modality}.h5"
        assert pack_directory(folder, modality, out, dim) == 1
        packed, npy = open_feature_store(out, modality, dim), open_feature_store(folder, modality, dim)
        assert isinstance(packed, H5Store)
        for start, end in ((0.0, SAMPLE_DURATION), (10.0, 20.0), (20.0, 10.0), (30.0, 99.0)):
            np.testing.assert_array_equal(
                packed.crop("wlj", start, end, SAMPLE_DURATION), npy.crop("wlj", start, end, SAMPLE_DURATION)
            )
        clone = pickle.loads(pickle.dumps(packed))  # what a DataLoader worker receives
        assert clone._features_map is None
        np.testing.assert_array_equal(clone.rows("wlj"), npy.rows("wlj"))


def write(path, array):
    np.save(path, np.asarray(array, dtype=np.float32))


def test_truncated_npy_names_the_file(tmp_path):
    write(tmp_path / "v1.npy", np.ones((10, 128)))
    data = (tmp_path / "v1.npy").read_bytes()
    (tmp_path / "v1.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"v1\.npy.*truncated"):
        open_feature_store(tmp_path, "audio", 128).crop("v1", 0, 1, 2)


def test_nan_in_features_names_file_and_row(tmp_path):
    array = np.ones((10, 128))
    array[4, 7] = np.nan
    write(tmp_path / "v1.npy", array)
    with pytest.raises(InputError, match=r"v1\.npy.*row 4"):
        open_feature_store(tmp_path, "audio", 128).rows("v1")


def test_wrong_dimension_and_rgb_flow_mismatch(tmp_path):
    write(tmp_path / "v1.npy", np.ones((10, 64)))
    with pytest.raises(InputError, match=r"v1\.npy.*\(T, 128\)"):
        open_feature_store(tmp_path, "audio", 128).rows("v1")
    write(tmp_path / "v2_rgb.npy", np.ones((5, 16)))
    write(tmp_path / "v2_flow.npy", np.ones((6, 16)))
    with pytest.raises(InputError, match="v2 rgb"):
        open_feature_store(tmp_path, "video", 16).rows("v2")


def test_hdf5_without_the_video_names_file_and_id(tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    write(folder / "v1.npy", np.ones((3, 8)))
    pack_directory(folder, "audio", tmp_path / "a.h5", 8)
    store = open_feature_store(tmp_path / "a.h5", "audio", 8)
    with pytest.raises(InputError, match=r"a\.h5: no audio features for video v_missing"):
        store.crop("v_missing", 0, 1, 2)
    with pytest.raises(InputError, match="holds audio features, but video expected"):
        open_feature_store(tmp_path / "a.h5", "video", 8)


def test_foreign_hdf5_is_rejected(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["v1"] = np.ones((3, 8))
    with pytest.raises(InputError, match="not a packed feature file"):
        open_feature_store(tmp_path / "x.h5", "audio", 8)
