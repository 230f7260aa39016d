"""`--procedure train_critic`: the segment critic trained on heuristic-labelled CSV captions or per-word JSON
labels, written in the original critic.cp layout that the agent's critic loads, with held-out boundary P/R/F1."""

from __future__ import annotations

import json

import pytest
import torch

from datasets.captioning.segment_labels import read_seg_labels_json
from epoch_loops.captioning.critic import BoundaryCounts, heuristic_labels, masked_bce, trivial_baselines
from main import main
from model.captioning.bmhrl import SegmentCritic, load_original_state_dict
from utilities.checkpoint import load_checkpoint

HEADER = "video_id\tcaption\tstart\tend\tduration\tphase\tidx\n"
CAPTIONS = [
    "A man walks in, and then sits down.",
    "A woman is dancing in a room while the camera pans around",
    "The boy jumps into the pool and swims to the side",
    "People are riding bikes down a street",
    "He picks up a ball, throws it and smiles",
    "A girl plays the violin on a stage",
    "The man mixes paint in a bucket before painting the wall",
    "Two dogs run in the yard",
]
SMALL = ["--d_model_caps", "16", "--B", "4", "--critic_lr", "0.01"]  # a tiny critic: test config only

# critic.cp as the original writes it: LSTM(300→600, 4 layers), GRU(600→600, 2 layers), Linear(600→1)
# and the two AReLUs' scalars.
ORIGINAL_CRITIC_SHAPES = {
    **{
        f"lstm.{kind}_l{layer}": shape
        for layer in range(4)
        for kind, shape in (
            ("weight_ih", (2400, 300 if layer == 0 else 600)),
            ("weight_hh", (2400, 600)),
            ("bias_ih", (2400,)),
            ("bias_hh", (2400,)),
        )
    },
    **{
        f"gru.{kind}_l{layer}": shape
        for layer in range(2)
        for kind, shape in (
            ("weight_ih", (1800, 600)),
            ("weight_hh", (1800, 600)),
            ("bias_ih", (1800,)),
            ("bias_hh", (1800,)),
        )
    },
    "lin.weight": (1, 600),
    "lin.bias": (1,),
    "relu.alpha": (1,),
    "relu.beta": (1,),
    "relu2.alpha": (1,),
    "relu2.beta": (1,),
}


def write_csv(path, captions):
    rows = [f"v_{i}\t{c}\t0.0\t5.0\t10.0\ttrain\t{i}\n" for i, c in enumerate(captions)]
    path.write_text(HEADER + "".join(rows), encoding="utf-8")
    return path


@pytest.fixture
def csvs(tmp_path):
    return write_csv(tmp_path / "train.csv", CAPTIONS), write_csv(tmp_path / "heldout.csv", CAPTIONS[:4])


def argv_for(train, heldout, tmp_path, *extra):
    return [
        "--procedure",
        "train_critic",
        "--train_meta_path",
        str(train),
        "--val_1_meta_path",
        str(heldout),
        "--word_emb_caps",
        "random",
        "--log_dir",
        str(tmp_path / "log"),
        *extra,
    ]


