"""One run directory per configuration: a lock, ownership, resume, skip-when-done and forced re-runs.

Files: `run.lock` (held by the process working in the folder), `run_config.json` (the configuration
and data that own the folder), `last.pt`, `best_val.pt`, `metrics.jsonl`, `train.log`,
`results.json`, the `DONE` marker written last, and `eval-<checkpoint>-<hash>.json` per evaluated
checkpoint. Damaged files are repaired when that is safe (a checkpoint or results that prove who
owns the folder, a results.json re-derived from the final checkpoint); otherwise the error names
the file and the fix.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from opl.errors import ConfigError, RunFolderError
from opl.io import TEMPORARY_SUFFIX, atomic_write_json, atomic_write_text

LOCK_FILE = "run.lock"
ARCHIVE_PREFIX = "superseded-"
CANNOT_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def owner_signature(owner: dict) -> str:
    """What a checkpoint records of the run that wrote it (compared on resume)."""
    return json.dumps(owner, sort_keys=True)


def _read_json(path: Path):
    """The parsed file, or None when it is absent, unreadable as text or not valid JSON."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _describe(holder: dict) -> str:
    return f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {holder.get('since', '?')})"


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_file = self.path / "run_config.json"
        self.checkpoint = self.path / "last.pt"
        self.results = self.path / "results.json"
        self.done_marker = self.path / "DONE"
        self.log_file = self.path / "train.log"
        self.lock_file = self.path / LOCK_FILE
        self._unwritable: OSError | None = None

    def is_done(self) -> bool:
        return self.done_marker.exists()

    # ------------------------------------------------------------------------------ the lock
    @contextlib.contextmanager
    def locked(self):
        """Hold the folder's advisory lock (fcntl.flock, released by the kernel if the process dies).
        A folder held by another live process is a RunFolderError naming the holder; a lock file
        left by a process that died is taken over with a note."""
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            if exc.errno not in CANNOT_WRITE:
                raise
            # A folder nobody can write needs no lock; a run that must write fails at require_writable.
            self._unwritable = OSError(exc.errno, exc.strerror, str(self.lock_file))
            yield self
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read_holder()
                raise RunFolderError(
                    f"{self.path} is in use by {_describe(holder)}: a second run in the same folder would mix "
                    f"their files. Wait for it to finish (or stop it: kill {holder.get('pid', '<pid>')}), then run "
                    "the same command again") from None
            previous = self._read_holder()
            if previous:
                dead = previous.get("host") == socket.gethostname() and not _alive(previous.get("pid"))
                print(f"note: {self.lock_file} was left by {_describe(previous)}, which "
                      f"{'is no longer running' if dead else 'no longer holds it'}; taking it over")
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)
            try:
                yield self
            finally:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)  # released cleanly: an empty lock file is free
        finally:
            os.close(fd)  # closing releases the flock

    def _read_holder(self) -> dict:
        try:
            text = self.lock_file.read_text().strip()
            return json.loads(text) if text else {}
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {"pid": "?", "host": "?", "since": "unknown (unreadable lock file)"}

    def require_writable(self) -> None:
        """Fail now, not after an epoch of training, if the folder cannot be written."""
        if self._unwritable is not None:
            raise self._unwritable

    # ------------------------------------------------------------------------------ housekeeping
    def remove_temporaries(self) -> None:
        """Delete the temporary files of atomic writes killed mid-way (e.g. a half-written checkpoint).
        Only under the lock: then no other process is writing them."""
        leftovers = sorted(p for p in self.path.glob(f".*{TEMPORARY_SUFFIX}") if p.is_file())
        for path in leftovers:
            path.unlink()
        if leftovers:
            print(f"note: removed {len(leftovers)} temporary file(s) left by an interrupted write: "
                  f"{', '.join(p.name for p in leftovers)}")

    def archive(self) -> Path | None:
        """Move every file of an earlier run into `superseded-<time>/` (force=true): nothing is deleted."""
        present = [p for p in sorted(self.path.iterdir())
                   if p.name != LOCK_FILE and not p.name.startswith(ARCHIVE_PREFIX)] if self.path.is_dir() else []
        if not present:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path / f"{ARCHIVE_PREFIX}{stamp}"
        n = 1
        while target.exists():
            n += 1
            target = self.path / f"{ARCHIVE_PREFIX}{stamp}-{n}"
        target.mkdir()
        for item in present:
            os.replace(item, target / item.name)
        return target

    # ------------------------------------------------------------------------------ ownership
    def claim(self, owner: dict) -> None:
        """Record `owner` (configuration and data identity) as this folder's owner, or refuse if
        another one owns it. A damaged or missing run_config.json is rewritten only when nothing in
        the folder belongs to someone else."""
        previous = _read_json(self.config_file) if self.config_file.exists() else None
        if isinstance(previous, dict):
            if "data_variant" not in previous:
                raise ConfigError(f"{self.path} was written by an older version of train.py (its run_config.json "
                                  "has no data identity); pass force=true to start over (the old files are kept "
                                  "aside), or choose another hydra.run.dir")
            differences = _diff(previous, owner)
            if differences:
                raise ConfigError(
                    f"{self.path} belongs to a run with another configuration or other data "
                    f"({'; '.join(differences[:5])}). Choose another hydra.run.dir, or pass force=true to move "
                    "the old run aside.")
            return
        state = "damaged" if self.config_file.exists() else "missing"
        if self.config_file.exists() or self.checkpoint.exists() or self.results.exists():
            self._check_recovered_owner(owner, state)
            print(f"note: {self.config_file} was {state}; rewritten (the folder's checkpoint and results "
                  "agree with this run)")
        atomic_write_json(self.config_file, owner)

    def _check_recovered_owner(self, owner: dict, state: str) -> None:
        from opl.engine.checkpoint import load_checkpoint  # torch only on this rare path

        def refuse(evidence: str):
            raise RunFolderError(f"{self.config_file} is {state} and {evidence} belongs to another configuration "
                                 "or other data; choose another hydra.run.dir, or pass force=true to move the old "
                                 "files aside")

        if self.checkpoint.exists():
            if load_checkpoint(self.checkpoint).get("config_signature") != owner_signature(owner):
                refuse(str(self.checkpoint))
        results = _read_json(self.results)
        if isinstance(results, dict) and results.get("run_owner") not in (None, owner):
            refuse(str(self.results))

    # ------------------------------------------------------------------------------ what to do
    def finished_results(self) -> dict | None:
        results = _read_json(self.results)
        return results if isinstance(results, dict) and isinstance(results.get("metrics"), dict) else None

    def decide(self, resume: str, force: bool) -> str:
        """"skip" (finished), "resume" (checkpoint present) or "fresh"."""
        if resume not in ("auto", "never"):
            raise ConfigError(f"resume must be 'auto' or 'never', got {resume!r}")
        if force:
            return "fresh"
        if self.is_done():
            if self.finished_results() is not None:
                return "skip"
            state = "damaged" if self.results.exists() else "missing"
            if not self.checkpoint.exists():
                raise RunFolderError(f"{self.done_marker} marks the run finished but {self.results} is {state} and "
                                     f"there is no {self.checkpoint.name} to re-derive it from; pass force=true to "
                                     "run it again (the old files are kept aside)")
            print(f"note: {self.results} is {state}; re-deriving it from {self.checkpoint} (no training needed)")
            self.done_marker.unlink()
            return "resume"
        if self.checkpoint.exists():
            if resume == "never":
                raise RunFolderError(f"{self.checkpoint} exists and resume=never; pass resume=auto to continue it "
                                     "or force=true to start over (the old files are kept aside)")
            return "resume"
        return "fresh"

    def write_results(self, results: dict) -> None:
        atomic_write_json(self.results, results)
        atomic_write_text(self.done_marker, time.strftime("%Y-%m-%dT%H:%M:%S%z\n"))

    def eval_file(self, checkpoint: str | Path) -> tuple[Path, str]:
        """A new `eval-<checkpoint stem>-<first 8 hex of its sha256>[-N].json` (never an existing one)
        and the checkpoint's sha256."""
        digest = hashlib.sha256()
        with open(checkpoint, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        sha = digest.hexdigest()
        base = f"eval-{Path(checkpoint).stem}-{sha[:8]}"
        path, n = self.path / f"{base}.json", 1
        while path.exists():
            n += 1
            path = self.path / f"{base}-{n}.json"
        return path, sha


_KEY_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")
_VALUE_SAFE = _KEY_SAFE | {"-"}


def _escape(text: str, safe: frozenset) -> str:
    return "".join(ch if ch in safe else "".join(f"%{b:02X}" for b in ch.encode()) for ch in text)


def folder_name(overrides: list[tuple[str, str]]) -> str:
    """A run folder's last part: `default` without overrides, else sorted `key-value` items joined by
    `+`, every other character written as %XX (`[`, `,`, `=`, `/`, spaces, `+`, `%`, and `-` in
    keys). Distinct overrides give distinct names, and a path ending in one needs no quoting in a
    Hydra override (`ckpt_path=...`) or a shell."""
    if not overrides:
        return "default"
    return "+".join(f"{_escape(k, _KEY_SAFE)}-{_escape(v, _VALUE_SAFE)}" for k, v in sorted(overrides))


def remove_unused_folder(path: str | Path, within: str | Path, since: float) -> None:
    """Undo the folder Hydra created for a run that stopped before using it: remove `path` if it is
    empty and was created after `since` (process start), then its parents alike, strictly inside
    `within` (the working directory). A folder holding anything, or older, stays."""
    path, within = Path(path).absolute(), Path(within).absolute()
    for folder in (path, *path.parents):
        if folder != path and (folder == within or within not in folder.parents):
            return
        try:
            if folder.stat().st_ctime < since:
                return
            folder.rmdir()  # fails unless empty
        except OSError:
            return
