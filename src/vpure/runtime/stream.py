"""Frames from a video file, a folder of images or a stream URL, decoded on a separate thread.

Threading model: one decode thread per input demuxes and decodes (PyAV releases the GIL
while FFmpeg works), converts each kept frame to the models' size (crop/resize policy) and
puts it on a bounded queue; the inference thread takes frames off the queue and cuts
windows. The bound (``queue_frames``) caps memory and applies back-pressure: a slow
defence slows decoding, it never buffers a whole file. While the queue is empty (a live
source between frames) the inference thread labels the frames it already has for the
detection gate (``Runner``), so a clean window's latency is the recogniser's plus the last
frame's label; ``realtime`` plays a file at its frame rate to reproduce that.

Robustness: a packet that fails to decode is counted and skipped (``decode_errors``); a
frame of another size goes through the same crop/resize as every frame, and each change
of size is logged once and counted (``size_changes``); frames smaller than
``min_input_size`` are not upscaled into a clip but skipped and counted (``too_small``);
an input that cannot be opened raises :class:`InputError` at once; too many consecutive
decode errors end the stream with a clear message; a file that ends before the frame
count its container declares says so; a stream that sends nothing for ``read_timeout_s``
ends with that reason.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import ConfigBase, check
from .errors import InputError
from .log import get_logger
from .video import open_video

log = get_logger(__name__)

RESIZE_POLICIES = ("center_crop", "resize", "pad")
DEFAULT_SIZE = 64  # read outside a deployment (the mini-world's)
MAX_SIZE = 1024  # the models' input side: larger is no recogniser's input and an allocation hazard
MAX_QUEUE_FRAMES = 4096
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
URL_SCHEMES = ("rtsp://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")


@dataclass(frozen=True)
class StreamConfig(ConfigBase):
    """How frames are taken from the input and brought to the models' input size."""

    size: int | None = None  # frames are size x size after the policy (None: the deployment's, else 64)
    resize: str = "center_crop"  # center_crop: square centre crop then area resize; resize: squash; pad: letterbox
    frame_step: int = 1  # keep every k-th decoded frame (frame sampling rate = source fps / k)
    queue_frames: int = 64  # bound of the decode queue
    max_consecutive_errors: int = 25  # decode errors in a row that end the stream
    # Hand frames over at their presentation times, as a live camera delivers them: a file
    # played as a stream (testing a box, benchmarking live latency). Stream URLs are paced
    # by their source already.
    realtime: bool = False
    # Frames whose shorter side is below this are refused (a 1x1 video upscaled to the
    # model's size would be labelled as if it were footage).
    min_input_size: int = 16
    read_timeout_s: float = 10.0  # a stream URL that sends nothing this long has stalled

    def validate(self) -> None:
        check(self.size is None or 8 <= self.size <= MAX_SIZE,
              f"StreamConfig.size must be in [8, {MAX_SIZE}], got {self.size}")
        check(1 <= self.min_input_size <= 4096, f"StreamConfig.min_input_size must be in [1, 4096], got "
                                                f"{self.min_input_size}")
        check(0 < self.read_timeout_s <= 600, f"StreamConfig.read_timeout_s must be in (0, 600], got {self.read_timeout_s}")
        check(self.resize in RESIZE_POLICIES, f"StreamConfig.resize {self.resize!r} is not one of {RESIZE_POLICIES}")
        check(self.frame_step >= 1, f"StreamConfig.frame_step must be >= 1, got {self.frame_step}")
        check(1 <= self.queue_frames <= MAX_QUEUE_FRAMES,
              f"StreamConfig.queue_frames must be in [1, {MAX_QUEUE_FRAMES}], got {self.queue_frames}")
        check(self.max_consecutive_errors >= 1, "StreamConfig.max_consecutive_errors must be >= 1")

    @property
    def frame_size(self) -> int:
        return self.size or DEFAULT_SIZE


@dataclass
class Frame:
    index: int  # index among kept frames
    time_s: float  # presentation time in seconds (index / fps for image folders)
    rgb: np.ndarray  # (size, size, 3) uint8


@dataclass
class StreamStats:
    decoded: int = 0
    kept: int = 0
    decode_errors: int = 0
    size_changes: int = 0
    too_small: int = 0  # frames below min_input_size, skipped
    declared_frames: int = 0  # what the container says it holds (0: unknown, a stream)
    first_size: tuple[int, int] | None = None
    last_size: tuple[int, int] | None = None
    error_messages: list[str] = field(default_factory=list)
    ended_by: str = ""


