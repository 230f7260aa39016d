"""`main.py --procedure predict`: captions for given segments of one video.

    python main.py --procedure predict --rl_pretrained_model_dir DIR [--vocab_path V.json] \\
        --video_features_path VDIR --audio_features_path ADIR --video_id ID --duration SECONDS \\
        --timestamps S1 E1 [S2 E2 ...] [--beam_size 1] --predictions_out OUT.json

The checkpoint is ours (sizes and vocabulary inside) or a released one (`--vocab_path`, paper sizes). Features in
the original layout (`VDIR/ID_rgb.npy` + `VDIR/ID_flow.npy`, `ADIR/ID.npy`; BMT's sample naming
`ADIR/ID_vggish.npy` is accepted too) or packed HDF5 files. Each segment is cropped with the original rule
(`datasets.features.crop_indices`) and decoded on its own (batch size 1, as the original's single-video path),
so greedy decoding gives the original's captions for the same weights. `--duration` must fit the feature rows
(`check_duration`): the crop rule scales the timestamps by it. Output, printed and written to
`--predictions_out`: `[{"start": S, "end": E, "sentence": "..."}]` in the order given.

Without `--timestamps`, the segments are the video's own proposals (BMT's single-video tool):

    python main.py --procedure predict --prop_generator_model_path best_prop_model.pt \
        --video_features_path V --audio_features_path A --video_id ID --duration D --max_prop_per_vid K \
        [--nms_tiou_thresh T] (--proposals_only | --rl_pretrained_model_dir DIR [--vocab_path V]) \
        --predictions_out P.json

writes `[{"start", "end", "proposal_score"}]` (float32 values widened to plain numbers, unrounded) by descending
score, each with its `"sentence"` unless `--proposals_only`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from datasets.captioning.proposals import Video, check_rows, collate_videos
from datasets.features import STRIDE_S, crop_indices, load_npy, open_feature_store
from epoch_loops.captioning.agent_files import load_agents
from epoch_loops.captioning.proposal_files import load_proposal_generator
from epoch_loops.captioning.proposals import video_proposals
from epoch_loops.captioning.train import caption_text, decode
from utilities.config import Config
from utilities.errors import InputError
from utilities.files import write_json_atomic
from utilities.run_dir import RunDir

PREDICTIONS_FILE = "predictions.json"


def predict(cfg: Config, run: RunDir) -> None:
    if cfg.prop_generator_model_path and not cfg.timestamps:
        results = proposals_of_video(cfg)
        segments = [(r["start"], r["end"]) for r in results]
    else:
        segments = requested_segments(cfg)
        results = [{"start": start, "end": end} for start, end in segments]
    if not cfg.proposals_only:
        if not cfg.rl_pretrained_model_dir:
            raise InputError(
                "predict needs --rl_pretrained_model_dir DIR (a checkpoint folder) or --proposals_only"
            )
        for result, sentence in zip(results, caption_segments(cfg, segments), strict=True):
            result["sentence"] = sentence
    if cfg.predictions_out:
        write_json_atomic(cfg.predictions_out, results)
    print(json.dumps(results, indent=2))
    run.write_json(
        PREDICTIONS_FILE, results
    )  # the run folder, as every run's: config.json, train.log, outputs


def caption_segments(cfg: Config, segments: list[tuple[float, float]]) -> list[str]:
    """The agent's caption of each segment, cropped from the whole video and decoded on its own."""
    agents = load_agents(cfg, cfg.rl_pretrained_model_dir, with_value_functions=False)
    agent = agents.agent.to(torch.device(cfg.device)).eval()
    features = {m: full_features(cfg, m, agent.cfg) for m in agent.modalities}
    for modality, rows in features.items():
        check_duration(cfg.duration, modality, len(rows), cfg.video_id)
    sentences = []
    for start, end in segments:
        crops = {}
        for modality, rows in features.items():
            i0, i1 = crop_indices(len(rows), start, end, cfg.duration)
            crops[modality] = torch.tensor(rows[i0:i1], device=cfg.device)[None]
        tokens = decode(agent, crops.get("video"), None, crops.get("audio"), None, cfg)
        sentences.append(caption_text(tokens[0].tolist(), agents.vocab))
    return sentences


