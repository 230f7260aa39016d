"""Time the dense-captioning evaluator against a straightforward implementation of the same semantics.

The straightforward version is the official evaluator's algorithm (ranjaykrishna/densevid_eval 9d4045a as
ported by BMT): per tIoU, build the pairs, PTB-tokenise them, then call pycocoevalcap's Bleu/Meteor/Rouge/Cider
`compute_score` once per video. Ours is one CLI run (`main.py --procedure eval`). Both score BMT's val_1
predictions against both `*_no_missings.json` references at tIoUs 0.3/0.5/0.7/0.9 (the learned-proposal
protocol), and the script checks that the numbers are identical.

    .venv/bin/python benchmarks/bench_densevid.py [--data DIR] [--skip_straightforward]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.densevid_reference import straightforward  # noqa: E402


def ours(submission: Path, references: list[Path], tious: list[float], max_proposals: int, seed: int):
    from main import main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "metrics.json"
        argv = [
            "--procedure",
            "eval",
            "--submission",
            str(submission),
            "--reference_paths",
            *map(str, references),
        ]
        argv += ["--tIoUs", *map(str, tious), "--max_prop_per_vid", str(max_proposals), "--seed", str(seed)]
        argv += ["--metrics_out", str(out), "--log_dir", tmp, "--no-progress"]
        if main(argv) != 0:
            raise SystemExit("the CLI evaluation failed")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--skip_straightforward", action="store_true")
    args = parser.parse_args()
    submission = args.data / "bmt_predictions" / "captioning_results_val_1_e26.json"
    references = [args.data / "activitynet" / f"val_{i}_no_missings.json" for i in (1, 2)]
    setting = (submission, references, [0.3, 0.5, 0.7, 0.9], 100, 0)

    start = time.perf_counter()
    fast = ours(*setting)
    t_ours = time.perf_counter() - start
    print(f"ours (one CLI evaluation): {t_ours:.1f} s")
    if args.skip_straightforward:
        return
    start = time.perf_counter()
    slow = straightforward(*setting)
    t_slow = time.perf_counter() - start
    print(f"straightforward (per-video pycocoevalcap): {t_slow:.1f} s")
    print(f"speed-up: {t_slow / t_ours:.1f}x (ours takes {t_ours / t_slow:.2f} of the time)")
    identical = fast == slow
    print(f"numbers identical: {identical}")
    if not identical:
        for key, row in slow.items():
            for metric, value in row.items():
                if fast[key].get(metric) != value:
                    print(f"  {key} {metric}: straightforward {value!r} ours {fast[key].get(metric)!r}")


if __name__ == "__main__":
    main()
