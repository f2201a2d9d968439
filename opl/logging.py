"""Run logging: an always-written `metrics.jsonl`, `train.log`, optional wandb, and terminal progress.

wandb is imported only when used. Its mode comes from `WANDB_MODE`, else the configured mode, else
"auto": online when an API key is available AND the wandb host answers within seconds, offline
otherwise (with one warning), so a run never prompts and never hangs on a missing network. A mode
the user demanded (`online`) that cannot work is a one-line error instead of a silent fallback.
"""

import http.client
import json
import math
import netrc
import os
import secrets
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from opl.errors import ConfigError, RunFolderError
from opl.io import append_line, atomic_write_text

WANDB_MODES = ("online", "offline", "disabled")
PROBE_TIMEOUT_S = 3.0


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


class JsonlWriter:
    """Append one JSON object per line; on resume, drop lines past the restored epoch.

    Each line is one O_APPEND write, so a crash leaves at most a partial LAST line, which
    `truncate_after` drops (with a note); a damaged line anywhere else is an error naming it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def truncate_after(self, epoch: int) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_text(errors="replace").split("\n")
        complete, tail = raw[:-1], raw[-1]  # tail: text after the last newline (a partial write)
        rows, dropped = [], bool(tail.strip())
        for number, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                rows.append((line, json.loads(line)))
            except json.JSONDecodeError:
                if number == len(complete) and not tail.strip():
                    dropped = True  # the last line, cut short and then terminated
                    continue
                raise RunFolderError(f"{self.path}:{number} is not valid JSON; delete that line, or pass force=true "
                                     "to start the run over (the old files are kept aside)") from None
        if dropped:
            print(f"note: dropped the partial last line of {self.path} (a crash during its write)")
        kept = [line for line, row in rows if row.get("epoch", 0) <= epoch]
        if dropped or len(kept) != len(rows):
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        append_line(self.path, json.dumps({k: _json_safe(v) for k, v in record.items()}))


class Tee:
    """Writes to every stream it was given (the terminal and a copy)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return self.streams[0].isatty()


class RunLog:
    """`train.log`: a header per process, then a copy of everything the run prints to stdout (the
    epoch lines, resume notes, the final line); `error()` adds the message a run stops with."""

    def __init__(self, path: str | Path, header: str):
        self.path, self.header = Path(path), header
        self._file = self._stdout = None

    def __enter__(self) -> "RunLog":
        try:
            self._file = open(self.path, "a", buffering=1)
            self._file.write(self.header.rstrip("\n") + "\n")
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
        self._stdout = sys.stdout
        sys.stdout = Tee(self._stdout, self._file)
        return self

    def error(self, message: str) -> None:
        if self._file is not None:
            try:
                self._file.write(message.rstrip("\n") + "\n")
            except OSError:
                pass  # the log is a copy; the message is on stderr already

    def __exit__(self, *exc) -> None:
        sys.stdout = self._stdout
        try:
            self._file.close()
        except OSError:
            pass
        self._file = None


# ------------------------------------------------------------------------------------------ wandb
def wandb_url(environ=os.environ) -> str:
    return environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def has_wandb_credentials(environ=os.environ) -> bool:
    if environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(wandb_url(environ)).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether `url` answers an HTTP request (any status) within `timeout` seconds, name lookup,
    proxy (HTTPS_PROXY) and TLS certificate check included: what wandb itself needs."""
    answered = []

    def ask():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)  # a status code is an answer
        except (OSError, ValueError, http.client.HTTPException):
            pass  # no name, refused, timed out, TLS failure, not HTTP

    probe = threading.Thread(target=ask, daemon=True)
    probe.start()
    probe.join(timeout + 0.5)
    return bool(answered)


def choose_wandb_mode(configured: str | None, environ=os.environ, probe=reachable) -> tuple[str, str | None]:
    """(mode, warning or None). `WANDB_MODE`, else `configured`, else auto. An impossible demanded
    mode, or a mode that is not one of WANDB_MODES, is a ConfigError."""
    source, requested = ("WANDB_MODE", environ["WANDB_MODE"]) if environ.get("WANDB_MODE") else ("logger.mode", configured)
    if requested is not None and requested not in WANDB_MODES:
        raise ConfigError(f"{source}={requested!r} is not a wandb mode: expected online, offline or disabled "
                          "(or leave it unset: online when logged in and reachable, else offline)")
    if requested in ("offline", "disabled"):
        return requested, None
    url = wandb_url(environ)
    if not has_wandb_credentials(environ):
        problem = "no wandb API key (set WANDB_API_KEY or run `wandb login`)"
    elif not probe(url):
        problem = f"{url} did not answer within {PROBE_TIMEOUT_S:g} s (no network?)"
    else:
        return "online", None
    if requested == "online":
        raise ConfigError(f"{source}=online but {problem}; use logger.mode=offline (sync later with `wandb sync`) "
                          "or logger=none")
    return "offline", f"wandb: {problem}; logging offline into the run folder's wandb/ (upload later with `wandb sync`)"


class WandbLogger:
    """One wandb run per run directory; a resumed run continues the same wandb run id.

    `fallback`: when wandb fails to start online, go offline with a warning instead of failing
    (auto mode); a demanded online mode fails with one line.
    """

    def __init__(self, run_dir: str | Path, project: str, name: str, config: dict,
                 mode: str = "offline", entity: str | None = None, tags: list | None = None, fallback: bool = True):
        import wandb

        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_id.txt"
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(6)
            atomic_write_text(id_file, run_id)
        self.mode = mode

        def start(mode):
            return wandb.init(project=project, entity=entity, name=name, id=run_id, resume="allow", dir=str(run_dir),
                              config=config, mode=mode, tags=list(tags or []), settings=wandb.Settings(silent=True))

        try:
            self.run = start(mode)
        except Exception as exc:  # wandb's errors (auth, network, server) have many types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if mode != "online" or not fallback:
                raise ConfigError(f"wandb could not start in {mode} mode ({reason}); use logger.mode=offline "
                                  "or logger=none") from exc
            print(f"wandb: online start failed ({reason}); logging offline instead (upload later with `wandb sync`)",
                  file=sys.stderr)
            self.mode = "offline"
            self.run = start("offline")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


PROGRESS_MODES = ("auto", "bar", "line", "silent")


class Progress:
    """A tqdm bar per epoch on a terminal; one line per epoch otherwise; nothing when "silent"
    (the other processes of a data-parallel run)."""

    def __init__(self, mode: str = "auto"):
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress must be one of {', '.join(PROGRESS_MODES)}, got {mode!r}")
        self.bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.silent = mode == "silent"
        self._tqdm = None

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if self.bar:
            from tqdm import tqdm

            self._tqdm = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True)

    def update(self, steps: int, loss: float) -> None:
        if self._tqdm is not None:
            self._tqdm.update(steps)
            self._tqdm.set_postfix(loss=f"{loss:.4f}")

    def end_epoch(self, line: str) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        if not self.silent:
            print(line, flush=True)
