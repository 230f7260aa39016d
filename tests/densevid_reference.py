"""The official dense-captioning algorithm written straightforwardly (ranjaykrishna/densevid_eval 9d4045a as
ported by BMT): per tIoU, build the pairs, PTB-tokenise them, then call pycocoevalcap's scorers once per video.
The independent truth the evaluator is tested against, and the baseline `benchmarks/bench_densevid.py` times."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np


def straightforward(
    submission: Path, references: list[Path], tious: list[float], max_proposals: int, seed: int
):
    """The official algorithm, one pycocoevalcap call per video and scorer (videos in sorted order)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    def iou(interval_1, interval_2):
        start_i, end_i = interval_1[0], interval_1[1]
        start, end = interval_2[0], interval_2[1]
        intersection = max(0, min(end, end_i) - max(start, start_i))
        union = min(max(end, end_i) - min(start, start_i), end - start + end_i - start_i)
        return float(intersection) / (union + 1e-8)

    def ascii_only(text):
        return "".join(c if ord(c) < 128 else " " for c in text)

    rng = random.Random(seed)
    gts = [json.loads(Path(r).read_text()) for r in references]
    results = json.loads(Path(submission).read_text())["results"]
    predictions = {vid: p[:max_proposals] for vid, p in results.items()}
    vids = sorted(set().union(*gts))
    scorers = [
        (Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
        (Meteor(), "METEOR"),
        (Rouge(), "ROUGE_L"),
    ]
    scorers.append((Cider(), "CIDEr"))
    tokenizer = PTBTokenizer()
    metrics = {}
    for tiou in tious:
        cur_res, cur_gts, vid2capid, index = {}, {}, {}, 0
        for vid in vids:
            vid2capid[vid] = []
            for pred in predictions.get(vid, []):
                added = False
                for gt in gts:
                    for ts, sentence in zip(
                        gt.get(vid, {}).get("timestamps", []),
                        gt.get(vid, {}).get("sentences", []),
                        strict=False,
                    ):
                        if iou(pred["timestamp"], ts) >= tiou:
                            cur_res[index] = [{"caption": ascii_only(pred["sentence"])}]
                            cur_gts[index] = [{"caption": ascii_only(sentence)}]
                            vid2capid[vid].append(index)
                            index, added = index + 1, True
                if not added:
                    cur_res[index] = [{"caption": ascii_only(pred["sentence"])}]
                    letters = rng.randint(10, 20)
                    cur_gts[index] = [
                        {"caption": "".join(rng.choice(string.ascii_lowercase) for _ in range(letters))}
                    ]
                    vid2capid[vid].append(index)
                    index += 1
        tok_res, tok_gts = tokenizer.tokenize(cur_res), tokenizer.tokenize(cur_gts)
        row = {}
        for scorer, method in scorers:
            per_video = []
            for vid in vids:
                ids = vid2capid[vid]
                if not ids:
                    per_video.append([0] * len(method) if isinstance(method, list) else 0)
                    continue
                kwargs = {"verbose": 0} if isinstance(method, list) else {}
                score, _ = scorer.compute_score(
                    {i: tok_gts[i] for i in ids}, {i: tok_res[i] for i in ids}, **kwargs
                )
                per_video.append(score)
            if isinstance(method, list):
                row.update({m: float(v) for m, v in zip(method, np.mean(per_video, axis=0), strict=False)})
            else:
                row[method] = float(np.mean(per_video))
        precision, recall = [], []
        for vid in vids:
            best_p = best_r = 0.0
            for gt in gts:
                if vid not in gt:
                    continue
                preds, refs = predictions.get(vid, []), gt[vid]["timestamps"]
                hits = [[iou(p["timestamp"], r) > tiou for r in refs] for p in preds]
                if preds:
                    best_p = max(best_p, sum(any(h) for h in hits) / len(preds))
                best_r = max(best_r, sum(any(h[k] for h in hits) for k in range(len(refs))) / len(refs))
            precision.append(best_p)
            recall.append(best_r)
        row["Precision"], row["Recall"] = sum(precision) / len(precision), sum(recall) / len(recall)
        metrics[str(float(tiou))] = row
    names = list(metrics[str(float(tious[0]))])
    metrics["Average across tIoUs"] = {m: sum(r[m] for r in metrics.values()) / len(tious) for m in names}
    return metrics
