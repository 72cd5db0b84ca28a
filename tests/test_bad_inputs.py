"""Bad inputs end in one clear error or a counted, stated skip: never a traceback, a hang or
a silently wrong result."""

from __future__ import annotations

import io
import json
import shutil
import socket
import threading
import time

import cv2
import numpy as np
import pytest
import torch

from vpure.runtime.errors import BackendUnavailable, ConfigError, InputError
from vpure.runtime.runconfig import RuntimeConfig
from vpure.runtime.runner import Runner, RunConfig, load_components
from vpure.runtime.stream import StreamConfig, StreamStats, frames

TINY = RunConfig(models="tiny", flow="dis", window=8, stride=4)


@pytest.fixture(scope="module")
def comps():
    return load_components(TINY)


def _run(source, comps, cfg=TINY):
    out = io.StringIO()
    summary = Runner(cfg, comps).run(source, out, progress=False)
    return summary, [json.loads(line) for line in out.getvalue().splitlines()]


def _write_video(path, frames_hw, n=20):
    h, w = frames_hw
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (w, h))
    for i in range(n):
        vw.write(np.full((h, w, 3), (i * 11) % 255, np.uint8))
    vw.release()
    return path


def test_a_1x1_video_is_refused_not_upscaled(tmp_path, comps):
    summary, records = _run(_write_video(tmp_path / "dot.avi", (1, 1)), comps)
    assert records == [] and "smaller than the minimum input size of 16 px" in summary.stopped
    assert summary.stream["too_small"] == 20


def test_a_truncated_file_says_what_its_container_promised(tmp_path, data_dir, caplog):
    cut = tmp_path / "cut.avi"
    data = (data_dir / "vtest.avi").read_bytes()
    cut.write_bytes(data[:len(data) // 3])
    stats = StreamStats()
    with caplog.at_level("WARNING"):
        n = sum(1 for _ in frames(cut, StreamConfig(), stats))
    assert 0 < n < stats.declared_frames
    assert stats.ended_by.startswith(f"input ended early: {n} frames decoded of the {stats.declared_frames}")
    whole = StreamStats()
    sum(1 for _ in frames(data_dir / "vtest.avi", StreamConfig(frame_step=50), whole))
    assert whole.ended_by == "end of input"


def test_a_folder_with_no_readable_image_is_an_error(tmp_path, comps):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="none of its 3 images could be read"):
        _run(tmp_path, comps)


def test_a_size_change_is_logged_once_and_counted(tmp_path, caplog):
    for i in range(12):
        size = 64 if i < 6 else 80
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), np.full((size, size, 3), 100, np.uint8))
    stats = StreamStats()
    with caplog.at_level("WARNING"):
        assert sum(1 for _ in frames(tmp_path, StreamConfig(), stats)) == 12
    assert stats.size_changes == 1 and caplog.text.count("resized by the same policy") == 1


@pytest.mark.parametrize("changes, says", [
    ({"stream": {"size": 4096}}, "StreamConfig.size must be in [8, 1024]"),
    ({"window": 100_000_000}, "RunConfig.window must be in [2, 512]"),
    ({"stream": {"queue_frames": 10**9}}, "StreamConfig.queue_frames must be in"),
    ({"stream": {"min_input_size": 0}}, "StreamConfig.min_input_size must be in"),
])
def test_sizes_are_bounded_before_anything_is_allocated(changes, says):
    with pytest.raises(ConfigError, match=says.replace("[", r"\[").replace("]", r"\]")):
        RunConfig.from_dict(changes)


def test_cuda_without_a_gpu_is_refused_not_run_on_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    with pytest.raises(BackendUnavailable, match="runtime.device is 'cuda' but torch sees no CUDA device"):
        load_components(TINY.replace(runtime=RuntimeConfig(device="cuda")))


def test_a_stalled_stream_names_its_read_timeout():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port, held = srv.getsockname()[1], []

    def accept():  # takes the connection and never answers
        try:
            held.append(srv.accept()[0])
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(InputError, match=r"no data within 1 s \(read timeout\)"):
            next(frames(f"http://127.0.0.1:{port}/cam.ts", StreamConfig(read_timeout_s=1.0)))
    finally:
        srv.close()
        for c in held:
            c.close()
    assert time.monotonic() - t0 < 30