def test_exact_cli_writes_the_original_critic_layout(csvs, tmp_path, capsys):
    train, heldout = csvs
    out = tmp_path / "OUT" / "critic.cp"
    argv = argv_for(train, heldout, tmp_path, "--epoch_num", "1", "--critic_out", str(out), "--exp_name", "r")
    assert main([*argv, "--metrics_out", str(tmp_path / "m.json")]) == 0
    state = torch.load(out, weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == ORIGINAL_CRITIC_SHAPES
    run = tmp_path / "log" / "train_critic" / "r"
    in_run = torch.load(run / "checkpoints" / "critic.cp", weights_only=True)
    assert all(torch.equal(in_run[k], state[k]) for k in state)
    load_original_state_dict(SegmentCritic(), state, str(out))  # strict
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics == json.loads((run / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1] and metrics["best"]["epoch"] == 1
    assert json.loads((run / "vocabulary.json").read_text())[:4] == ["<unk>", "<blank>", "<s>", "</s>"]
    assert "F1" in capsys.readouterr().out


def test_a_critic_below_the_all_boundary_baseline_is_saved_with_a_warning(csvs, tmp_path, caplog):
    """At threshold 1 no sigmoid exceeds it: no token is called a boundary, F1 0, below marking every token."""
    argv = argv_for(*csvs, tmp_path, *SMALL, "--epoch_num", "1", "--rl_critic_score_threshhold", "1")
    assert main([*argv, "--exp_name", "low"]) == 0
    run = tmp_path / "log" / "train_critic" / "low"
    metrics = json.loads((run / "metrics.json").read_text())
    baseline = metrics["baselines"]["all_boundary"]["f1"]
    assert metrics["best"]["f1"] == 0.0 and baseline > 0
    assert (run / "checkpoints" / "critic.cp").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"the saved critic's held-out F1 0.000 is below the all-boundary baseline's {baseline:.3f} (a boundary at "
        "every token): it segments worse than no critic at all; train longer, check the labels or "
        "--critic_pos_weight before using it"
    ]


def test_dry_run_counts_the_paper_size_critic(csvs, tmp_path, capsys):
    assert main(argv_for(*csvs, tmp_path, "--dry_run")) == 0
    assert "trainable parameters: 15147005" in capsys.readouterr().out  # the original's frozen critic
    assert not (tmp_path / "log").exists()


def test_heuristic_labels_mark_punctuation_and_words_before_joining_words():
    (labelled,) = heuristic_labels(["A man walks in, and then sits down."])
    marked = [t for t, label in zip(labelled.tokens, labelled.labels, strict=True) if label]
    assert labelled.tokens == ["a", "man", "walks", "in", ",", "and", "then", "sits", "down", "."]
    assert marked == [",", "and", "."]


def test_boundary_metrics_against_hand_counts():
    decided = torch.tensor([[1, 0, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)
    labels = torch.tensor([[1, 0, 0, 1, 0], [1, 0, 1, 0, 0]], dtype=torch.float32)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)  # the last decision is padding
    counts = BoundaryCounts()
    counts.add(decided, labels, mask)
    # real tokens: tp (0,0) (0,3); fp (0,2) (1,1); fn (1,0) (1,2) → P = 2/4, R = 2/4
    assert (counts.tp, counts.fp, counts.fn, counts.tokens) == (2, 2, 2, 7)
    assert counts.scores() == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})
    counts.add(torch.tensor([[True, True]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[True, True]]))
    p, r = 4 / 6, 4 / 6
    assert counts.scores() == pytest.approx({"precision": p, "recall": r, "f1": 2 * p * r / (p + r)})
    assert BoundaryCounts().scores() == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_trivial_baselines():
    from epoch_loops.captioning.critic import CriticData

    data = CriticData([torch.tensor([2, 5, 6, 7])], [torch.tensor([0.0, 1.0, 0.0, 0.0])])
    baselines = trivial_baselines(data)
    assert baselines["all_boundary"] == pytest.approx({"precision": 0.25, "recall": 1.0, "f1": 0.4})
    assert baselines["no_boundary"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_loss_ignores_padding():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5), torch.tensor([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    garbage = torch.where(mask, logits, torch.full_like(logits, 1e4))
    batch = masked_bce(garbage, labels, mask, pos_weight=3.0)
    each = [
        masked_bce(logits[i : i + 1, :n], labels[i : i + 1, :n], mask[i : i + 1, :n], 3.0)
        for i, n in ((0, 5), (1, 2))
    ]
    assert batch.item() == pytest.approx((5 * each[0].item() + 2 * each[1].item()) / 7)


def heldout_f1_by_hand(critic: SegmentCritic, heldout_csv, vocabulary: list[str], seed: int = 0) -> dict:
    """Decisions of a loaded critic on the held-out captions, one caption at a time, counted in plain Python."""
    from datasets.embeddings import embedding_matrix

    stoi = {t: i for i, t in enumerate(vocabulary)}
    vectors = embedding_matrix("random", vocabulary, 16, seed=seed) * 4.0  # × √16, as the agent embeds
    tp = fp = fn = 0
    for caption in heuristic_labels(
        [line.split("\t")[1] for line in heldout_csv.read_text().splitlines()[1:]]
    ):
        ids = [2, *(stoi.get(t, 0) for t in caption.tokens)]
        decided = critic.segment_ends(torch.tensor([ids]), vectors[ids][None])[0].tolist()
        for d, label in zip(decided, [0, *caption.labels], strict=True):
            tp += d and label
            fp += d and not label
            fn += label and not d
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / (precision + recall)}


def test_checkpoint_reproduces_the_reported_decisions_and_resumes_exactly(csvs, tmp_path):
    train, heldout = csvs
    base = argv_for(train, heldout, tmp_path, *SMALL)
    assert (
        main([*base, "--epoch_num", "3", "--exp_name", "full", "--critic_out", str(tmp_path / "a.cp")]) == 0
    )
    run = tmp_path / "log" / "train_critic" / "full"
    metrics = json.loads((run / "metrics.json").read_text())
    best = metrics["best"]
    assert best["f1"] == max(e["f1"] for e in metrics["epochs"]) and best["f1"] > 0

    critic = SegmentCritic(d_caps=16, threshold=0.25)
    load_original_state_dict(critic, load_checkpoint(tmp_path / "a.cp"), "a.cp")
    vocabulary = json.loads((run / "vocabulary.json").read_text())
    by_hand = heldout_f1_by_hand(critic, heldout, vocabulary)
    assert by_hand == pytest.approx({k: best[k] for k in ("precision", "recall", "f1")})

    assert (
        main([*base, "--epoch_num", "1", "--exp_name", "half", "--critic_out", str(tmp_path / "b.cp")]) == 0
    )
    last = tmp_path / "log" / "train_critic" / "half" / "checkpoints" / "train_critic_last.pt"
    resumed = [*base, "--epoch_num", "3", "--resume", str(last), "--exp_name", "half"]
    assert main([*resumed, "--critic_out", str(tmp_path / "b.cp")]) == 0
    half = json.loads((tmp_path / "log" / "train_critic" / "half" / "metrics.json").read_text())
    assert half == metrics
    a, b = load_checkpoint(tmp_path / "a.cp"), load_checkpoint(tmp_path / "b.cp")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_json_labels_move_onto_our_tokens(tmp_path):
    path = tmp_path / "c.json"
    entries = [
        {"captions": ["A person opens a door, then sits down."], "seg_labels": [[0, 0, 0, 0, 1, 0, 0, 1]]}
    ]
    path.write_text(json.dumps(entries))
    (caption,) = read_seg_labels_json(path)
    assert caption.tokens == ["a", "person", "opens", "a", "door", ",", "then", "sits", "down", "."]
    assert caption.labels == [0, 0, 0, 0, 0, 1, 0, 0, 0, 1]


def test_json_input_trains(tmp_path):
    captions = [c.rstrip(".") for c in CAPTIONS]
    labels = [
        [int(w.endswith(",") or i == len(c.split()) - 1) for i, w in enumerate(c.split())] for c in captions
    ]
    entries = [
        {"captions": captions[:4], "seg_labels": labels[:4]},
        {"captions": captions[4:], "seg_labels": labels[4:]},
    ]
    train, heldout = tmp_path / "train.json", tmp_path / "heldout.json"
    train.write_text(json.dumps(entries))
    heldout.write_text(json.dumps(entries[:1]))
    out = tmp_path / "critic.cp"
    argv = argv_for(
        train, heldout, tmp_path, *SMALL, "--epoch_num", "2", "--critic_out", str(out), "--exp_name", "j"
    )
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "log" / "train_critic" / "j" / "metrics.json").read_text())
    tokens = sum(len(c.split()) + 1 + c.count(",") for c in captions[:4])  # words, "<s>", commas split off
    assert metrics["heldout_tokens"] == tokens and len(metrics["epochs"]) == 2
    assert set(load_checkpoint(out)) == set(SegmentCritic(16).state_dict())


