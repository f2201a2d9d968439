"""One run directory per configuration: resume, skip-when-done and forced re-runs.

Files: `run_config.json` (the configuration that owns the folder), `last.pt`, `best_val.pt`,
`metrics.jsonl`, `results.json` and the `DONE` marker written last.
"""

import json
import os
import time
from pathlib import Path

from opl.errors import CheckpointError, ConfigError
from opl.io import atomic_write_json, atomic_write_text

RUN_FILES = ("run_config.json", "last.pt", "best_val.pt", "metrics.jsonl", "results.json", "DONE", "wandb_id.txt", "wandb")


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_file = self.path / "run_config.json"
        self.checkpoint = self.path / "last.pt"
        self.results = self.path / "results.json"
        self.done_marker = self.path / "DONE"

    def is_done(self) -> bool:
        return self.done_marker.exists()

    def claim(self, config: dict) -> None:
        """Record `config` as this folder's owner, or refuse if another configuration owns it."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.config_file.exists():
            previous = json.loads(self.config_file.read_text())
            differences = _diff(previous, config)
            if differences:
                raise ConfigError(
                    f"{self.path} belongs to a run with another configuration ({'; '.join(differences[:5])}). "
                    "Choose another hydra.run.dir, or pass force=true to move the old run aside.")
            return
        atomic_write_json(self.config_file, config)

    def archive(self) -> Path | None:
        """Move an earlier run's files into `superseded-<time>/` (force=true): nothing is deleted."""
        present = [self.path / name for name in RUN_FILES if (self.path / name).exists()]
        if not present:
            return None
        target = self.path / time.strftime("superseded-%Y%m%d-%H%M%S")
        target.mkdir()
        for item in present:
            os.replace(item, target / item.name)
        return target

    def decide(self, resume: str, force: bool) -> str:
        """"skip" (finished), "resume" (checkpoint present) or "fresh"."""
        if resume not in ("auto", "never"):
            raise ConfigError(f"resume must be 'auto' or 'never', got {resume!r}")
        if force:
            return "fresh"
        if self.is_done():
            return "skip"
        if self.checkpoint.exists():
            if resume == "never":
                raise CheckpointError(f"{self.checkpoint} exists and resume=never; pass resume=auto to continue it "
                                      "or force=true to start over (the old files are kept aside)")
            return "resume"
        return "fresh"

    def write_results(self, results: dict) -> None:
        atomic_write_json(self.results, results)
        atomic_write_text(self.done_marker, time.strftime("%Y-%m-%dT%H:%M:%S%z\n"))
