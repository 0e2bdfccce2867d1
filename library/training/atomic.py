"""Atomic file and folder writes: a crash, `kill -9` or full disk during a save leaves the previous file intact.

Write to a temporary sibling, fsync it, then rename over the final name (rename is atomic on POSIX within one
file system), then fsync the directory so the rename itself survives a power cut. When the write fails because
of the disk (full, quota, file-size limit, read-only), the temporary files go and the error is one line naming
the file, the OS reason and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import resource
import shutil
from collections.abc import Iterator
from pathlib import Path

from library.errors import ConfigError

_WHAT_TO_DO = "free some space or pick another --output_dir"
_LOW_SPACE = 1 << 20  # a write that failed with less than this left failed for lack of space
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")  # how safetensors' Rust writer reports an io::Error


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _follow_umask(path: Path) -> None:
    """safetensors creates its files 0600; a shared output (a ComfyUI service account) needs the user's umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _largest_file(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return max((f.stat().st_size for f in path.rglob("*") if f.is_file()), default=0)


def disk_failure_reason(exc: BaseException, written: Path) -> str | None:
    """The OS reason a write into `written` (a file or folder) failed, or None when the disk is not the cause.

    OSError carries it. safetensors and torch.save do not raise OSError: safetensors puts "os error N" in its
    text, torch's zip writer only says "unexpected pos"; for those the file system itself is asked. Anything
    else (a bug, a bad tensor) is not a disk failure and must surface unchanged.
    """
    if isinstance(exc, OSError):
        if exc.errno == errno.EFBIG:
            return _size_limit_reason()
        return exc.strerror or str(exc)
    if not isinstance(exc, Exception):
        return None
    found = _OS_ERROR_IN_TEXT.search(str(exc))
    if found:
        code = int(found.group(1))
        return _size_limit_reason() if code == errno.EFBIG else os.strerror(code)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    with contextlib.suppress(OSError):
        if limit != resource.RLIM_INFINITY and _largest_file(written) >= limit:
            return _size_limit_reason()
    folder = written.parent
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < _LOW_SPACE:
            return os.strerror(errno.ENOSPC)
    with contextlib.suppress(OSError):
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS)
    if not os.access(folder, os.W_OK):
        return os.strerror(errno.EACCES)
    return None


def _size_limit_reason() -> str:
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return f"{os.strerror(errno.EFBIG)} (the file size limit, ulimit -f, is {limit} bytes)"


def _remove_temporaries(tmp: Path) -> None:
    """`tmp` and anything a writer staged beside it under a longer name (e.g. its own `<tmp>.tmp`)."""
    for path in tmp.parent.glob(f"{glob.escape(tmp.name)}*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def _disk_error(exc: BaseException, tmp: Path, final: Path, kind: str) -> ConfigError | None:
    """The one-line error for a save that failed for lack of disk (None when `exc` is something else)."""
    reason = disk_failure_reason(exc, tmp)
    if reason is None:
        return None
    kept = f"the previous {kind} is unchanged" if final.exists() else f"no partial {kind} is left"
    return ConfigError(f"could not write {final}: {reason}; {kept}; {_advice(reason)}")


def _advice(reason: str) -> str:
    if "size limit" in reason:
        return "raise the file size limit (ulimit -f) or pick another --output_dir"
    if reason == os.strerror(errno.ENAMETOOLONG):
        return "use a shorter --output_name"
    if reason in (os.strerror(errno.EACCES), os.strerror(errno.EROFS)):
        return "pick a writable --output_dir"
    return _WHAT_TO_DO


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to `final`; on success it replaces `final` atomically."""
    final = Path(final)
    tmp = final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}")  # keep the suffix: writers pick the format from it
    try:
        yield tmp
        _follow_umask(tmp)
        _fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except Exception as exc:
        error = _disk_error(exc, tmp, final, "file")
        if error is None:
            raise
        raise error from None
    finally:
        _remove_temporaries(tmp)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces the folder `final` (old one removed only afterwards)."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except Exception as exc:
        if old.exists() and not final.exists():
            os.replace(old, final)
        error = _disk_error(exc, tmp, final, "folder")
        if error is None:
            raise
        raise error from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def check_writable(directory: Path) -> None:
    """Fail at start, not at the first save, when the output folder cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--output_dir {directory}: not writable ({exc.strerror or exc})") from None


_LONGEST_SUFFIX = "-step00000000-lastgood.tmp-4194304.safetensors"  # the longest name a run writes, less the name


def check_output_names(directory: Path, output_name: str) -> None:
    """Every file name the run will write must fit the file system, or the LoRA is lost at the first save."""
    try:
        limit = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = len(f".{output_name}{_LONGEST_SUFFIX}".encode())
    if longest > limit:
        room = limit - len(f".{_LONGEST_SUFFIX}".encode())
        raise ConfigError(f"--output_name {output_name[:24]}...: {len(output_name.encode())} bytes; the run's file "
                          f"names would reach {longest} bytes, over the file system's limit of {limit}; use at most "
                          f"{room} bytes")
