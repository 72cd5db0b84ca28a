"""Unique temporary files and atomic renames: concurrent writers never collide, caches heal."""

from __future__ import annotations

import threading

import pytest
import torch

from vpure.runtime import atomic


def test_concurrent_writers_of_one_file_never_collide(tmp_path):
    target, errors = tmp_path / "engine.onnx", []
    payloads = [bytes([i]) * (1 << 16) for i in range(4)]

    def writer(data):
        try:
            for _ in range(25):
                atomic.write_bytes(target, data)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert target.read_bytes() in payloads  # one writer's whole file, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["engine.onnx"]  # no temporary left behind


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "sub" / "config.toml"
    atomic.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic.replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["config.toml"]


def test_a_corrupt_mini_world_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch, caplog):
    from vpure.lab import miniworld_train as train
    from vpure.runtime.miniworld.dataset import WorldConfig

    monkeypatch.setenv("VPURE_CACHE", str(tmp_path))
    world = WorldConfig()
    clips, labels = train.train_data(2, world, "test")
    (cache,) = (tmp_path / "miniworld").glob("test-2-*.pt")
    cache.write_bytes(cache.read_bytes()[:100])  # a torn write
    with caplog.at_level("WARNING"):
        again, again_labels = train.train_data(2, world, "test")
    assert "does not load" in caplog.text and "rebuilding" in caplog.text
    assert torch.equal(again, clips) and torch.equal(again_labels, labels)
    assert torch.load(cache, weights_only=True)["clips"].shape == clips.shape  # rewritten whole


def test_two_exports_into_one_folder_at_once_both_succeed(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "vpure", "export", "--tiny", "--components", "frame_classifier,comdefend",
           "--out", str(tmp_path), "--force"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
    from vpure.runtime import artifacts
    from vpure.runtime.deployment import ModelsConfig, plan
    from vpure.runtime.precision import Precision

    tiny = plan(ModelsConfig.from_name("tiny"))
    for name in ("frame_classifier", "comdefend"):
        spec = tiny.spec(name)
        artifacts.verify(artifacts.find_artifact(tmp_path, spec, Precision.FP32), spec, Precision.FP32)
