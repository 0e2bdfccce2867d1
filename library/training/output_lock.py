"""One run per output name: a second run into the same --output_dir/--output_name stops at start.

An advisory `flock` on `.<output_name>.lock` in the output folder, held for the run's lifetime; the kernel drops
it when the process ends however it ends, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from library.errors import ConfigError


class OutputLock:
    def __init__(self, output_dir: Path, output_name: str):
        self.path = Path(output_dir) / f".{output_name}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"--output_dir {self.path.parent}: another run (pid {holder}) is writing "
                              f"--output_name {self.path.name[1:-5]} there now; wait for it or use another "
                              "--output_name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # still holding the lock: no other run can be between its open and its flock
        os.close(self._fd)
        self._fd = None