def test_weights_whose_metadata_does_not_build_the_model_are_one_line_errors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from vpure.runtime.errors import CheckpointError
    from vpure.runtime.miniworld.models import WEIGHTS_DIR, load

    src = WEIGHTS_DIR / "frame_classifier.safetensors"
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    meta["vpure_config"] = json.dumps({**json.loads(meta["vpure_config"]), "bogus_arg": 3})
    save_file(load_file(str(src)), str(tmp_path / "frame_classifier.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"frame_classifier.safetensors: its architecture config does not "
                                              r"build the mini-world frame_classifier: TypeError"):
        load("frame_classifier", tmp_path)


def test_a_pickled_videomae_that_weights_only_refuses_is_a_one_line_error(tmp_path):
    import datetime

    from vpure.runtime.errors import CheckpointError
    from vpure.runtime.models.videomae import load_videomae, tiny_videomae

    folder = tmp_path / "videomae"
    tiny_videomae().model.save_pretrained(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save({"weights": datetime.datetime.now()}, folder / "pytorch_model.bin")  # not plain tensors
    with pytest.raises(CheckpointError) as e:
        load_videomae(folder)
    assert str(e.value).startswith(f"cannot load VideoMAE from {folder}: ") and "\n" not in str(e.value)


def test_block_match_with_a_huge_radius_answers_at_once_and_alike():
    from vpure.kernels import block_match

    g = torch.Generator().manual_seed(0)
    cur, ref = (torch.randint(0, 255, (3, 16, 24), generator=g, dtype=torch.uint8) for _ in range(2))
    want = block_match(cur, ref, radius=16, impl="native")
    for impl in ("native", "torch", "ref"):
        t0 = time.monotonic()
        mv, sad = block_match(cur, ref, radius=10**6, impl=impl)
        assert time.monotonic() - t0 < 20, impl
        assert torch.equal(mv, want[0]) and torch.equal(sad, want[1]), impl


def test_resize_to_an_absurd_size_is_refused():
    from vpure.kernels.errors import KernelError
    from vpure.kernels.resize import resize_antialiased

    for impl in ("auto", "torch", "ref"):
        with pytest.raises(KernelError, match="beyond the bounds"):
            resize_antialiased(torch.rand(1, 4, 4), (2**31, 2), impl=impl)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_warp_l1_refuses_a_non_finite_flow_in_every_implementation(bad):
    from vpure.kernels import warp_l1
    from vpure.kernels.errors import KernelError

    x, flow = torch.rand(1, 4, 3, 8, 8), torch.zeros(1, 2, 2, 8, 8)
    flow[0, 1, 0, 3, 3] = bad
    for impl in ("native", "torch", "ref"):
        with pytest.raises(KernelError, match="flow contains NaN or Inf"):
            warp_l1(x, flow, impl=impl)


@pytest.mark.parametrize("shape, says", [((0, 4, 3, 8, 8), "empty"), ((1, 4, 3, 0, 8), "empty"),
                                         ((1, 3, 3, 8, 8), "must have 4 channels")])
def test_purify_latents_refuses_empty_and_wrong_channel_latents(shape, says):
    from vpure.runtime.videopure import purify_latents

    b, _, t, h, w = shape
    with pytest.raises(InputError, match=says):
        purify_latents(lambda z, t: torch.zeros_like(z), torch.zeros(shape), torch.zeros(b, t - 1, 2, h, w))


def test_native_attention_refuses_nan_in_both_copies():
    from vpure.kernels._dispatch import native
    from vpure.kernels.attention import native_attention_available, small_head_attention
    from vpure.kernels.errors import KernelError

    if native() is None:
        pytest.skip("the native extension is not built")
    q, k, v = torch.rand(1, 16, 64), torch.rand(1, 16, 64), torch.rand(1, 16, 64)
    k[0, 3, 5] = float("nan")
    for portable in (True, False) if native_attention_available() else (True,):  # AVX-512 where the CPU has it
        with pytest.raises(KernelError, match="contains NaN or Inf"):
            small_head_attention(q, k, v, heads=8, portable=portable)
