"""`--procedure train_rl_cap` / eval of a checkpoint / predict on a tiny dataset in the real formats: exactly W
warm-start epochs, checkpoint folders in the original key layout, exact resume after kill -9, 1-by-1 validation
files, dry-run counts, NaN and bad-input errors, and predict against direct greedy decoding."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.captioning.activitynet import CSV_COLUMNS, read_captions_csv
from datasets.features import crop_indices, pack_directory
from datasets.vocabulary import Vocabulary
from epoch_loops.captioning import train as captioning
from epoch_loops.captioning.agent_files import (
    AGENT_CONFIG_FILE,
    AGENT_FILE,
    MANAGER_VALUE_FILE,
    TRAINING_FILE,
    WORKER_VALUE_FILE,
    build_agents,
    load_agents,
    save_agents,
)
from epoch_loops.captioning.predict import check_duration
from epoch_loops.captioning.train import caption_text
from main import build_parser, main
from model.captioning.bmhrl import AgentConfig, SegmentCritic, load_original_state_dict
from model.captioning.decoding import greedy_decode
from tests.conftest import REPO, requires_java
from tests.test_bmhrl_model import is_dead, original_agent_shapes
from utilities.config import Config
from utilities.errors import InputError

D_VID, D_AUD = 16, 8
SUBJECTS, VERBS, OBJECTS = ["man", "woman", "dog"], ["throws", "kicks", "carries"], ["ball", "box"]
SIZES = [
    "--d_vid", "16", "--d_aud", "8", "--d_model_caps", "12", "--d_model", "16", "--rl_att_heads", "4",
    "--rl_att_layers", "2", "--rl_ff_v", "20", "--rl_ff_a", "10", "--rl_goal_d", "6", "--dout_p", "0.1",
]  # fmt: skip
VOCAB_DEPENDENT = ("emb_C.embedder.weight", "worker.projection.weight", "worker.projection.bias")


def write_tiny_dataset(root: Path, seed: int = 0) -> dict[str, str]:
    """12 train and 4 + 4 validation segments in the real formats, 16-d video and 8-d audio features."""
    rng = np.random.default_rng(seed)
    video_dir, audio_dir = root / "video", root / "audio"
    video_dir.mkdir(parents=True)
    audio_dir.mkdir()
    splits = {"train": [f"v_train{i}" for i in range(6)], "val": ["v_val0", "v_val1"]}
    rows = {"train": [], "val_1": [], "val_2": []}
    for split, ids in splits.items():
        for vid in ids:
            duration = float(np.round(rng.uniform(20, 40), 2))
            np.save(video_dir / f"{vid}_rgb.npy", rng.normal(size=(10, D_VID)).astype(np.float32))
            np.save(video_dir / f"{vid}_flow.npy", rng.normal(size=(10, D_VID)).astype(np.float32))
            np.save(audio_dir / f"{vid}.npy", rng.random((25, D_AUD)).astype(np.float32))
            for start, end in ((0.0, duration / 2), (duration / 3, duration - 0.5)):
                words = [rng.choice(SUBJECTS), rng.choice(VERBS), "a", rng.choice(OBJECTS)]
                caption = "A " + " ".join(words) + (" and then sits" if rng.random() < 0.5 else "")
                for name in ["train"] if split == "train" else ["val_1", "val_2"]:
                    rows[name].append((vid, caption, round(start, 2), round(end, 2), duration))
    paths = {"video_features_path": str(video_dir), "audio_features_path": str(audio_dir)}
    for name, entries in rows.items():
        path = root / f"{name}.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(CSV_COLUMNS)
            for idx, (vid, caption, start, end, duration) in enumerate(entries):
                writer.writerow([vid, caption, start, end, duration, name, idx])
        paths[f"{name}_meta_path"] = str(path)
        if name != "train":
            reference = {}
            for vid, caption, start, end, duration in entries:
                entry = reference.setdefault(vid, {"duration": duration, "timestamps": [], "sentences": []})
                entry["timestamps"].append([start, end])
                entry["sentences"].append(caption + ".")
            (root / f"{name}_no_missings.json").write_text(json.dumps(reference))
    paths["reference_paths"] = [str(root / "val_1_no_missings.json"), str(root / "val_2_no_missings.json")]
    return paths


def tiny_argv(data: dict, log_dir: Path, exp: str, *extra: str) -> list[str]:
    argv = ["--procedure", "train_rl_cap", "--log_dir", str(log_dir), "--exp_name", exp, *SIZES]
    for key, value in data.items():
        argv += [f"--{key}", *(value if isinstance(value, list) else [value])]
    argv += ["--word_emb_caps", "random", "--segmenter", "heuristic", "--B", "4", "--num_workers", "0"]
    argv += ["--max_len", "8", "--no-progress", "--rl_cap_warmstart_lr", "1e-3"]
    return [*argv, *extra]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory) -> Path:
    """Two warm-start epochs, the second validated: log/train_rl_cap/run."""
    if shutil.which("java") is None:
        pytest.skip("Java is not installed")
    log_dir = tmp_path_factory.mktemp("log")
    argv = tiny_argv(tiny_data, log_dir, "run", "--rl_warmstart_epochs", "2", "--epoch_num", "2")
    assert main([*argv, "--one_by_one_starts_at", "1"]) == 0
    return log_dir / "train_rl_cap" / "run"


@requires_java
def test_warm_start_runs_exactly_w_epochs_and_validates_both_splits(trained_run, tiny_data):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert [r["phase"] for r in metrics["history"]] == ["warm_start", "warm_start"]
    assert "val" not in metrics["history"][0] and metrics["best_epoch"] == 1
    val = metrics["history"][1]["val"]
    assert set(val) == {"val_1", "val_2", "mean"}
    assert val["mean"]["METEOR"] == pytest.approx((val["val_1"]["METEOR"] + val["val_2"]["METEOR"]) / 2)
    assert val["val_1"]["Recall"] == 1.0  # every ground-truth segment captioned
    assert sorted(p.name for p in (trained_run / "checkpoints").iterdir()) == ["E_1", "last"]
    state = torch.load(trained_run / "checkpoints" / "last" / TRAINING_FILE, weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 2 * math.ceil(12 / 4)

    segments = read_captions_csv(tiny_data["val_1_meta_path"]).segments
    results = json.loads((trained_run / "captioning_results_val_1_e1.json").read_text())["results"]
    assert list(results) == list(dict.fromkeys(s.video_id for s in segments))
    written = [(vid, p["timestamp"]) for vid, predictions in results.items() for p in predictions]
    assert written == [(s.video_id, [s.start, s.end]) for s in segments]  # file order, exact CSV values
    for p in (p for predictions in results.values() for p in predictions):
        assert not {"<unk>", "<s>", "</s>", "<blank>"} & set(p["sentence"].lower().split())
        assert p["sentence"] == p["sentence"].capitalize()


@requires_java
def test_eval_of_a_checkpoint_reproduces_the_validation_of_training(trained_run, tiny_data, tmp_path):
    recorded = json.loads((trained_run / "metrics.json").read_text())["history"][1]["val"]
    checkpoint = str(trained_run / "checkpoints" / "E_1")
    data = {k: v for k, v in tiny_data.items() if k != "train_meta_path"}
    for procedure, extra in (("eval", ["--task", "captioning"]), ("train_rl_cap", ["--mode", "eval"])):
        argv = tiny_argv(data, tmp_path, "run", "--rl_pretrained_model_dir", checkpoint, *extra)
        argv[1] = procedure
        assert main(argv) == 0
        out = tmp_path / procedure / "run"
        assert json.loads((out / "metrics.json").read_text()) == recorded
        assert (out / "captioning_results_val_2_eval.json").is_file()


@requires_java  # train_rl_cap starts the run's METEOR process first
def test_checkpoint_holds_the_original_keys_minus_the_dead_ones_and_loads_back(tiny_data, tmp_path):
    critic_path = tmp_path / "critic.cp"
    torch.save(SegmentCritic(12).state_dict(), critic_path)
    argv = tiny_argv(tiny_data, tmp_path, "critic", "--rl_warmstart_epochs", "1", "--epoch_num", "1")
    argv += ["--segmenter", "critic", "--rl_critic_path", str(critic_path), "--one_by_one_starts_at", "5"]
    assert main(argv) == 0
    folder = tmp_path / "train_rl_cap" / "critic" / "checkpoints" / "last"
    saved = torch.load(folder / AGENT_FILE, weights_only=True)
    expected = {k: s for k, s in original_agent_shapes().items() if not is_dead(k)}
    assert set(saved) == set(expected)
    assert {k: tuple(v.shape) for k, v in saved.items() if k not in VOCAB_DEPENDENT} == {
        k: s for k, s in expected.items() if k not in VOCAB_DEPENDENT
    }
    assert torch.equal(saved["critic.lin.weight"], torch.load(critic_path, weights_only=True)["lin.weight"])

    vocab = Vocabulary.load(folder / "vocabulary.json")
    config = AgentConfig(**json.loads((folder / "agent_config.json").read_text()))
    fresh = build_agents(config, vocab)
    assert load_original_state_dict(fresh.agent, saved, "ours") == []
    for module, name in ((fresh.worker_value, WORKER_VALUE_FILE), (fresh.manager_value, MANAGER_VALUE_FILE)):
        load_original_state_dict(module, torch.load(folder / name, weights_only=True), name)
    assert all(torch.equal(v, fresh.agent.state_dict()[k]) for k, v in saved.items())


def test_dry_run_needs_only_the_annotations_and_counts_paper_size(shared_data, tmp_path, capsys):
    argv = [
        "--procedure",
        "train_rl_cap",
        "--dry_run",
        "--log_dir",
        str(tmp_path),
        "--word_emb_caps",
        "random",
    ]
    argv += ["--train_meta_path", str(shared_data / "activitynet" / "train.csv"), "--epoch_num", "1"]
    argv += [
        "--video_features_path",
        str(tmp_path / "absent"),
        "--audio_features_path",
        str(tmp_path / "absent"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    n = int(out.split("trainable parameters: ")[1].split()[0])
    v = int(out.split("vocabulary size: ")[1].split()[0])
    assert 10_000 < v < 10_300 and n == 43_467_124 + 365 * v
    assert not (tmp_path / "train_rl_cap").exists()  # a dry run writes nothing


@requires_java  # train_rl_cap starts the run's METEOR process first
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(
    tiny_data, tmp_path, capsys, monkeypatch
):
    calls = []
    real = captioning.label_smoothing_loss

    def nan_in_epoch_1(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss  # epoch 1 (3 batches an epoch), batch 1

    monkeypatch.setattr(captioning, "label_smoothing_loss", nan_in_epoch_1)
    argv = tiny_argv(tiny_data, tmp_path, "nan", "--rl_warmstart_epochs", "2", "--epoch_num", "2")
    assert main([*argv, "--one_by_one_starts_at", "5"]) == 2
    err = capsys.readouterr().err
    last = tmp_path / "train_rl_cap" / "nan" / "checkpoints" / "last"
    assert err.count("\n") == 1 and "non-finite loss (nan) at optimiser step 5 (epoch 1, batch 1" in err
    assert f"last good checkpoint is {last}" in err
    state = torch.load(last / TRAINING_FILE, weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 3
    agent = torch.load(last / AGENT_FILE, weights_only=True)
    assert all(torch.isfinite(v).all() for v in agent.values())


@requires_java  # train_rl_cap starts the run's METEOR process first
def test_an_error_in_a_loader_worker_is_the_same_one_line_as_without_workers(tmp_path, capsys):
    data = write_tiny_dataset(tmp_path / "data")
    rgb = Path(data["video_features_path"]) / "v_train3_rgb.npy"
    features = np.load(rgb)
    features[4, 0] = np.nan  # read lazily: found by the worker that crops this video
    np.save(rgb, features)
    errors = {}
    for workers in ("0", "2"):
        argv = tiny_argv(
            data, tmp_path / "log", f"w{workers}", "--rl_warmstart_epochs", "1", "--epoch_num", "1"
        )
        assert main([*argv, "--one_by_one_starts_at", "5", "--num_workers", workers]) == 2
        errors[workers] = capsys.readouterr().err
    assert (
        errors["2"] == errors["0"] == f"main.py: error: {rgb}: non-finite values (NaN/inf), first in row 4\n"
    )


@pytest.mark.slow
@requires_java
def test_resume_after_kill_9_equals_the_uninterrupted_run(tiny_data, tmp_path):
    """Three warm-start epochs, the last validated; one run is killed (SIGKILL) after its first
    checkpoint and resumed from it. Same final weights, optimiser state and metrics."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    base = tiny_argv(tiny_data, tmp_path, "x", "--rl_warmstart_epochs", "3", "--epoch_num", "3")
    base += ["--one_by_one_starts_at", "2", "--dout_p", "0.3"]

    def command(exp: str, *extra: str) -> list[str]:
        argv = list(base)
        argv[argv.index("--exp_name") + 1] = exp
        return [sys.executable, str(REPO / "main.py"), *argv, *extra]

    full = subprocess.Popen(command("full"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = subprocess.Popen(command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = tmp_path / "train_rl_cap" / "killed" / "checkpoints" / "last"
    deadline = time.monotonic() + 120
    while not last.is_dir() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run must be killed before it finished"
    epochs_done = torch.load(last / TRAINING_FILE, weights_only=True)["epoch"]
    assert epochs_done < 3
    resumed = subprocess.run(
        command("killed", "--resume", str(last)), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert full.wait() == 0, full.stderr.read()

    runs = tmp_path / "train_rl_cap"
    a, b = (runs / name / "checkpoints" / "last" for name in ("full", "killed"))
    for name in (AGENT_FILE, WORKER_VALUE_FILE, MANAGER_VALUE_FILE):
        wa, wb = torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (torch.load(p / TRAINING_FILE, weights_only=True) for p in (a, b))
    assert sa["step"] == sb["step"] and sa["epoch"] == sb["epoch"] == 3
    moments = [s["optimizer"]["state"] for s in (sa, sb)]
    assert all(torch.equal(moments[0][k]["exp_avg"], moments[1][k]["exp_avg"]) for k in moments[0])

    def without_times(path):
        metrics = json.loads(path.read_text())
        for record in metrics["history"]:
            record.pop("seconds")
        return metrics

    assert without_times(runs / "full" / "metrics.json") == without_times(runs / "killed" / "metrics.json")
    assert (runs / "killed" / "captioning_results_val_1_e2.json").read_text() == (
        runs / "full" / "captioning_results_val_1_e2.json"
    ).read_text()


# ---- predict --------------------------------------------------------------------------------------------------

PREDICT_SIZES = AgentConfig(
    d_vid=1024, d_aud=128, d_model_caps=12, d_model=16, rl_att_heads=4, rl_att_layers=1, rl_ff_v=20, rl_ff_a=10,
    rl_goal_d=6, dout_p=0.1, segmenter="critic",
)  # fmt: skip
RELEASED_SIZES = ["--d_model_caps", "12", "--d_model", "16", "--rl_att_layers", "1", "--rl_ff_v", "20",
                  "--rl_ff_a", "10", "--rl_goal_d", "6"]  # fmt: skip
WORDS = ["a", "man", "woman", "runs", "jumps", "down", "track", "the", "into", "sand", "and", "crowd", "."]


def sample_checkpoint(folder: Path, specials=("<unk>", "<blank>", "<s>", "</s>")) -> tuple:
    torch.manual_seed(3)
    vocab = Vocabulary([*specials, *WORDS])
    agents = build_agents(PREDICT_SIZES, vocab, torch.randn(len(vocab), 12))
    with torch.no_grad():  # random weights, but captions of a few words
        agents.agent.worker.projection.bias[vocab.end_idx] = 0.0
    save_agents(folder, agents)
    return agents


def direct_captions(agents, sample: Path, segments, duration: float) -> list[str]:
    video = np.load(sample / "women_long_jump_rgb.npy") + np.load(sample / "women_long_jump_flow.npy")
    audio = np.load(sample / "women_long_jump_vggish.npy")
    agent = agents.agent.eval()
    sentences = []
    for start, end in segments:
        crops = []
        for rows in (video, audio):
            i0, i1 = crop_indices(len(rows), start, end, duration)
            crops.append(torch.from_numpy(rows[i0:i1])[None])
        tokens = greedy_decode(agent, crops[0], None, crops[1], None, max_len=30)
        sentences.append(caption_text(tokens[0].tolist(), agents.vocab))
    return sentences


def predict_argv(checkpoint, video_dir, audio_dir, out, *extra) -> list[str]:
    return [
        "--procedure", "predict", "--rl_pretrained_model_dir", str(checkpoint), "--video_features_path",
        str(video_dir), "--audio_features_path", str(audio_dir), "--video_id", "women_long_jump", "--duration",
        "35.155", "--timestamps", "0.1", "4.9", "19.6", "33.3", "0.6", "35.1", "--predictions_out", str(out),
        "--log_dir", str(Path(out).parent / "log"), *extra,
    ]  # fmt: skip


def test_predict_on_the_sample_features_equals_direct_greedy_decoding(shared_data, tmp_path, capsys):
    sample = shared_data / "sample_features"
    agents = sample_checkpoint(tmp_path / "ours")
    segments = [(0.1, 4.9), (19.6, 33.3), (0.6, 35.1)]
    expected = [
        {"start": s, "end": e, "sentence": c}
        for (s, e), c in zip(segments, direct_captions(agents, sample, segments, 35.155), strict=True)
    ]
    assert any(row["sentence"] for row in expected)
    assert main(predict_argv(tmp_path / "ours", sample, sample, tmp_path / "out.json")) == 0
    assert json.loads((tmp_path / "out.json").read_text()) == expected
    assert json.loads(capsys.readouterr().out) == expected
    (run,) = (tmp_path / "log" / "predict").iterdir()  # a run folder as every procedure's (issue 19)
    assert json.loads((run / "predictions.json").read_text()) == expected
    assert {"config.json", "train.log"} <= {p.name for p in run.iterdir()}

    # packed HDF5 features give the same captions
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    shutil.copy(sample / "women_long_jump_vggish.npy", audio_dir / "women_long_jump.npy")
    pack_directory(sample, "video", tmp_path / "video.h5", 1024)
    pack_directory(audio_dir, "audio", tmp_path / "audio.h5", 128)
    argv = predict_argv(tmp_path / "ours", tmp_path / "video.h5", tmp_path / "audio.h5", tmp_path / "h5.json")
    assert main(argv) == 0
    assert json.loads((tmp_path / "h5.json").read_text()) == expected

    # a released folder: only the three state dicts; vocabulary and sizes from the flags; ' UNK ' as unk
    released = tmp_path / "released"
    released.mkdir()
    for name in (AGENT_FILE, WORKER_VALUE_FILE, MANAGER_VALUE_FILE):
        shutil.copy(tmp_path / "ours" / name, released / name)
    (tmp_path / "itos.txt").write_text("\n".join([" UNK ", "<blank>", "<s>", "</s>", *WORDS]) + "\n")
    argv = predict_argv(released, sample, sample, tmp_path / "released.json", *RELEASED_SIZES)
    assert main([*argv, "--vocab_path", str(tmp_path / "itos.txt")]) == 0
    assert json.loads((tmp_path / "released.json").read_text()) == expected


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--timestamps", "30", "40"], r"segment 1 \(30.0, 40.0\) is not inside the video"),
        (["--timestamps", "1", "2", "3"], "expected start/end pairs"),
        (
            ["--duration", "60"],
            r"--duration 60.0 s does not fit the audio features of women_long_jump: 36 rows of 0.96 s imply "
            r"34.56 s \(allowed: within 2 rows, 1.92 s\)",
        ),
        (["--video_id", "absent"], r"absent(_rgb)?\.npy: feature file not found"),
        (["--rl_pretrained_model_dir", "RELEASED"], "released checkpoint .*--vocab_path"),
        (
            ["--rl_pretrained_model_dir", "RELEASED", "--vocab_path", "SHORT"],
            "vocabulary has 17 tokens.*ours has 5",
        ),
        (["--rl_pretrained_model_dir", "EXTRA_KEY"], r"unexpected keys \(1\): extra\.weight"),
        (
            ["--rl_pretrained_model_dir", "SHAPE", "--vocab_path", "LONG"],
            r"other sizes: it fits --rl_goal_d 7 \(this model: --rl_goal_d 6;",
        ),
    ],
)
def test_predict_bad_input_is_a_one_line_error(shared_data, tmp_path, capsys, change, message):
    """Later flags win over earlier ones, so each case appends its change to a working command line."""
    sample = shared_data / "sample_features"
    sample_checkpoint(tmp_path / "ours")
    for name in ("RELEASED", "EXTRA_KEY", "SHAPE"):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "ours", folder)
        if name != "EXTRA_KEY":
            for ours_only in ("vocabulary.json", "agent_config.json"):
                (folder / ours_only).unlink()
        state = torch.load(folder / AGENT_FILE, weights_only=True)
        if name == "EXTRA_KEY":
            state["extra.weight"] = torch.zeros(1)
        if name == "SHAPE":
            state["manager.linear.weight"] = torch.zeros(7, 12)
        torch.save(state, folder / AGENT_FILE)
    (tmp_path / "SHORT").write_text('["<unk>", "<blank>", "<s>", "</s>", "a"]')
    (tmp_path / "LONG").write_text(json.dumps(["<unk>", "<blank>", "<s>", "</s>", *WORDS]))
    change = [str(tmp_path / c) if c.isupper() else c for c in change]
    argv = predict_argv(tmp_path / "ours", sample, sample, tmp_path / "out.json", *RELEASED_SIZES, *change)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("main.py: error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize(
    ("modality", "rows", "duration", "fits"),
    [
        ("video", 14, 35.155, True),  # the sample video: 14 I3D rows = 35.84 s
        ("audio", 36, 35.155, True),  # and 36 VGGish rows = 34.56 s
        ("video", 14, 30.73, True),  # 35.84 - 2 x 2.56 = 30.72
        ("video", 14, 30.70, False),
        ("audio", 36, 36.47, True),  # 34.56 + 2 x 0.96 = 36.48
        ("audio", 36, 36.50, False),
        ("video", 14, 35.155 * 60, False),  # minutes taken for seconds
    ],
)
def test_predict_duration_must_fit_the_feature_rows_within_two_strides(modality, rows, duration, fits):
    if fits:
        check_duration(duration, modality, rows, "v")
    else:
        with pytest.raises(
            InputError, match=f"--duration {duration} s does not fit the {modality} features of v"
        ):
            check_duration(duration, modality, rows, "v")


@requires_java
@pytest.mark.parametrize("mode", ["AHRL", "VHRL", "BM"])
def test_ablations_train_and_save_their_own_layout(tiny_data, tmp_path, mode):
    argv = tiny_argv(
        tiny_data, tmp_path, mode, "--mode", mode, "--rl_warmstart_epochs", "1", "--epoch_num", "1"
    )
    assert main([*argv, "--one_by_one_starts_at", "5"]) == 0
    folder = tmp_path / "train_rl_cap" / mode / "checkpoints" / "last"
    keys = set(torch.load(folder / AGENT_FILE, weights_only=True))
    assert any(k.startswith({"AHRL": "a_enc.", "VHRL": "v_enc.", "BM": "projection."}[mode]) for k in keys)
    assert json.loads((folder / "agent_config.json").read_text())["mode"] == mode
    with pytest.raises(InputError, match=f"holds a {mode} agent but --mode is BMHRL"):
        captioning.train(
            Config(**{**vars(build_parser().parse_args(argv)), "mode": "BMHRL", "resume": str(folder)}), None
        )


def test_optimiser_groups_cover_the_agent_and_a_frozen_group_stays_bit_identical(tiny_data, tmp_path):
    """One named parameter group per module group; after warm-start steps (Adam moments everywhere), a step in
    the worker phase leaves the manager's parameters exactly as they were."""
    cfg = Config(
        **vars(
            build_parser().parse_args(tiny_argv(tiny_data, tmp_path, "g", "--rl_value_function_lr", "3e-4"))
        )
    )
    cfg.device = "cpu"
    vocab = Vocabulary(["<unk>", "<blank>", "<s>", "</s>", "a", "man", "and"])
    agents = captioning.new_agents(cfg, vocab)
    trainer = captioning.Trainer.create(cfg, agents, None, None)
    agent = agents.agent
    agent.set_phase("warm_start")
    grouped = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len({id(p) for p in grouped}) == len(grouped)
    trainable = {id(p) for p in agent.parameters() if p.requires_grad}
    assert {id(p) for g in trainer.optimizer.param_groups[:2] for p in g["params"]} == trainable
    names = [g["name"] for g in trainer.optimizer.param_groups]
    assert names == ["worker", "manager", "worker_value_function", "manager_value_function"]
    assert trainer.group("manager_value_function")["lr"] == 3e-4 and trainer.agent_lr() == 1e-3

    g = torch.Generator().manual_seed(0)
    video, audio = torch.randn(2, 5, D_VID, generator=g), torch.rand(2, 7, D_AUD, generator=g)
    captions = torch.tensor([[2, 5, 6, 4, 3], [2, 4, 3, 1, 1]])

    def step():
        out = agent(video, None, audio, None, captions[:, :-1])
        loss = captioning.label_smoothing_loss(out.log_probs, captions[:, 1:], 1, 0.7)
        trainer.optimiser_step(loss, 0, 0, None)

    agent.train()
    step()
    step()
    agent.set_phase("worker")
    manager = {
        k: v.clone() for k, v in agent.state_dict().items() if k.startswith(("manager.", "bm_manager_fus."))
    }
    worker_before = agent.worker.projection.weight.clone()
    step()
    assert all(torch.equal(v, agent.state_dict()[k]) for k, v in manager.items())
    assert not torch.equal(worker_before, agent.worker.projection.weight)


@requires_java  # train_rl_cap starts the run's METEOR process first
def test_resume_continues_with_the_runs_objective_and_may_raise_epoch_num(tiny_data, tmp_path, capsys):
    """A biased_kl run resumed with `--resume` alone (and a raised --epoch_num: a constant learning rate has
    no schedule to re-shape) goes on as biased_kl, not as the default scst; another objective is refused."""
    argv = tiny_argv(tiny_data, tmp_path, "kl", "--rl_objective", "biased_kl", "--rl_reward", "cider")
    assert main([*argv, "--rl_warmstart_epochs", "1", "--epoch_num", "2", "--one_by_one_starts_at", "5"]) == 0
    last = tmp_path / "train_rl_cap" / "kl" / "checkpoints" / "last"
    resume = ["--procedure", "train_rl_cap", "--resume", str(last), "--num_workers", "0", "--no-progress"]
    assert main([*resume, "--rl_objective", "scst"]) == 2
    err = capsys.readouterr().err
    assert f"--resume {last}: --rl_objective scst differs from the run's biased_kl" in err
    assert main([*resume, "--epoch_num", "3"]) == 0
    history = json.loads((tmp_path / "train_rl_cap" / "kl" / "metrics.json").read_text())["history"]
    assert [r["phase"] for r in history] == ["warm_start", "worker", "manager"]
    assert "amplitude" in history[2]["train"]  # biased_kl's statistic


def test_goal_timing_is_saved_with_the_agent_and_older_folders_load_as_original(tmp_path):
    vocab = Vocabulary(["<unk>", "<blank>", "<s>", "</s>", "a", ","])
    small = dict(
        d_model_caps=8, d_model=8, rl_ff_v=8, rl_ff_a=8, rl_goal_d=4, rl_att_layers=1, d_vid=4, d_aud=4
    )
    cfg = AgentConfig(segmenter="heuristic", goal_timing="aligned", **small)
    folder = save_agents(tmp_path / "ours", build_agents(cfg, vocab))
    run_cfg = Config(**vars(build_parser().parse_args(["--procedure", "predict"])))
    assert load_agents(run_cfg, folder).agent.cfg.goal_timing == "aligned"
    saved = json.loads((folder / AGENT_CONFIG_FILE).read_text())
    del saved["goal_timing"]
    (folder / AGENT_CONFIG_FILE).write_text(json.dumps(saved))
    assert load_agents(run_cfg, folder).agent.cfg.goal_timing == "original"
