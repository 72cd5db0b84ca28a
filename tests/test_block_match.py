"""block_match, motion_compensate: identical vectors and SADs across implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpure.kernels import KernelError, block_match, motion_compensate
from vpure.kernels.block_match import block_match_triton

FAST = ["native", "torch"]


def _pair(shape, levels, dtype, seed):
    rng = np.random.default_rng(seed)
    cur = rng.integers(0, levels, shape)
    ref = rng.integers(0, levels, shape)
    return cur.astype(dtype), ref.astype(dtype)


def _same(a, b, what):
    (mv_a, sad_a), (mv_b, sad_b) = a, b
    mv_a, mv_b = np.asarray(mv_a), np.asarray(mv_b)
    bad = np.argwhere((mv_a != mv_b).any(-1))
    assert not len(bad), f"{what}: {len(bad)} vectors differ, first at {bad[:3].tolist()}: {mv_a[tuple(bad[0])]} vs {mv_b[tuple(bad[0])]}"
    assert np.array_equal(np.asarray(sad_a), np.asarray(sad_b)), f"{what}: SADs differ"


# (shape, block, radius): odd sizes, a frame that is a single block (only (0, 0) fits),
# radius reaching outside on every side, non-square frames, batches.
CASES = [((3, 16, 24), 8, 3), ((1, 8, 8), 8, 5), ((8, 8), 8, 2), ((3, 4, 12), 4, 6),
         ((2, 3, 16, 16), 8, 4), ((3, 12, 6), 3, 2), ((2, 16, 16), 16, 1)]


@pytest.mark.parametrize("dtype", [np.uint8, np.float32], ids=["u8", "f32"])
@pytest.mark.parametrize("shape, block, radius", CASES, ids=str)
def test_all_implementations_agree_with_planted_ties(shape, block, radius, dtype):
    for levels in (2, 256):  # 2 levels: SAD ties everywhere, so the tie-break decides
        cur, ref = _pair(shape, levels, dtype, seed=levels + block)
        expected = block_match(cur, ref, block=block, radius=radius, impl="ref")
        for impl in FAST:
            _same(block_match(cur, ref, block=block, radius=radius, impl=impl), expected, f"{impl} levels={levels}")
        c4 = torch.from_numpy(cur).reshape(-1, *cur.shape[-3:]) if cur.ndim >= 3 else torch.from_numpy(cur)[None, None]
        r4 = torch.from_numpy(ref).reshape(c4.shape)
        mv, sad = block_match_triton(c4, r4, block, radius)
        exp_mv, exp_sad = (np.asarray(e).reshape(mv.shape[0], *mv.shape[1:-1], -1) for e in expected)
        _same((mv.numpy(), sad.numpy()), (exp_mv, exp_sad.reshape(sad.shape)), f"triton levels={levels}")


def test_single_block_frame_only_zero_vector():
    cur, ref = _pair((3, 8, 8), 256, np.uint8, seed=1)
    mv, sad = block_match(cur, ref, block=8, radius=7)
    assert mv.tolist() == [[[0, 0]]]
    assert sad[0, 0] == np.abs(cur.astype(int) - ref.astype(int)).sum()


def test_returns_numpy_for_numpy_and_torch_for_torch():
    cur, ref = _pair((3, 16, 16), 256, np.uint8, seed=2)
    mv, sad = block_match(cur, ref)
    assert isinstance(mv, np.ndarray) and mv.dtype == np.int32 and mv.shape == (2, 2, 2)
    assert sad.dtype == np.float32 and sad.shape == (2, 2)
    mv_t, sad_t = block_match(torch.from_numpy(cur), torch.from_numpy(ref))
    assert isinstance(mv_t, torch.Tensor) and mv_t.dtype == torch.int32
    assert np.array_equal(mv_t.numpy(), mv)


def _real_gray_pair(data_dir, name):
    cv2 = pytest.importorskip("cv2")
    a = cv2.imread(str(data_dir / f"{name}1.png"))
    b = cv2.imread(str(data_dir / f"{name}2.png"))
    if a is None or b is None:
        pytest.skip(f"{name}1/2.png not readable")
    return a, b


@pytest.mark.parametrize("name", ["basketball", "rubberwhale"])
def test_real_frames_agree_across_implementations(data_dir, name):
    a, b = _real_gray_pair(data_dir, name)
    h, w = (a.shape[0] // 8) * 8, (a.shape[1] // 8) * 8
    cur = np.ascontiguousarray(a[:h, :w].transpose(2, 0, 1))
    ref = np.ascontiguousarray(b[:h, :w].transpose(2, 0, 1))
    native = block_match(cur, ref, radius=7, impl="native")
    _same(native, block_match(cur, ref, radius=7, impl="torch"), f"{name} u8 torch")
    _same(block_match(cur.astype(np.float32) / 255, ref.astype(np.float32) / 255, radius=7, impl="native"),
          block_match(cur.astype(np.float32) / 255, ref.astype(np.float32) / 255, radius=7, impl="torch"),
          f"{name} f32 torch")
    # The oracle and the Triton interpreter are slow: a crop reaching every border.
    crop_c, crop_r = cur[:, :32, :40], ref[:, :32, :40]
    expected = block_match(crop_c, crop_r, radius=5, impl="ref")
    _same(block_match(crop_c, crop_r, radius=5, impl="native"), expected, f"{name} native vs ref")
    mv, sad = block_match_triton(torch.from_numpy(crop_c)[None], torch.from_numpy(crop_r)[None], 8, 5)
    _same((mv[0].numpy(), sad[0].numpy()), expected, f"{name} triton vs ref")


def test_known_translation_of_real_frame_is_recovered(data_dir):
    a, _ = _real_gray_pair(data_dir, "rubberwhale")
    dy, dx = 3, -5
    frame = np.ascontiguousarray(a.transpose(2, 0, 1))
    cur = frame[:, 40:40 + 160, 40:40 + 200]
    ref = frame[:, 40 + dy:40 + dy + 160, 40 + dx:40 + dx + 200]  # ref[y, x] = cur[y - dy, x - dx]
    mv, sad = block_match(np.ascontiguousarray(cur), np.ascontiguousarray(ref), radius=7)
    inner = mv[1:-1, 1:-1].reshape(-1, 2)
    hit = (inner == [-dy, -dx]).all(-1).mean()
    assert hit >= 0.95, f"only {hit:.0%} of interior blocks recovered the translation"
    assert (sad[1:-1, 1:-1][(mv[1:-1, 1:-1] == [-dy, -dx]).all(-1)] == 0).all()


def test_motion_compensation_reproduces_reported_sad(data_dir):
    a, b = _real_gray_pair(data_dir, "basketball")
    h, w = (a.shape[0] // 8) * 8, (a.shape[1] // 8) * 8
    cur = torch.from_numpy(np.ascontiguousarray(a[:h, :w].transpose(2, 0, 1)))
    ref = torch.from_numpy(np.ascontiguousarray(b[:h, :w].transpose(2, 0, 1)))
    mv, sad = block_match(cur, ref, radius=7)
    pred = motion_compensate(ref, mv, block=8)
    h, w = cur.shape[-2:]
    diff = (cur.int() - pred.int()).abs().view(3, h // 8, 8, w // 8, 8).sum(dim=(0, 2, 4))
    assert torch.equal(diff.float(), sad)
    assert pred.dtype == ref.dtype and pred.shape == ref.shape


def test_motion_compensation_rejects_vectors_outside():
    ref = torch.zeros(1, 16, 16)
    mv = torch.zeros(2, 2, 2, dtype=torch.int32)
    mv[0, 0] = torch.tensor([-1, 0])
    with pytest.raises(KernelError, match="outside"):
        motion_compensate(ref, mv)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(cur=np.zeros((3, 10, 16), np.uint8), ref=np.zeros((3, 10, 16), np.uint8)), "multiples of block"),
    (dict(cur=np.zeros((3, 16, 16), np.uint8), ref=np.zeros((3, 16, 8), np.uint8)), "differ in shape"),
    (dict(cur=np.zeros((3, 16, 16), np.uint8), ref=np.zeros((3, 16, 16), np.float32)), "cur is torch.uint8"),
    (dict(cur=np.zeros((3, 16, 16), np.int16), ref=np.zeros((3, 16, 16), np.int16)), "uint8 or floating"),
    (dict(cur=np.full((1, 8, 8), np.nan, np.float32), ref=np.zeros((1, 8, 8), np.float32)), "NaN"),
    (dict(cur=np.zeros((1, 1, 1, 8, 8), np.uint8), ref=np.zeros((1, 1, 1, 8, 8), np.uint8)), "must be (H, W)"),
    (dict(cur=np.zeros((16, 16, 3), np.uint8), ref=np.zeros((16, 16, 3), np.uint8)), "looks channels-last"),
])
def test_bad_arguments(kwargs, needle):
    with pytest.raises(KernelError) as e:
        block_match(**kwargs)
    assert needle in str(e.value)


def test_unknown_or_unavailable_impl():
    from vpure.kernels import KernelUnavailable

    cur, ref = _pair((1, 8, 8), 256, np.uint8, seed=0)
    with pytest.raises(KernelUnavailable, match="impl='cuda'"):
        block_match(cur, ref, impl="cuda")
