"""The one benchmark harness: parity first, then timing, ratios against a reference.

A benchmark is a reference :class:`Case` and candidate cases measured in the same run.
Each candidate's output is checked against the reference output before it is timed (the
parity column); timing runs warm-up calls, then repeats until both a minimum count and a
minimum time are reached, synchronising CUDA around each call. Rows print as a table with
p50/p90/p99 and ``speedup = reference p50 / case p50`` and are appended to a CSV keyed by
machine, commit and library versions.
"""

from __future__ import annotations

import csv
import datetime as _dt
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vpure.runtime.machine import machine_id
from vpure.runtime.versions import package_version

CSV_FIELDS = ("timestamp", "machine", "device", "commit", "torch", "vpure", "group", "config", "case",
              "p50_ms", "p90_ms", "p99_ms", "n", "speedup_vs_ref", "reference", "parity", "note")


@dataclass
class Case:
    name: str
    fn: Callable[[], Any]
    # parity(output, reference_output) -> short text ("exact", "max|d|=3e-7"); raise on failure.
    parity: Callable[[Any, Any], str] | None = None
    note: str = ""
    # Untimed work before every call of fn (state the timed call starts from).
    setup: Callable[[], Any] | None = None


@dataclass
class Row:
    case: str
    p50_ms: float
    p90_ms: float
    p99_ms: float
    n: int
    speedup: float
    parity: str
    note: str = ""
    samples_ms: list[float] = field(default_factory=list, repr=False)


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def git_commit(where: Path | None = None) -> str:
    """The short commit of the checkout holding ``where`` (default: this package's), with
    "+dirty" when tracked files other than ``benchmarks/results`` differ from it (so a row
    measured on uncommitted code says so)."""
    here = where or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=here)
        commit = out.stdout.strip()
        if not commit:
            return "unknown"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                 ":(exclude,top)benchmarks/results"], capture_output=True, text=True, timeout=10,
                                cwd=here)
        return commit + ("+dirty" if status.returncode == 0 and status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _no_setup() -> None:
    return None


def time_fn(fn: Callable[[], Any], *, device: str = "cpu", warmup: int = 2, min_iters: int = 5,
            min_time_s: float = 0.5, max_iters: int = 1000, setup: Callable[[], Any] | None = None) -> list[float]:
    setup = setup or _no_setup
    for _ in range(warmup):
        setup()
        fn()
    _sync(device)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_iters and (len(samples) < min_iters or time.perf_counter() - start < min_time_s):
        setup()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def time_interleaved(fns: list[Callable[[], Any]], *, device: str = "cpu", warmup: int = 2, min_iters: int = 5,
                     min_time_s: float = 0.5, max_iters: int = 1000,
                     setups: list[Callable[[], Any] | None] | None = None) -> list[list[float]]:
    """Samples of each of ``fns`` timed in rounds (one call of each per round), so that a
    machine whose speed drifts (a shared VM, a throttling laptop) slows every case alike;
    ``setups[i]`` (untimed) runs before every call of ``fns[i]``."""
    setups = [s or _no_setup for s in (setups or [None] * len(fns))]
    for fn, setup in zip(fns, setups):
        for _ in range(warmup):
            setup()
            fn()
    _sync(device)
    samples: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(samples[0]) < max_iters and (len(samples[0]) < min_iters or time.perf_counter() - start < min_time_s):
        for fn, setup, out in zip(fns, setups, samples):
            setup()
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out.append((time.perf_counter() - t0) * 1e3)
    return samples


def _pct(samples: list[float], q: float) -> float:
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[int(q) - 1]


def run(group: str, config: str, reference: Case, cases: list[Case], *, device: str = "cpu",
        csv_path: str | Path | None = None, interleave: bool = False, **timing: Any) -> list[Row]:
    """Time ``reference`` and ``cases`` (parity first); print and optionally append to CSV.

    ``interleave``: time all of them in rounds (:func:`time_interleaved`) rather than one
    after the other; for ratios near 1 on a machine whose speed drifts."""
    (reference.setup or _no_setup)()
    ref_out = reference.fn()
    checked: list[tuple[Case, str]] = []
    failed: dict[str, Row] = {}
    for case in cases:
        try:
            (case.setup or _no_setup)()
            checked.append((case, case.parity(case.fn(), ref_out) if case.parity else "unchecked"))
        except AssertionError as e:  # a result that is wrong is not worth timing
            failed[case.name] = Row(case.name, float("nan"), float("nan"), float("nan"), 0, float("nan"),
                                    f"FAIL: {(str(e).splitlines() or [''])[0]}", case.note)
    timed_cases = [reference] + [c for c, _ in checked]
    if interleave:
        all_samples = time_interleaved([c.fn for c in timed_cases], device=device,
                                       setups=[c.setup for c in timed_cases], **timing)
    else:
        all_samples = [time_fn(c.fn, device=device, setup=c.setup, **timing) for c in timed_cases]
    ref_samples, timed = all_samples[0], dict(zip([c.name for c, _ in checked], all_samples[1:]))
    ref_p50 = statistics.median(ref_samples)
    rows: list[Row] = [Row(reference.name + " (ref)", ref_p50, _pct(ref_samples, 90), _pct(ref_samples, 99),
                           len(ref_samples), 1.0, "reference", reference.note, ref_samples)]
    parities = dict((c.name, p) for c, p in checked)
    for case in cases:
        if case.name in failed:
            rows.append(failed[case.name])
            continue
        s = timed[case.name]
        p50 = statistics.median(s)
        rows.append(Row(case.name, p50, _pct(s, 90), _pct(s, 99), len(s), ref_p50 / p50, parities[case.name],
                        case.note, s))
    print_table(group, config, rows)
    if csv_path:  # None or "" (the benchmarks' --csv '') write no row
        append_csv(csv_path, group, config, reference.name, rows, device)
    return rows


def print_table(group: str, config: str, rows: list[Row]) -> None:
    print(f"\n## {group} [{config}]")
    print(f"{'case':<34} {'p50 ms':>10} {'p90 ms':>10} {'p99 ms':>10} {'n':>5} {'speedup':>9}  parity")
    for r in rows:
        print(f"{r.case:<34} {r.p50_ms:>10.3f} {r.p90_ms:>10.3f} {r.p99_ms:>10.3f} {r.n:>5} {r.speedup:>8.2f}x  "
              f"{r.parity}{'  (' + r.note + ')' if r.note else ''}")


def append_csv(path: str | Path, group: str, config: str, reference: str, rows: list[Row], device: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    common = {"timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_id(), "device": device_name(device), "commit": git_commit(),
              "torch": package_version("torch") or "", "vpure": package_version("vpure") or "",
              "group": group, "config": config,
              "reference": reference}
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(common | {"case": r.case, "p50_ms": f"{r.p50_ms:.4f}", "p90_ms": f"{r.p90_ms:.4f}",
                                 "p99_ms": f"{r.p99_ms:.4f}", "n": r.n, "speedup_vs_ref": f"{r.speedup:.3f}",
                                 "parity": r.parity, "note": r.note})
    return path
