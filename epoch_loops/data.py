"""Data procedures: `data_summary` (check the data before a long run) and `pack_features` (directory → HDF5)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from datasets.captioning.activitynet import missing_videos, read_captions_csv
from datasets.features import H5_SUFFIXES, open_feature_store, pack_directory
from datasets.vocabulary import vocabulary_from_config
from utilities.config import Config
from utilities.errors import InputError
from utilities.run_dir import RunDir

log = logging.getLogger(__name__)


def data_summary(cfg: Config, run: RunDir) -> None:
    """Counts of segments/videos, anomalies, the vocabulary size and, where the feature paths exist, the
    videos whose features are missing. Printed, written to the run as data_summary.json and to --metrics_out.

    The feature paths have defaults, so a path that does not exist is reported (`features_checked`) rather
    than treated as an error: the summary is useful before the features are downloaded.
    """
    splits = {"train": cfg.train_meta_path, "val_1": cfg.val_1_meta_path, "val_2": cfg.val_2_meta_path}
    annotations = {name: read_captions_csv(path) for name, path in splits.items()}
    summary: dict = {}
    for name, a in annotations.items():
        summary[f"{name}_segments"] = len(a.segments)
        summary[f"{name}_videos"] = len(a.video_ids)
        for kind, count in a.anomalies.as_dict().items():
            summary[f"{name}_{kind}"] = count
    vocab = vocabulary_from_config(cfg, [s.caption for s in annotations["train"].segments])
    summary["vocabulary_size"] = len(vocab)
    summary["vocabulary_source"] = cfg.vocab_path or f"built from {cfg.train_meta_path}"

    feature_paths = {
        "video": (cfg.video_features_path, cfg.d_vid),
        "audio": (cfg.audio_features_path, cfg.d_aud),
    }
    stores = {}
    for modality, (path, dim) in feature_paths.items():
        if modality not in cfg.modality:
            continue
        if Path(path).exists():
            stores[modality] = open_feature_store(path, modality, dim)
        else:
            log.warning("%s features not found at %s: not checked", modality, path)
        summary[f"{modality}_features_checked"] = modality in stores
    if stores:
        all_missing = set()
        for name, a in annotations.items():
            missing = set().union(*missing_videos(a.video_ids, stores).values())
            all_missing |= missing
            summary[f"{name}_videos_missing_features"] = len(missing)
            summary[f"{name}_segments_missing_features"] = sum(s.video_id in missing for s in a.segments)
        summary["videos_missing_features"] = len(all_missing)

    print(json.dumps(summary, indent=2))
    run.write_metrics("data_summary.json", summary, cfg.metrics_out)


def pack_features(cfg: Config, run: RunDir) -> None:
    """`--features_dir DIR --modality {video,audio} --out FILE.h5`: pack, verify, record what was packed. An
    existing `--out` is replaced only with `--overwrite` (packing a real split takes minutes)."""
    if not cfg.features_dir or not cfg.out:
        raise InputError("pack_features needs --features_dir DIR and --out FILE.h5")
    if cfg.modality not in ("video", "audio"):
        raise InputError(
            f"pack_features packs one modality: give --modality video or audio (got {cfg.modality})"
        )
    out = Path(cfg.out)
    if out.suffix.lower() not in H5_SUFFIXES:
        raise InputError(f"--out {out}: name the packed file with one of {', '.join(H5_SUFFIXES)}")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist")
    if out.exists() and not cfg.overwrite:
        raise InputError(f"--out {out} already exists (give --overwrite to replace it)")
    dim = cfg.d_vid if cfg.modality == "video" else cfg.d_aud
    n_videos = pack_directory(cfg.features_dir, cfg.modality, cfg.out, dim)
    run.write_json(
        "pack_features.json",
        {"features_dir": cfg.features_dir, "modality": cfg.modality, "out": cfg.out, "videos": n_videos},
    )
    print(f"packed {n_videos} videos into {out}")
