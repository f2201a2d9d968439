"""Atomic file writes: a crash leaves either the old file or the new one, never half of either.

Files get the mode a plain `open()` would give them (0666 minus the user's umask), so a group can
share run folders. A failed write raises `OSError` naming the TARGET file (not the temporary one)
with the errno of the cause, e.g. ENOSPC from inside `torch.save`.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

TEMPORARY_SUFFIX = ".tmp"


def current_umask() -> int:
    """The process umask, read without changing it where Linux exposes it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only read at write time)
    os.umask(mask)
    return mask


def temporary_name_prefix(path: Path) -> str:
    """Temporary files of `atomic_write(path)` are `<prefix>XXXXXXXX.tmp` beside `path`."""
    return f".{path.name}."


def os_error_of(exc: BaseException) -> OSError | None:
    """The OSError behind `exc` (itself, or its cause / context: torch.save wraps ENOSPC in a RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temporary file beside `path`, fsync, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_name_prefix(path), suffix=TEMPORARY_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = os_error_of(exc)
        if cause is not None and not isinstance(exc, KeyboardInterrupt):
            raise OSError(cause.errno, cause.strerror, str(path)) from exc
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append one line with a single write (O_APPEND): a crash leaves at most a partial LAST line."""
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(28, os.strerror(28), str(path))  # a short write: the disk is full
        finally:
            os.close(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