@pytest.mark.parametrize(
    "content, message",
    [
        ([], "no captions"),
        ({"captions": []}, "expected a JSON list"),
        ([{"captions": ["a b"]}], 'entry 0: expected an object with "captions" and "seg_labels"'),
        ([{"captions": ["a b", "c"], "seg_labels": [[0, 1]]}], "entry 0: 2 captions but 1 label lists"),
        ([{"captions": ["a b c"], "seg_labels": [[0, 1]]}], "entry 0, caption 0: 3 words but 2 labels"),
        ([{"captions": ["a b"], "seg_labels": [[0, 2]]}], "labels must be 0 or 1"),
        ([{"captions": [" "], "seg_labels": [[]]}], "expected a non-empty caption"),
        ([{"captions": ["a b"], "seg_labels": [[0, 0]]}], "no token is labelled as a segment end"),
    ],
)
def test_bad_json_is_a_one_line_error(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(content))
    assert main(argv_for(bad, bad, tmp_path, "--dry_run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("main.py: error: ") and str(bad) in err and message in err and err.count("\n") == 1


def test_missing_and_empty_files_are_one_line_errors(csvs, tmp_path, capsys):
    train, heldout = csvs
    missing = tmp_path / "nope.csv"
    empty = tmp_path / "empty.csv"
    empty.write_text(HEADER)
    for argv, words in (
        (argv_for(missing, heldout, tmp_path), [str(missing), "not found"]),
        (argv_for(train, tmp_path / "nope.json", tmp_path), ["nope.json", "not found"]),
        (argv_for(train, empty, tmp_path), [str(empty), "no rows"]),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words) and err.count("\n") == 1
    assert not (tmp_path / "log").exists()  # no run directory for bad input
