"""vpure eval: per-clip jobs, cache, resumability, identical results across runners, tables."""

from __future__ import annotations

import json
import shutil

import pytest

from vpure.lab.tables import write_tables
from vpure.lab.evaluation import (EvalConfig, applicable, evaluate, load_results, weights_digests, weights_id,
                                      wilson)
from vpure.runtime.miniworld.models import COMPONENTS

CFG = EvalConfig(clips=2, iters=1, fullgrad_iters=1)
DEF, ATT = ["none", "jpeg", "shield"], ["clean", "pgd", "sparse"]


def test_wilson_interval():
    lo, hi = wilson(9, 10)
    assert 0.55 < lo < 0.6 and 0.98 < hi <= 1.0
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0


def test_applicability():
    assert applicable("videopure", "fullgrad") and not applicable("jpeg", "fullgrad")
    assert applicable("ts", "eot_bpda") and not applicable("videopure", "eot_bpda")
    assert not applicable("shield", "pgd_bpda") and applicable("shield", "gate")


def test_cache_key_covers_the_weights_the_evaluation_reads(tmp_path):
    for c in COMPONENTS:
        (tmp_path / f"{c}.safetensors").write_bytes(c.encode())
    dis, raft = weights_id(tmp_path, "dis"), weights_id(tmp_path, "raft")
    (tmp_path / "raft.safetensors").write_bytes(b"retrained")
    assert weights_id(tmp_path, "dis") == dis and weights_id(tmp_path, "raft") != raft
    (tmp_path / "vae.safetensors").write_bytes(b"retrained")
    assert weights_id(tmp_path, "dis") != dis
    digests = weights_digests(tmp_path, "dis")
    assert "raft" not in digests and weights_id(digests=digests) == weights_id(tmp_path, "dis")


def test_cache_records_the_configuration_and_the_weights(first_run):
    _, cache = first_run
    record = json.loads((cache / "config.json").read_text())
    assert EvalConfig.from_dict({k: v for k, v in record.items() if k != "weights"}) == CFG
    assert record["weights"] == {c: d[:16] for c, d in weights_digests(None, CFG.flow).items()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    cache = evaluate(CFG, DEF, ATT, out, progress=False)
    return out, cache


def test_jobs_are_cached_and_resumable(first_run):
    out, cache = first_run
    results = load_results(cache)
    expected = sum(applicable(d, a) for d in DEF for a in ATT) * CFG.clips
    assert len(results) == expected
    for r in results:
        assert r["linf"] <= CFG.eps + 1e-6 and isinstance(r["correct"], bool)
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*/*/*.json")}
    evaluate(CFG, DEF, ATT, out, progress=False)  # nothing left to do
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/*/*.json")} == stamps


def test_tables_regenerate_identically_from_the_cache(first_run, tmp_path):
    out, cache = first_run
    a = write_tables(load_results(cache), tmp_path / "a")
    b = write_tables(load_results(cache), tmp_path / "b")
    assert a["markdown"].read_text() == b["markdown"].read_text()
    assert "Table I" in a["markdown"].read_text() and "Detection gate" in a["markdown"].read_text()
    assert "Table VII" not in a["markdown"].read_text() and "table7" not in a  # no VideoPure results: no table
    assert a["table1"].read_text() == b["table1"].read_text()


def test_worker_processes_give_identical_results(first_run, tmp_path):
    out, cache = first_run
    cache2 = evaluate(CFG, ["none"], ["pgd"], tmp_path, workers=2, progress=False)
    for p in cache2.glob("none/pgd/*.json"):
        assert json.loads(p.read_text()) == json.loads((cache / "none" / "pgd" / p.name).read_text())


def test_ray_runner_gives_identical_results(first_run, tmp_path):
    pytest.importorskip("ray", reason="ray is an optional extra (pip install 'vpure[lab]') not installed here")
    out, cache = first_run
    cache2 = evaluate(CFG, ["none"], ["pgd"], tmp_path, ray_address="local", progress=False)
    for p in cache2.glob("none/pgd/*.json"):
        assert json.loads(p.read_text()) == json.loads((cache / "none" / "pgd" / p.name).read_text())
    shutil.rmtree(tmp_path, ignore_errors=True)
