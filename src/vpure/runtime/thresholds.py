"""Threshold calibration for the detection gate (spec/detection.md, paper Tables 1-2).

Stage 1 separates clean from adversarial clips with gamma1 (adversarial iff
alpha >= gamma1); stage 2 separates dense from sparse attacks among the adversarial
clips with gamma2 (dense iff alpha >= gamma2, searched at or above gamma1). Each
threshold is scored by precision, recall and F1 of the positive class; the pick is the
best F1 (ties: the smaller threshold).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import InputError

KINDS = ("clean", "sparse", "dense")


@dataclass
class Row:
    threshold: float
    precision: float
    recall: float
    f1: float
    fpr: float


@dataclass
class Calibration:
    gamma1: float
    gamma2: float
    stage1: list[Row]
    stage2: list[Row]
    counts: dict[str, int]


def sweep(scores: Sequence[float], positive: Sequence[bool], thresholds: Sequence[float] | None = None) -> list[Row]:
    if len(scores) != len(positive):
        raise InputError("scores and labels differ in length")
    thresholds = sorted(set(thresholds if thresholds is not None else [0.0, *scores, 1.0 + 1e-9]))
    n_pos = sum(positive)
    n_neg = len(positive) - n_pos
    rows = []
    for t in thresholds:
        tp = sum(1 for s, p in zip(scores, positive) if s >= t and p)
        fp = sum(1 for s, p in zip(scores, positive) if s >= t and not p)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / n_pos if n_pos else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        rows.append(Row(t, prec, rec, f1, fp / n_neg if n_neg else 0.0))
    return rows


def best(rows: list[Row]) -> Row:
    return max(rows, key=lambda r: (r.f1, -r.threshold))


def calibrate(alphas: Sequence[float], kinds: Sequence[str]) -> Calibration:
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        raise InputError(f"unknown clip kinds {bad}; expected {KINDS}")
    counts = {k: sum(1 for x in kinds if x == k) for k in KINDS}
    if counts["clean"] == 0 or counts["sparse"] + counts["dense"] == 0:
        raise InputError(f"calibration needs clean and adversarial clips, got {counts}")
    stage1 = sweep(alphas, [k != "clean" for k in kinds])
    g1 = best(stage1).threshold
    adv = [(a, k) for a, k in zip(alphas, kinds) if k != "clean"]
    cand = [t for t in sorted({0.0, *(a for a, _ in adv), 1.0 + 1e-9}) if t >= g1]
    stage2 = sweep([a for a, _ in adv], [k == "dense" for _, k in adv], cand)
    g2 = best(stage2).threshold if counts["sparse"] and counts["dense"] else g1
    return Calibration(min(g1, 1.0), min(max(g2, g1), 1.0), stage1, stage2, counts)


def format_table(rows: list[Row], title: str, chosen: float) -> str:
    lines = [f"### {title}", "| threshold | precision | recall | F1 | FPR |", "|---|---|---|---|---|"]
    for r in rows:
        mark = " <-" if r.threshold == chosen else ""
        lines.append(f"| {r.threshold:.4f} | {r.precision:.1%} | {r.recall:.1%} | {r.f1:.1%} | {r.fpr:.1%} |{mark}")
    return "\n".join(lines)


def roc_png(path: str | Path, curves: dict[str, list[Row]], size: int = 480) -> Path:
    """ROC curves (TPR = recall vs FPR) drawn with OpenCV into a PNG."""
    import cv2
    import numpy as np

    img = np.full((size, size, 3), 255, np.uint8)
    m = 50
    span = size - 2 * m

    def pt(fpr, tpr):
        return int(m + fpr * span), int(size - m - tpr * span)

    cv2.rectangle(img, pt(0, 0), pt(1, 1), (0, 0, 0), 1)
    cv2.line(img, pt(0, 0), pt(1, 1), (200, 200, 200), 1)
    colours = [(200, 60, 40), (40, 120, 220), (40, 160, 60)]
    for i, (name, rows) in enumerate(curves.items()):
        pts = sorted({(r.fpr, r.recall) for r in rows} | {(0.0, 0.0), (1.0, 1.0)})
        col = colours[i % len(colours)]
        for a, b in zip(pts, pts[1:]):
            cv2.line(img, pt(*a), pt(*b), col, 2, cv2.LINE_AA)
        cv2.putText(img, name, (m + 10, m + 20 + 20 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, col, 1, cv2.LINE_AA)
    cv2.putText(img, "FPR", (size // 2 - 15, size - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "TPR", (5, size // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise InputError(f"cannot write {path}")
    return path
