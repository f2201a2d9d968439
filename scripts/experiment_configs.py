"""What `python train.py experiment=<name>` composes today, for the result scripts: collect_results.py
labels each run with its overrides against it, make_tables.py and make_figures.py refuse a record
that it no longer reproduces (`opl.results.records.require_current`).
"""

import functools
import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from opl.results.records import RecordError, require_current, strip_keys

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@functools.lru_cache(maxsize=None)
def _composed(config_dir: str, overrides: tuple[str, ...]) -> str:
    try:
        with initialize_config_dir(config_dir, version_base="1.3"):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    except HydraException as exc:
        raise RecordError(f"`train.py {' '.join(overrides)}` no longer composes ({exc}); its runs cannot be "
                          "labelled or checked: restore the experiment or remove its records") from exc
    excluded = [k for k in cfg.hydra.job.config.override_dirname.exclude_keys if k != "seed"]
    container = OmegaConf.to_container(cfg, resolve=False)
    del container["hydra"]
    # Resolved (e.g. model.num_classes) as the run's own configuration is.
    resolved = OmegaConf.to_container(OmegaConf.create(container), resolve=True)
    return json.dumps(strip_keys(resolved, excluded))


def command_config(*overrides: str, config_dir: Path = CONFIGS) -> dict:
    """The `experiment_config` train.py records for `python train.py <overrides>` (run-control keys
    removed, interpolations resolved); a fresh copy per call."""
    return json.loads(_composed(str(config_dir), tuple(overrides)))


class ExperimentDefaults:
    """The experiment configuration `train.py experiment=<name>` composes today."""

    def __init__(self, config_dir: Path = CONFIGS):
        self.config_dir = config_dir

    def __call__(self, name: str) -> dict:
        return command_config(f"experiment={name}", config_dir=self.config_dir)


def require_current_records(records: list[dict]) -> None:
    """RecordError naming the first record that `experiment=<e>` plus its overrides no longer gives."""
    require_current(records, ExperimentDefaults())
