"""`main.py --procedure plot --runs DIR [DIR ...] [--out curves.png]`: the learning curves of one or more runs,
read from their `metrics.json`, in one PNG with one panel per metric family and a legend naming the runs.

What each training procedure's metrics JSON gives (x: epoch, or optimiser step for the ranking stages):
- train_rl_cap: METEOR ×100 of every validated epoch (val_1, val_2), the warm start's training loss, RL's
  training reward;
- train_critic: held-out boundary F1, training and held-out loss;
- train_prop: val_1 proposal F1 (averaged over the tIoUs), training loss;
- pointwise, reward, ppo (LRMovieNet or LETOR): the dev metric of every report (NDCG@all, pair accuracy), the
  training loss and PPO's reward between reports.
A demo run has no curves of its own: its stage runs (sub-folders with a metrics JSON) are drawn instead.
Plain JSON and matplotlib (Agg, no display): no torch, so it also runs where training does not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from utilities.config import Config
from utilities.errors import InputError
from utilities.run_dir import RunDir

METRICS_FILE = "metrics.json"
AVERAGE_KEY = "Average across tIoUs"  # evaluation.densevid's key of the tIoU average
DEV_METRICS = ("NDCG@all", "pair_accuracy")  # what the ranking stages select on (pointwise/ppo, reward)

# family (panel title, x label) → series name → (x, y)
Curves = dict[tuple[str, str], dict[str, tuple[list[float], list[float]]]]


def plot(cfg: Config, run: RunDir) -> None:
    """Read every `--runs` folder, draw the curves into `--out` (default curves.png)."""
    if not cfg.runs:
        raise InputError(
            "--procedure plot needs --runs DIR [DIR ...] (run folders, e.g. log/train_rl_cap/<exp>)"
        )
    curves: Curves = {}
    for folder in map(Path, cfg.runs):
        for name, metrics in runs_in(folder):
            for family, series in run_curves(metrics).items():
                for label, points in series.items():
                    curves.setdefault(family, {})[f"{name}: {label}" if label else name] = points
    out = Path(cfg.out or "curves.png")
    draw(dict(sorted(curves.items(), key=panel_order)), out)
    print(f"plot: {len(curves)} panels of {len(cfg.runs)} run folders -> {out}")


def runs_in(folder: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, metrics) of the run `folder`, or of its stage runs when its own metrics hold no curve (a demo)."""
    if not folder.is_dir():
        raise InputError(f"--runs {folder}: no such folder")
    own = read_metrics(folder / METRICS_FILE)
    if own is not None and run_curves(own):
        yield folder.name, own
        return
    stages = sorted(p.parent for p in folder.glob(f"*/**/{METRICS_FILE}"))
    found = [(p, m) for p in stages if (m := read_metrics(p / METRICS_FILE)) is not None and run_curves(m)]
    if not found:
        what = "holds no learning curve" if own is not None else f"has no {METRICS_FILE}"
        raise InputError(
            f"--runs {folder}: {what} (give the folder of a training run, e.g. log/train_rl_cap/<exp>, or a demo run)"
        )
    for path, metrics in found:
        yield f"{folder.name}/{path.relative_to(folder).as_posix()}", metrics


def read_metrics(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"--runs: {path} is not JSON ({e.msg}, line {e.lineno})") from None
    return metrics if isinstance(metrics, dict) else None


def run_curves(metrics: dict[str, Any]) -> Curves:
    """The curves of one run's metrics JSON, by what its records hold (see the module docstring)."""
    curves: Curves = {}

    def add(family: tuple[str, str], label: str, x: float, y: float | None) -> None:
        if y is not None:
            xs, ys = curves.setdefault(family, {}).setdefault(label, ([], []))
            xs.append(x)
            ys.append(y)

    history = metrics.get("history")
    for record in history if isinstance(history, list) else []:
        if "phase" in record:  # train_rl_cap: one record per epoch
            for split in ("val_1", "val_2"):
                meteor = record.get("val", {}).get(split, {}).get("METEOR")
                add(
                    ("METEOR ×100", "epoch"), split, record["epoch"], None if meteor is None else 100 * meteor
                )
            add(("training loss", "epoch"), "", record["epoch"], record["train"].get("loss"))
            add(("training reward", "epoch"), "", record["epoch"], record["train"].get("reward"))
        elif "dev" in record:  # pointwise, reward, ppo: one record per report
            for name in DEV_METRICS:
                add((f"{name} (dev)", "optimiser step"), "", record["step"], record["dev"].get(name))
            add(("training loss", "optimiser step"), "", record["step"], record["train"].get("loss"))
            add(("training reward", "optimiser step"), "", record["step"], record["train"].get("reward"))
    epochs = metrics.get("epochs")
    for record in epochs if isinstance(epochs, list) else []:
        if "f1" in record:  # train_critic
            add(("boundary F1 (held-out)", "epoch"), "", record["epoch"], record["f1"])
            add(("training loss", "epoch"), "", record["epoch"], record["train_loss"])
            add(("held-out loss", "epoch"), "", record["epoch"], record["heldout_loss"])
        elif "val_1" in record:  # train_prop
            add(("proposal F1 (val_1)", "epoch"), "", record["epoch"], record["val_1"][AVERAGE_KEY]["F1"])
            add(("training loss", "epoch"), "", record["epoch"], record["train_loss"])
    return curves


def panel_order(family: tuple[tuple[str, str], Any]) -> tuple[bool, str, str]:
    """Validation metrics first, then the training curves; per epoch before per step."""
    (title, x_label), _ = family
    return (title.startswith(("training", "held-out")), x_label, title)


def draw(curves: Curves, out: Path) -> None:
    """One panel per family (up to three a row), every series with markers (a run validated once is a dot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(curves))
    rows = math.ceil(len(curves) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    for ax, ((title, x_label), series) in zip(axes.flat[: len(curves)], curves.items(), strict=True):
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    for ax in axes.flat[len(curves) :]:
        ax.set_visible(False)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
