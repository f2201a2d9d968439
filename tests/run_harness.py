"""`python train.py ...` in the test process: the same code path as the command (train.run_job with
the configuration Hydra composes and the folder Hydra creates), without starting Python, torch and
Hydra again for every run."""

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import train

REPO = Path(__file__).resolve().parent.parent
# A short digits run (300 training images, 2 epochs, every epoch evaluated and checkpointed).
FAST = ("logger=none", "trainer.epochs=2", "trainer.eval_every=1", "trainer.progress=line", "dataset.limit_train=300")


def fast(*extra: str) -> list[str]:
    """FAST with `extra` overrides, each replacing FAST's value of the same key."""
    keys = {o.split("=", 1)[0] for o in extra}
    return [o for o in FAST if o.split("=", 1)[0] not in keys] + list(extra)


def compose_job(run_dir: Path, overrides) -> tuple:
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    exclude = list(cfg.hydra.job.config.override_dirname.exclude_keys)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, train.Job(Path(run_dir), exclude, command="python train.py " + " ".join(overrides))


def run_here(run_dir: Path, *overrides) -> int:
    """The exit status `python train.py <overrides> hydra.run.dir=<run_dir>` would have."""
    cfg, job = compose_job(run_dir, overrides)
    Path(run_dir).mkdir(parents=True, exist_ok=True)  # as Hydra does before calling the task
    return train.run_job(cfg, job)


def cli_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def start_cli(*args, stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=cli_env(), stdout=stdout,
                            stderr=subprocess.PIPE, text=True)
