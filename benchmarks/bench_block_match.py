"""block_match on a real 32-frame clip (31 pairs), 8x8 blocks, 224x224.

Reference: the vectorised numpy baseline. Candidates: native (SIMD + OpenMP), torch, and
FFmpeg's exhaustive ``mestimate`` (method=esa) through PyAV on the luma plane, with its
vectors' agreement with ours. Run from the repository root:

    .venv/bin/python -m benchmarks.bench_block_match [--radius 7 16] [--csv PATH]
"""

from __future__ import annotations

import argparse
from fractions import Fraction

import numpy as np
import torch

from vpure.kernels.block_match import block_match_native, block_match_torch, block_match_triton
from vpure.lab import timing as benchmark

from .footage import load_clip


def numpy_baseline(cur: np.ndarray, ref: np.ndarray, block: int, radius: int):
    """Vectorised numpy: one candidate at a time over all pairs and blocks (int32 SAD)."""
    n, c, h, w = cur.shape
    nby, nbx = h // block, w // block
    cur32, ref32 = cur.astype(np.int32), ref.astype(np.int32)
    y0 = np.arange(nby)[:, None] * block
    x0 = np.arange(nbx)[None, :] * block
    best_sad = np.full((n, nby, nbx), np.iinfo(np.int64).max, np.int64)
    best_key = np.full((n, nby, nbx), 1 << 30, np.int64)
    best = np.zeros((n, nby, nbx, 2), np.int32)
    side = 2 * radius + 1
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            valid = (y0 + dy >= 0) & (y0 + dy + block <= h) & (x0 + dx >= 0) & (x0 + dx + block <= w)
            shifted = np.zeros_like(ref32)
            shifted[:, :, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
                ref32[:, :, max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
            s = np.abs(cur32 - shifted).reshape(n, c, nby, block, nbx, block).sum(axis=(1, 3, 5))
            key = (abs(dy) + abs(dx)) * side * side + (dy + radius) * side + (dx + radius)
            better = valid & ((s < best_sad) | ((s == best_sad) & (key < best_key)))
            best_sad = np.where(better, s, best_sad)
            best_key = np.where(better, key, best_key)
            best[better] = (dy, dx)
    return best, best_sad.astype(np.float32)


def ffmpeg_esa(gray: np.ndarray, block: int, radius: int) -> np.ndarray:
    """FFmpeg mestimate ESA vectors of frames 1..N-1 w.r.t. their predecessor, as (dy, dx)."""
    import av

    t, h, w = gray.shape
    graph = av.filter.Graph()
    src = graph.add_buffer(width=w, height=h, format="gray", time_base=Fraction(1, 25))
    me = graph.add("mestimate", f"method=esa:mb_size={block}:search_param={radius}")
    sink = graph.add("buffersink")
    src.link_to(me)
    me.link_to(sink)
    graph.configure()
    outs = []
    # mestimate holds one frame back (it also looks ahead): push one extra frame.
    for i, a in enumerate([*gray, gray[-1]]):
        f = av.VideoFrame.from_ndarray(a, format="gray")
        f.pts = i
        graph.push(f)
        while True:
            try:
                outs.append(graph.pull())
            except (av.BlockingIOError, av.EOFError):
                break
    mvs = np.zeros((t - 1, h // block, w // block, 2), np.int32)
    for frame in outs:
        if not 1 <= frame.pts < t:
            continue
        for sd in frame.side_data:
            if type(sd).__name__ != "MotionVectors":
                continue
            a = sd.to_ndarray()
            a = a[a["source"] == -1]  # vectors into the previous frame
            by, bx = (a["dst_y"] - block // 2) // block, (a["dst_x"] - block // 2) // block
            mvs[frame.pts - 1, by, bx, 0] = a["src_y"] - a["dst_y"]
            mvs[frame.pts - 1, by, bx, 1] = a["src_x"] - a["dst_x"]
    return mvs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--radius", type=int, nargs="+", default=[7, 16])
    p.add_argument("--clip", default="vtest.avi")
    p.add_argument("--csv", default="benchmarks/results/results.csv", help="CSV to append rows to ('' for none)")
    args = p.parse_args(argv)
    import cv2

    clip = load_clip(args.clip, frames=32, size=224)  # (32, 224, 224, 3)
    rgb = torch.from_numpy(np.ascontiguousarray(clip.transpose(0, 3, 1, 2)))
    cur, ref = rgb[1:].contiguous(), rgb[:-1].contiguous()
    gray = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in clip])
    gcur, gref = torch.from_numpy(gray[1:, None].copy()), torch.from_numpy(gray[:-1, None].copy())

    def exact(out, ref_out):
        (mv, sad), (rmv, rsad) = out, ref_out
        mv, sad = np.asarray(mv), np.asarray(sad)
        assert np.array_equal(mv, rmv), f"{(mv != rmv).any(-1).sum()} vectors differ"
        assert np.array_equal(sad, rsad), "SADs differ"
        return "exact"

    for r in args.radius:
        cfg = f"{args.clip} 31 pairs 224x224 RGB u8 block 8 radius {r}"
        if torch.cuda.is_available():  # GPU figures go to the same CSV with the GPU's name
            gc, gr = cur.cuda(), ref.cuda()
            benchmark.run("block_match", cfg + " cuda",
                          benchmark.Case("torch-cuda", lambda: block_match_torch(gc, gr, 8, r)),
                          [benchmark.Case("triton-cuda", lambda: block_match_triton(gc, gr, 8, r),
                                          lambda o, ro: exact(tuple(t.cpu() for t in o), tuple(t.cpu().numpy() for t in ro)))],
                          device="cuda", csv_path=args.csv, min_iters=20, min_time_s=1.0)
        benchmark.run("block_match", cfg,
                      benchmark.Case("numpy-vectorised", lambda: numpy_baseline(cur.numpy(), ref.numpy(), 8, r)),
                      [benchmark.Case("native", lambda: block_match_native(cur, ref, 8, r), exact),
                       benchmark.Case("torch", lambda: block_match_torch(cur, ref, 8, r), exact)],
                      csv_path=args.csv, min_iters=3, min_time_s=1.0, warmup=1)
        # FFmpeg works on the luma plane: compare on the same gray frames.
        native_gray = block_match_native(gcur, gref, 8, r)[0].numpy()

        def agreement(out, _ref):
            return f"{(out == native_gray).all(-1).mean():.1%} vectors equal native"

        benchmark.run("block_match_luma", f"{args.clip} 31 pairs 224x224 gray u8 block 8 radius {r}",
                      benchmark.Case("native", lambda: block_match_native(gcur, gref, 8, r)),
                      [benchmark.Case("ffmpeg-mestimate-esa", lambda: ffmpeg_esa(gray, 8, r), agreement,
                                      note="PyAV filter graph, includes frame transfer")],
                      csv_path=args.csv, min_iters=3, min_time_s=1.0, warmup=1)


if __name__ == "__main__":
    main()
