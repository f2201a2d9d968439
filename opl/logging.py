"""Run logging: an always-written `metrics.jsonl`, optional wandb, and terminal progress.

wandb is imported only when used. Its mode is the user's `WANDB_MODE` (or the configured mode)
when set; otherwise "online" if an API key is available and "offline" if not, so it never prompts.
"""

import json
import math
import netrc
import os
import secrets
import sys
from pathlib import Path

from opl.io import atomic_write_text


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


class JsonlWriter:
    """Append one JSON object per line; on resume, drop lines past the restored epoch."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def truncate_after(self, epoch: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("epoch", 0) <= epoch]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(configured: str | None) -> str:
    mode = os.environ.get("WANDB_MODE") or configured or ("online" if has_wandb_credentials() else "offline")
    if mode not in ("online", "offline", "disabled", "shared"):
        raise ValueError(f"wandb mode must be online, offline or disabled, got {mode!r}")
    return mode


class WandbLogger:
    """One wandb run per run directory; a resumed run continues the same wandb run id."""

    def __init__(self, run_dir: str | Path, project: str, name: str, config: dict,
                 mode: str | None = None, entity: str | None = None, tags: list | None = None):
        import wandb

        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_id.txt"
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(6)
            id_file.write_text(run_id)
        self.mode = resolve_wandb_mode(mode)
        self.run = wandb.init(
            project=project, entity=entity, name=name, id=run_id, resume="allow", dir=str(run_dir),
            config=config, mode=self.mode, tags=list(tags or []), settings=wandb.Settings(silent=True),
        )

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def finish(self) -> None:
        self.run.finish()


class Progress:
    """A tqdm bar per epoch on a terminal; one line per epoch otherwise; nothing when "silent"
    (the other processes of a data-parallel run)."""

    def __init__(self, mode: str = "auto"):
        if mode not in ("auto", "bar", "line", "silent"):
            raise ValueError(f"progress must be auto, bar or line, got {mode!r}")
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