def proposals_of_video(cfg: Config) -> list[dict[str, float]]:
    """`--max_prop_per_vid` proposals of `--video_id` from `--prop_generator_model_path`."""
    if not cfg.video_id or cfg.duration is None:
        raise InputError(
            "predict with --prop_generator_model_path needs --video_id ID and --duration SECONDS"
        )
    model, _ = load_proposal_generator(cfg.prop_generator_model_path)
    model = model.to(torch.device(cfg.device)).eval()
    rows = {}
    for modality in ("video", "audio"):
        rows[modality] = check_rows(full_features(cfg, modality, model.cfg), modality, cfg.video_id)
        check_duration(cfg.duration, modality, len(rows[modality]), cfg.video_id)
    video = Video(cfg.video_id, cfg.duration, [])
    batch = collate_videos([video], [rows]).to(cfg.device)
    (top,) = video_proposals(model, batch, cfg.max_prop_per_vid, cfg.nms_tiou_thresh)
    return [{"start": s, "end": e, "proposal_score": p} for s, e, p in top.cpu().tolist()]


def requested_segments(cfg: Config) -> list[tuple[float, float]]:
    """(start, end) pairs from --timestamps, each inside [0, --duration] with start < end."""
    if not cfg.video_id or cfg.duration is None or not cfg.timestamps:
        raise InputError(
            "predict needs --video_id ID, --duration SECONDS and --timestamps S1 E1 [S2 E2 ...] "
            "(or --prop_generator_model_path M.pt to find the segments)"
        )
    if len(cfg.timestamps) % 2:
        raise InputError(f"--timestamps: expected start/end pairs, got {len(cfg.timestamps)} numbers")
    pairs = list(zip(cfg.timestamps[::2], cfg.timestamps[1::2], strict=True))
    for k, (start, end) in enumerate(pairs, 1):
        if not (0 <= start < end <= cfg.duration):
            raise InputError(
                f"--timestamps segment {k} ({start}, {end}) is not inside the video: expected "
                f"0 <= start < end <= --duration {cfg.duration}"
            )
    return pairs


# How far --duration may lie from what the rows imply (rows × stride), in strides: extraction rounds a video's
# last, partial stack or window either way (the sample video of 35.155 s has 14 I3D rows = 35.84 s and 36
# VGGish rows = 34.56 s), so one stride is the rounding and the second a margin for frame-rate resampling.
DURATION_TOLERANCE_STRIDES = 2


def check_duration(duration: float, modality: str, n_rows: int, video_id: str) -> None:
    """Refuse a --duration that the video's feature rows contradict: crops would take the wrong rows (a
    duration in minutes, or the features of another video) and still give plausible captions."""
    stride = STRIDE_S[modality]
    implied = n_rows * stride
    if abs(implied - duration) > DURATION_TOLERANCE_STRIDES * stride:
        raise InputError(
            f"--duration {duration} s does not fit the {modality} features of {video_id}: {n_rows} rows of "
            f"{stride:.2f} s imply {implied:.2f} s (allowed: within {DURATION_TOLERANCE_STRIDES} rows, "
            f"{DURATION_TOLERANCE_STRIDES * stride:.2f} s); give the video's duration in seconds"
        )


def full_features(cfg: Config, modality: str, sizes) -> np.ndarray:
    """All feature rows of `--video_id` for one modality (video = rgb + flow), from a directory or an .h5;
    `sizes` has the feature widths (`d_vid`, `d_aud`) of the model that reads them."""
    if modality == "video":
        return open_feature_store(cfg.video_features_path, "video", sizes.d_vid).rows(cfg.video_id)
    folder = Path(cfg.audio_features_path)
    sample_name = folder / f"{cfg.video_id}_vggish.npy"
    if folder.is_dir() and not (folder / f"{cfg.video_id}.npy").is_file() and sample_name.is_file():
        return load_npy(sample_name, sizes.d_aud)
    return open_feature_store(folder, "audio", sizes.d_aud).rows(cfg.video_id)
