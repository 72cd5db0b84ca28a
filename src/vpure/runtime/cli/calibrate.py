"""``vpure calibrate``: pick gamma1/gamma2 by F1 on labelled clips, write them to a config."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".mpg", ".mpeg"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--clips", type=Path, help="folder with clean/, sparse/ and dense/ subfolders of videos")
    src.add_argument("--manifest", type=Path, help="CSV of path,kind (kind: clean|sparse|dense), paths relative to it")
    p.add_argument("--frame-classifier", type=Path, required=True, help="frame classifier checkpoint")
    p.add_argument("--frames", type=int, default=16, help="frames per clip (default 16)")
    p.add_argument("--size", type=int, default=112, help="square input size (default 112)")
    p.add_argument("--out", type=Path, default=Path("detection.toml"), help="config file to write")
    p.add_argument("--roc", type=Path, default=Path("detection_roc.png"), help="ROC plot (PNG) to write")


def _listing(args) -> list[tuple[Path, str]]:
    from vpure.runtime.thresholds import KINDS
    from vpure.runtime.errors import InputError

    if args.clips is not None:
        if not args.clips.is_dir():
            raise InputError(f"--clips {args.clips} is not a folder")
        items = [(f, kind) for kind in KINDS if (args.clips / kind).is_dir()
                 for f in sorted((args.clips / kind).iterdir()) if f.suffix.lower() in VIDEO_SUFFIXES]
    else:
        if not args.manifest.is_file():
            raise InputError(f"--manifest {args.manifest} does not exist")
        try:
            with args.manifest.open(newline="", encoding="utf-8") as fh:
                rows = list(enumerate(csv.reader(fh), 1))
        except (UnicodeDecodeError, csv.Error) as e:
            raise InputError(f"--manifest {args.manifest} is not a CSV text file: {e}") from None
        items = []
        for line, row in rows:
            cells = [c.strip() for c in row]
            if not any(cells) or cells[0].startswith("#") or (line == 1 and cells[:2] == ["path", "kind"]):
                continue
            if len(cells) < 2 or cells[1] not in KINDS:
                raise InputError(f"--manifest {args.manifest} line {line}: expected 'path,kind' with kind one of "
                                 f"{', '.join(KINDS)}, got {row}")
            items.append((args.manifest.parent / cells[0], cells[1]))
    if not items:
        raise InputError("no labelled clips found")
    return items


def run(args: argparse.Namespace) -> int:
    from vpure.runtime import registry
    from vpure.runtime.thresholds import calibrate, format_table, roc_png
    from vpure.runtime.detect import DetectionConfig, Detector
    from vpure.runtime.errors import InputError
    from vpure.runtime.log import get_logger, progress
    from vpure.runtime.video import load_clip

    log = get_logger("vpure.runtime.cli.calibrate")
    items = _listing(args)
    detector = Detector(registry.get("frame_classifier").load(args.frame_classifier))
    alphas, kinds, failed = [], [], 0
    for path, kind in progress(items, total=len(items), desc="clips"):
        try:
            det = detector(load_clip(path, args.frames, args.size))
        except InputError as e:  # a bad clip is counted and skipped; the rest still calibrate
            log.warning("skipping %s: %s", path, e)
            failed += 1
            continue
        alphas.append(det.alpha[0])
        kinds.append(kind)
    cal = calibrate(alphas, kinds)
    print(f"clips: {cal.counts} (skipped {failed})")
    print(format_table(cal.stage1, "clean vs adversarial (gamma1)", cal.gamma1))
    print(format_table(cal.stage2, "sparse vs dense (gamma2)", cal.gamma2))
    DetectionConfig(gamma1=cal.gamma1, gamma2=cal.gamma2).save(args.out)
    roc_png(args.roc, {"clean vs adversarial": cal.stage1, "sparse vs dense": cal.stage2})
    print(f"gamma1={cal.gamma1:.4f} gamma2={cal.gamma2:.4f} -> {args.out}; ROC -> {args.roc}")
    return 0
