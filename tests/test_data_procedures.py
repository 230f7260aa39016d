"""`--procedure data_summary` and `--procedure pack_features` through main.py."""

from __future__ import annotations

import json

import numpy as np

from datasets.captioning.activitynet import read_captions_csv
from datasets.features import open_feature_store
from main import main


def test_data_summary_on_real_annotations(shared_data, tmp_path):
    folder = shared_data / "activitynet"
    audio = tmp_path / "vggish"
    audio.mkdir()
    train_ids = read_captions_csv(folder / "train.csv").video_ids
    for vid in train_ids[:50]:
        np.save(audio / f"{vid}.npy", np.ones((4, 128), dtype=np.float32))
    metrics = tmp_path / "summary.json"
    argv = ["--procedure", "data_summary", "--log_dir", str(tmp_path / "log"), "--metrics_out", str(metrics)]
    argv += [f"--{n}_meta_path={folder / f'{n}.csv'}" for n in ("train", "val_1", "val_2")]
    argv += ["--modality", "audio", "--audio_features_path", str(audio)]
    assert main(argv) == 0
    summary = json.loads(metrics.read_text())
    expected = {
        "train_segments": 34171,
        "train_videos": 9167,
        "val_1_segments": 15921,
        "val_2_segments": 15505,
        "train_start_ge_end": 4,
        "train_end_gt_duration": 239,
        "val_1_end_gt_duration": 122,
        "val_2_end_gt_duration": 102,
        "train_videos_missing_features": 9167 - 50,
        "audio_features_checked": True,
    }
    assert {k: summary[k] for k in expected} == expected
    assert abs(summary["vocabulary_size"] - 10172) <= 3
    # val_1 and val_2 share their videos with each other, not with train
    assert summary["videos_missing_features"] == 9167 - 50 + summary["val_1_videos_missing_features"] + len(
        set(read_captions_csv(folder / "val_2.csv").video_ids)
        - set(read_captions_csv(folder / "val_1.csv").video_ids)
    )


def test_pack_features_procedure(tmp_path, capsys):
    folder = tmp_path / "vggish"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {f"v_{i}": rng.random((5 + i, 128), dtype=np.float32) for i in range(3)}
    for vid, array in arrays.items():
        np.save(folder / f"{vid}.npy", array)
    out = tmp_path / "audio.h5"
    base = ["--procedure", "pack_features", "--log_dir", str(tmp_path / "log"), "--features_dir", str(folder)]
    assert main([*base, "--modality", "audio", "--out", str(out), "--exp_name", "a"]) == 0
    store = open_feature_store(out, "audio", 128)
    for vid, array in arrays.items():
        np.testing.assert_array_equal(store.rows(vid), array)
    assert main([*base, "--out", str(out), "--exp_name", "b"]) == 2  # --modality audio_video
    assert "packs one modality" in capsys.readouterr().err
    audio = [*base, "--modality", "audio"]
    assert main([*audio, "--out", str(tmp_path / "audio.npy"), "--exp_name", "c"]) == 2
    assert "name the packed file with one of .h5" in capsys.readouterr().err
    assert main([*audio, "--out", str(tmp_path / "no" / "audio.h5"), "--exp_name", "d"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "log" / "pack_features").iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio.h5", "log", "vggish"]


def test_pack_features_keeps_an_existing_out_unless_overwrite(tmp_path, capsys):
    folder = tmp_path / "vggish"
    folder.mkdir()
    for i in range(2):
        np.save(folder / f"v_{i}.npy", np.full((3, 128), i, dtype=np.float32))
    out = tmp_path / "audio.h5"
    out.write_bytes(b"an earlier pack")
    base = ["--procedure", "pack_features", "--log_dir", str(tmp_path / "log"), "--features_dir", str(folder)]
    base += ["--modality", "audio", "--out", str(out)]
    assert main([*base, "--exp_name", "a"]) == 2
    assert capsys.readouterr().err == (
        f"main.py: error: --out {out} already exists (give --overwrite to replace it)\n"
    )
    assert out.read_bytes() == b"an earlier pack"
    assert main([*base, "--exp_name", "b", "--overwrite"]) == 0
    assert f"packed 2 videos into {out}" in capsys.readouterr().out
    np.testing.assert_array_equal(open_feature_store(out, "audio", 128).rows("v_1"), np.ones((3, 128)))
