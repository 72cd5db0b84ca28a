"""The paper's tables from cached evaluation results: Markdown and CSV, with 95% CIs.

- Table I: Standard Acc (clean), Robust Acc* (gray-box PGD), Robust Acc per adaptive attack,
  and their average, per defence.
- Table IV: VideoPure ablations (temporal inversion, STO, voting).
- Table VII: each VideoPure member alone vs the vote.
- Detection: the gate's precision, recall and F1 (attacked clips are positives, clean negatives).
- Fig. 4: mean attack loss per step, per (defence, attack) with a trace.
Every cell is ``accuracy % [95% Wilson interval] (n)``; the tables depend on the cache only,
so regenerating them is deterministic.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from vpure.lab.evaluation import VIDEOPURE, wilson

MAIN = ("none", "jpeg", "wd", "ts", "diffpure_ddpm", "diffpure_ddim", "ddim_inversion", "videopure")
ABLATIONS = ("videopure", "videopure_no_ti", "videopure_no_sto", "videopure_no_vote")
ADAPTIVE = ("pgd_bpda", "eot_bpda", "tt", "apgd_ce", "apgd_dlr", "pgd_l2", "fullgrad")


def _acc(rows: list[dict]) -> tuple[int, int]:
    return sum(bool(r["correct"]) for r in rows), len(rows)


def _cell(k: int, n: int) -> str:
    if n == 0:
        return "-"
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f} [{100 * lo:.0f}, {100 * hi:.0f}] ({n})"


def _group(results: list[dict]) -> dict[tuple[str, str], list[dict]]:
    g: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        g[(r["defence"], r["attack"])].append(r)
    return g


def table_accuracy(results, defences, attacks, title: str) -> tuple[str, list[list[str]]]:
    g = _group(results)
    present_d = [d for d in defences if any((d, a) in g for a in attacks)]
    present_a = [a for a in attacks if any((d, a) in g for d in present_d)]
    names = {"clean": "Standard Acc", "pgd": "Robust Acc* (PGD gray-box)"}
    header = ["defence"] + [names.get(a, f"Robust Acc {a}") for a in present_a] + ["avg adaptive"]
    rows = []
    for d in present_d:
        row = [d]
        adaptive_k = adaptive_n = 0
        for a in present_a:
            k, n = _acc(g.get((d, a), []))
            row.append(_cell(k, n))
            if a in ADAPTIVE and n:
                adaptive_k, adaptive_n = adaptive_k + k, adaptive_n + n
        row.append(_cell(adaptive_k, adaptive_n))
        rows.append(row)
    return title, [header] + rows


def table_members(results) -> tuple[str, list[list[str]]]:
    g = _group(results)
    attacks = [a for a in ("clean", "pgd", "pgd_bpda", "fullgrad") if ("videopure", a) in g]
    header = ["VideoPure output"] + attacks
    if not attacks:  # no VideoPure results: no table (write_tables skips header-only tables)
        return "Table VII: single member vs voting", [header]
    rows_ = g[("videopure", attacks[0])]
    m = len(rows_[0]["votes"]) if rows_ else 0
    rows = []
    for j in range(m):
        row = [f"member {j + 1}" + (" (t=1 + final STO)" if j == m - 1 else "")]
        for a in attacks:
            rs = g[("videopure", a)]
            row.append(_cell(sum(r["votes"][j] == r["true"] for r in rs), len(rs)))
        rows.append(row)
    rows.append(["vote"] + [_cell(*_acc(g[("videopure", a)])) for a in attacks])
    return "Table VII: single member vs voting", [header] + rows


def table_detection(results) -> tuple[str, list[list[str]]]:
    g = _group(results)
    neg = g.get(("shield", "clean"), [])
    header = ["attack", "precision", "recall", "F1", "routes (attacked)", "Shield accuracy"]
    rows = []
    fp = sum(r["route"] != "clean" for r in neg)
    for a in ("pgd", "sparse", "gate"):
        pos = g.get(("shield", a), [])
        if not pos:
            continue
        tp = sum(r["route"] != "clean" for r in pos)
        prec = tp / (tp + fp) if tp + fp else float("nan")
        rec = tp / len(pos)
        f1 = 2 * prec * rec / (prec + rec) if prec + rec and prec == prec else float("nan")
        routes = defaultdict(int)
        for r in pos:
            routes[r["route"]] += 1
        plo, phi = wilson(tp, tp + fp)
        rlo, rhi = wilson(tp, len(pos))
        rows.append([a, f"{prec:.2f} [{plo:.2f}, {phi:.2f}]", f"{rec:.2f} [{rlo:.2f}, {rhi:.2f}]", f"{f1:.2f}",
                     ", ".join(f"{k} {v}" for k, v in sorted(routes.items())), _cell(*_acc(pos))])
    title = f"Detection gate (negatives: {len(neg)} clean clips, {fp} false alarms)"
    return title, [header] + rows


def markdown(title: str, table: list[list[str]]) -> str:
    head, *body = table
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def loss_plot(results, path: Path) -> Path | None:
    """Mean attack loss per step (the paper's Fig. 4), one line per (defence, attack)."""
    import cv2

    g = _group(results)
    curves = {}
    for (d, a), rs in sorted(g.items()):
        traces = [r["trace"] for r in rs if r.get("trace")]
        if a in ("pgd_bpda", "fullgrad", "pgd") and traces and len({len(t) for t in traces}) == 1:
            curves[f"{d} / {a}"] = np.mean(np.array(traces), axis=0)
    if not curves:
        return None
    w, h, left, top, bottom = 900, 520, 60, 30, 40
    img = np.full((h, w, 3), 255, np.uint8)
    lo = min(float(c.min()) for c in curves.values())
    hi = max(float(c.max()) for c in curves.values())
    hi = hi if hi > lo else lo + 1
    steps = max(len(c) for c in curves.values()) - 1
    plot_w = w - left - 280
    cv2.rectangle(img, (left, top), (left + plot_w, h - bottom), (0, 0, 0), 1)
    cv2.putText(img, "attack loss (mean CE) per step", (left, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                cv2.LINE_AA)
    cv2.putText(img, f"{hi:.2f}", (5, top + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, f"{lo:.2f}", (5, h - bottom), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, f"step 0 .. {steps}", (left, h - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    rng = np.random.default_rng(0)
    for i, (name, c) in enumerate(curves.items()):
        colour = tuple(int(v) for v in rng.integers(0, 200, 3))
        pts = [(int(left + plot_w * k / max(1, steps)), int(h - bottom - (h - top - bottom) * (v - lo) / (hi - lo)))
               for k, v in enumerate(c)]
        cv2.polylines(img, [np.array(pts, np.int32)], False, colour, 2, cv2.LINE_AA)
        cv2.putText(img, name[:34], (left + plot_w + 10, top + 18 * i + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour,
                    1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img[:, :, ::-1])
    return path


def write_tables(results: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """tables.md, one CSV per table and loss_vs_step.png in ``out_dir``."""
    from vpure.lab.evaluation import ATTACKS

    out_dir.mkdir(parents=True, exist_ok=True)
    attacks = [a for a in ATTACKS if a not in ("sparse", "gate")]
    tables = {
        "table1": table_accuracy(results, MAIN, attacks, "Table I: accuracy under attack"),
        "table4": table_accuracy(results, ABLATIONS, ["clean", "pgd", "pgd_bpda", "fullgrad"],
                                 "Table IV: VideoPure ablations"),
        "table7": table_members(results),
        "detection": table_detection(results),
    }
    paths, md = {}, ["# vpure eval", "", "Cells: accuracy % [95% Wilson interval] (clips).", ""]
    for name, (title, table) in tables.items():
        if len(table) <= 1:
            continue
        md.append(markdown(title, table))
        p = out_dir / f"{name}.csv"
        with p.open("w", newline="") as f:
            csv.writer(f).writerows(table)
        paths[name] = p
    paths["markdown"] = out_dir / "tables.md"
    paths["markdown"].write_text("\n".join(md))
    plot = loss_plot(results, out_dir / "loss_vs_step.png")
    if plot:
        paths["plot"] = plot
    return paths


__all__ = ["VIDEOPURE", "write_tables"]
