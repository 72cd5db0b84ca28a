"""Where ``vpure run`` writes its records: one JSON line per clip, whole or not at all.

A record is one ``os.write`` of the complete line (repeated only if the kernel takes part
of it). If the write fails (disk full, file-size limit, ``/dev/full``), the part that
reached the file is cut off again, so the file ends on a whole record, and
:class:`OutputError` ends the run. A file that already ends on a torn line (a process
killed mid-write) gets a newline first, so the next record starts on a line of its own.
Standard output is written the same way, unbuffered; a reader that goes away (``| head``)
is :class:`OutputClosed`, which the command line ends on quietly, as Unix tools do.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import ConfigError, VpureError


class OutputError(VpureError):
    """Records could not be written; the run stops with what was written intact."""


class OutputClosed(OutputError):
    """The reader of standard output went away (a closed pipe)."""


class RecordSink:
    """A text sink taking whole lines (``write(line)``): a file opened for appending, or a
    file descriptor such as standard output's."""

    def __init__(self, fd: int, name: str, *, owns_fd: bool):
        self.fd, self.name, self._owns = fd, name, owns_fd
        self._regular = stat.S_ISREG(os.fstat(fd).st_mode)

    @classmethod
    def append_to(cls, path: str | Path) -> "RecordSink":
        """Open ``path`` for appending, creating it and its folder; refused with a
        :class:`ConfigError` naming the path when it cannot hold records (a folder, a path
        under a file, an unwritable place). Call before loading any model."""
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"--out {path} is a folder; give a file to append records to")
        above = next((a for a in path.parents if a.exists()), None)
        if above is not None and not above.is_dir():
            raise ConfigError(f"--out {path} lies under {above}, which is a file, not a folder")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise ConfigError(f"--out {path} cannot be written: {e.strerror or e}") from None
        sink = cls(fd, str(path), owns_fd=True)
        sink._end_torn_line()
        return sink

    @classmethod
    def stdout(cls) -> "RecordSink":
        return cls(1, "standard output", owns_fd=False)

    def _end_torn_line(self) -> None:
        if not self._regular:
            return
        size = os.fstat(self.fd).st_size
        if not size:
            return
        fd = os.open(self.name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            last = os.pread(fd, 1, size - 1)
        finally:
            os.close(fd)
        if last != b"\n":
            self._write_all(b"\n")

    def _write_all(self, data: bytes) -> None:
        start = os.fstat(self.fd).st_size if self._regular else None
        done = 0
        try:
            while done < len(data):
                done += os.write(self.fd, data[done:])
        except BrokenPipeError:
            raise OutputClosed(f"{self.name} was closed by its reader") from None
        except OSError as e:
            if done and start is not None and os.fstat(self.fd).st_size == start + done:
                os.ftruncate(self.fd, start)  # only our own partial line (no other writer appended since)
            what = "the disk is full" if e.errno == errno.ENOSPC else \
                "the file-size limit was reached" if e.errno == errno.EFBIG else e.strerror or str(e)
            raise OutputError(f"writing a record to {self.name} failed: {what}") from None

    def write(self, line: str) -> int:
        self._write_all(line.encode())
        return len(line)

    def flush(self) -> None:  # every write is already in the kernel's hands
        return None

    def close(self) -> None:
        if self._owns and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "RecordSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