def fit_frame(rgb: np.ndarray, size: int, policy: str) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 by ``policy``."""
    import cv2

    h, w = rgb.shape[:2]
    if policy == "center_crop":
        s = min(h, w)
        rgb = rgb[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    elif policy == "pad":
        s = max(h, w)
        canvas = np.zeros((s, s, 3), np.uint8)
        canvas[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = rgb
        rgb = canvas
    interp = cv2.INTER_AREA if min(rgb.shape[:2]) >= size else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(rgb, (size, size), interpolation=interp))


def is_url(source: str) -> bool:
    return str(source).lower().startswith(URL_SCHEMES)


def _raw_frames_av(source: str, stats: StreamStats, cfg: StreamConfig) -> Iterator[tuple[float, np.ndarray]]:
    import av

    url = is_url(source)
    with open_video(source, timeout=cfg.read_timeout_s if url else None) as container:
        stream = container.streams.video[0]
        stats.declared_frames = 0 if url else int(stream.frames or 0)
        stream.thread_type = "AUTO"
        tb = float(stream.time_base) if stream.time_base else 0.0
        fps = float(stream.average_rate) if stream.average_rate else 25.0
        in_a_row = 0
        demux = container.demux(stream)
        while True:
            try:
                packet = next(demux)
            except StopIteration:
                break
            except av.error.FFmpegError as e:  # a broken container mid-file, or a stalled stream
                stats.decode_errors += 1
                stats.error_messages.append(f"demux: {e}")
                stats.ended_by = (f"the stream sent nothing for {cfg.read_timeout_s:g} s (read timeout)"
                                  if url and isinstance(e, av.error.ExitError) else f"demux error: {e}")
                return
            try:
                frames = packet.decode()
                in_a_row = 0
            except av.error.FFmpegError as e:
                stats.decode_errors += 1
                in_a_row += 1
                if len(stats.error_messages) < 20:
                    stats.error_messages.append(str(e))
                log.warning("%s: skipped a packet that failed to decode (%s)", source, e)
                if in_a_row >= cfg.max_consecutive_errors:
                    stats.ended_by = f"{in_a_row} consecutive decode errors"
                    raise InputError(f"{source}: {in_a_row} consecutive decode errors; giving up ({e})") from None
                continue
            for f in frames:
                t = float(f.pts * tb) if f.pts is not None and tb else stats.decoded / fps
                yield t, f.to_ndarray(format="rgb24")


def _raw_frames_folder(folder: Path, stats: StreamStats, fps: float = 25.0) -> Iterator[tuple[float, np.ndarray]]:
    import cv2

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    stats.declared_frames = len(files)
    for i, p in enumerate(files):
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            stats.decode_errors += 1
            stats.error_messages.append(f"unreadable image {p.name}")
            log.warning("skipped unreadable image %s", p)
            continue
        yield i / fps, cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if stats.decoded == 0:
        raise InputError(f"folder {folder}: none of its {len(files)} images could be read")


def frames(source: str | Path, cfg: StreamConfig, stats: StreamStats | None = None) -> Iterator[Frame]:
    """Kept, resized frames of ``source`` on the calling thread (see :class:`DecodeThread`)."""
    stats = stats if stats is not None else StreamStats()
    src = str(source)
    path = Path(src)
    if path.is_dir():
        raw = _raw_frames_folder(path, stats)
    elif is_url(src) or path.is_file():
        raw = _raw_frames_av(src, stats, cfg)
    else:
        raise InputError(f"input {src} is neither a file, a folder of frames nor a stream URL")
    for t, rgb in raw:
        i = stats.decoded
        stats.decoded += 1
        shape = rgb.shape[:2]
        if stats.first_size is None:
            stats.first_size = shape
        elif shape != stats.last_size:  # once per change, not per frame
            stats.size_changes += 1
            log.warning("from frame %d on, frames are %dx%d (were %dx%d); resized by the same policy",
                        i, shape[1], shape[0], stats.last_size[1], stats.last_size[0])
        stats.last_size = shape
        if min(shape) < cfg.min_input_size:
            if stats.too_small == 0:
                log.warning("%s: frame %d is %dx%d, below the minimum input size of %d px; such frames are "
                            "skipped, not upscaled", src, i, shape[1], shape[0], cfg.min_input_size)
            stats.too_small += 1
            continue
        if i % cfg.frame_step:
            continue
        yield Frame(stats.kept, t, fit_frame(rgb, cfg.frame_size, cfg.resize))
        stats.kept += 1
    if stats.kept == 0 and stats.too_small:
        raise InputError(f"{src}: every frame is smaller than the minimum input size of {cfg.min_input_size} px "
                         f"(first {stats.first_size[1]}x{stats.first_size[0]}); stream.min_input_size sets it")
    if not stats.ended_by:
        stats.ended_by = "end of input"
        if stats.declared_frames and stats.decoded + stats.decode_errors < stats.declared_frames - 1:
            stats.ended_by = (f"input ended early: {stats.decoded} frames decoded of the {stats.declared_frames} "
                              "its container declares (a truncated or damaged file)")
            log.warning("%s: %s", src, stats.ended_by)


_END = object()


class DecodeThread:
    """Decodes ``source`` on a daemon thread into a bounded queue; iterate to receive frames.

    An error on the decode thread is re-raised on the consumer's side; :meth:`stop` ends it
    early (Ctrl-C, or the consumer giving up).
    """

    def __init__(self, source: str | Path, cfg: StreamConfig):
        self.source, self.cfg = source, cfg
        self.stats = StreamStats()
        self._q: queue.Queue = queue.Queue(maxsize=cfg.queue_frames)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="vpure-decode", daemon=True)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        start = first = None
        try:
            for f in frames(self.source, self.cfg, self.stats):
                if self.cfg.realtime:
                    if start is None:
                        start, first = time.monotonic(), f.time_s
                    due = start + (f.time_s - first) - time.monotonic()
                    if due > 0 and self._stop.wait(due):
                        return
                if not self._put(f):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def start(self) -> "DecodeThread":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def waiting(self) -> bool:
        """True when no frame is ready: the consumer's next step would wait for the source
        (a live stream between frames), so work done now costs no latency."""
        return self._q.empty()

    def __iter__(self) -> Iterator[Frame]:
        if not self._thread.is_alive() and not self._stop.is_set() and self._q.empty():
            self.start()
        while True:
            item = self._q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Windows:
    """Sliding windows of ``length`` frames every ``stride`` kept frames, into reused buffers.

    ``push(frame)`` returns a window (ids, start time, clip (1, 3, T, S, S) float in [0, 1]) when
    one is complete, else None. The float clip is one preallocated tensor, rewritten per
    window: consume it (or clone it) before the next push.
    """

    def __init__(self, length: int, stride: int, size: int):
        if length < 2 or stride < 1:
            raise InputError(f"windows need length >= 2 and stride >= 1, got {length}, {stride}")
        self.length, self.stride = length, stride
        self._ring = torch.empty(length, size, size, 3, dtype=torch.uint8)
        self._ids = [0] * length
        self._times = [0.0] * length
        self._count = 0
        self._clip = torch.empty(1, 3, length, size, size)

    def push(self, frame: Frame):
        slot = self._count % self.length
        self._ring[slot] = torch.from_numpy(frame.rgb)
        self._ids[slot], self._times[slot] = frame.index, frame.time_s
        self._count += 1
        if self._count < self.length or (self._count - self.length) % self.stride:
            return None
        order = self._slots(self.length)
        torch.div(self._ring[order].permute(3, 0, 1, 2), 255.0, out=self._clip[0])
        return [self._ids[k] for k in order], self._times[order[0]], self._clip

    def recent(self, n: int) -> tuple[list[int], torch.Tensor]:
        """The ids and the (1, 3, n, S, S) float clip of the last ``n`` pushed frames (at most
        the window's length), computed as :meth:`push` computes a window: a new tensor."""
        order = self._slots(min(n, self._count, self.length))
        return [self._ids[k] for k in order], (self._ring[order].permute(3, 0, 1, 2) / 255.0)[None]

    def _slots(self, n: int) -> list[int]:
        """Ring slots of the last ``n`` pushed frames, oldest first."""
        return [(self._count - n + k) % self.length for k in range(n)]


def window_count(frames_kept: int, length: int, stride: int) -> int:
    """Windows a stream of ``frames_kept`` frames yields: 0 if shorter than one window."""
    return 0 if frames_kept < length else (frames_kept - length) // stride + 1
