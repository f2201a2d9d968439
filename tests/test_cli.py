"""`python train.py` as a user runs it: the demo, wandb offline, skip/force/resume, eval-only,
sweeps, and every bad input ending in a clear message and a non-zero exit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FAST = ["trainer.epochs=3", "trainer.progress=line"]


def run_cli(*args, env_extra=None, home=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1", **(env_extra or {})})
    if home is not None:
        env["HOME"] = str(home)  # no ~/.netrc: wandb has no credentials and must go offline
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_default_demo_with_wandb_offline_leaves_files(tmp_path):
    run_dir = tmp_path / "demo"
    result = run_cli(*FAST, f"hydra.run.dir={run_dir}", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "done: final-epoch test top-1" in result.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results["name"] == "digits_opl" and results["metrics"]["final_epoch_test"]["top1"] > 80.0
    assert results["config"]["loss"]["gamma"] == 0.5 and results["data_variant"].startswith("digits/sklearn")
    assert results["environment"]["torch"] and "commit" in results["code"]
    assert (run_dir / "DONE").exists()
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    records = b"".join(p.read_bytes() for p in offline[0].glob("run-*.wandb"))
    # The run file holds the resolved config and the per-epoch metrics, ready for `wandb sync`.
    assert b"neg_abs" in records and b"elementwise" in records and b"test_top1" in records

    # Running the finished configuration again does nothing...
    before = (run_dir / "results.json").read_text()
    again = run_cli(*FAST, f"hydra.run.dir={run_dir}", "logger=none")
    assert again.returncode == 0 and "already finished" in again.stdout
    assert (run_dir / "results.json").read_text() == before
    # ...unless forced; the old files are moved aside, not lost.
    forced = run_cli(*FAST, f"hydra.run.dir={run_dir}", "logger=none", "force=true")
    assert forced.returncode == 0, forced.stderr
    superseded = list(run_dir.glob("superseded-*"))
    assert len(superseded) == 1 and (superseded[0] / "results.json").read_text() == before

    # Evaluate the checkpoint alone: the same final test accuracy.
    ckpt = run_dir / "last.pt"
    evaluated = run_cli(f"hydra.run.dir={tmp_path / 'eval'}", "logger=none", "eval_only=true", f"ckpt_path={ckpt}")
    assert evaluated.returncode == 0, evaluated.stderr
    (written,) = (tmp_path / "eval").glob("eval-last-*.json")  # one file per evaluated checkpoint
    metrics = json.loads(written.read_text())["metrics"]
    final = json.loads((run_dir / "results.json").read_text())["metrics"]["final_epoch_test"]
    assert metrics["test_top1"] == pytest.approx(final["top1"])


def test_wandb_disabled_by_environment(tmp_path):
    result = run_cli("trainer.epochs=1", f"hydra.run.dir={tmp_path}", env_extra={"WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr
    assert not list((tmp_path / "wandb").glob("offline-run-*"))
    assert (tmp_path / "metrics.jsonl").exists()


def test_gamma_sweep_runs_one_folder_per_value(tmp_path):
    result = run_cli("-m", "sweep=gamma", "trainer.epochs=1", "logger=none", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    gammas = sorted(json.loads(p.read_text())["config"]["loss"]["gamma"] for p in tmp_path.glob("**/results.json"))
    assert gammas == [0.1, 0.25, 0.5, 1.0, 2.0]


def test_resume_continues_interrupted_run(tmp_path):
    first = run_cli("trainer.epochs=2", f"hydra.run.dir={tmp_path}", "logger=none")
    assert first.returncode == 0
    (tmp_path / "DONE").unlink()  # as if the process died before finishing
    (tmp_path / "results.json").unlink()
    again = run_cli("trainer.epochs=2", f"hydra.run.dir={tmp_path}", "logger=none")
    assert again.returncode == 0 and "resuming" in again.stdout and (tmp_path / "DONE").exists()
    refused = run_cli("trainer.epochs=2", f"hydra.run.dir={tmp_path / 'x'}", "logger=none", "resume=maybe")
    assert refused.returncode == 2 and "resume='maybe': expected auto or never" in refused.stderr


def assert_clear_failure(result, *fragments):
    assert result.returncode != 0
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_config_choice_names_the_valid_ones():
    result = run_cli("model=resnet57")
    assert result.returncode != 0
    assert "resnet57" in result.stderr and "resnet56" in result.stderr and "resnet110" in result.stderr
    typo = run_cli("loss.gama=1.0")
    assert typo.returncode != 0 and "gama" in typo.stderr


def test_missing_dataset_names_path_and_fix(tmp_path):
    result = run_cli("experiment=cifar100_opl", f"dataset.root={tmp_path}", "dataset.download=false",
                     f"hydra.run.dir={tmp_path / 'run'}", "logger=none")
    assert_clear_failure(result, str(tmp_path / "cifar-100-python"), "dataset.download=true")
    jpg = run_cli("dataset=cifar10_jpg", "model=resnet20", f"hydra.run.dir={tmp_path / 'run2'}", "logger=none")
    assert_clear_failure(jpg, "dataset.root is not set")


def test_corrupt_checkpoint_in_run_dir_is_not_overwritten(tmp_path):
    first = run_cli("trainer.epochs=1", f"hydra.run.dir={tmp_path}", "logger=none")
    assert first.returncode == 0
    (tmp_path / "DONE").unlink()
    (tmp_path / "last.pt").write_bytes(b"corrupted")
    result = run_cli("trainer.epochs=1", f"hydra.run.dir={tmp_path}", "logger=none")
    assert_clear_failure(result, "corrupt")
    assert (tmp_path / "last.pt").read_bytes() == b"corrupted"
    mismatched = run_cli("trainer.epochs=1", "loss.gamma=2.0", f"hydra.run.dir={tmp_path}", "logger=none")
    assert_clear_failure(mismatched, "another configuration", "loss.gamma")


def test_impossible_values_exit_nonzero(tmp_path):
    assert_clear_failure(run_cli("loss.gamma=-1", f"hydra.run.dir={tmp_path / 'a'}", "logger=none"), "gamma must be >= 0")
    assert_clear_failure(run_cli("trainer.batch_size=1", f"hydra.run.dir={tmp_path / 'b'}", "logger=none"),
                         "batch_size must be >= 2")
    assert_clear_failure(run_cli("loss.neg_abs=sometimes", f"hydra.run.dir={tmp_path / 'c'}", "logger=none"), "neg_abs")
    assert_clear_failure(run_cli("eval_only=true", f"hydra.run.dir={tmp_path / 'd'}", "logger=none"), "ckpt_path")


def test_real_cifar10_subset_trains_above_chance(cifar10_jpg_root, tmp_path):
    """The real CIFAR-10 JPEG images, the cifar10_opl recipe shortened for a CPU: well above 10%."""
    result = run_cli(
        "experiment=cifar10_opl", "dataset=cifar10_jpg", f"dataset.root={cifar10_jpg_root}",
        "dataset.limit_train=2500", "dataset.limit_test=500", "dataset.val_fraction=0", "model=resnet20",
        "trainer.epochs=3", "trainer.eval_every=3", "trainer.num_workers=2", "sched=cosine", "optim.lr=0.05",
        "trainer.test_selection_after_epoch=null", "trainer.progress=line", "logger=none", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["data_variant"] == "cifar10/jpeg-q75|train=2500@0|test=500@0"
    assert results["metrics"]["final_epoch_test"]["top1"] > 20.0


def test_a_failed_job_of_a_joblib_sweep_fails_the_sweep_after_the_others_ran(tmp_path):
    """hydra/launcher=gpus runs jobs in joblib's worker processes: the failure must still reach the
    sweep's status, without stopping the job running beside it."""
    result = run_cli("-m", "hydra/launcher=gpus", "hydra.launcher.n_jobs=2", "experiment=digits_opl",
                     "loss.gamma=-1,0.5", "logger=none", "trainer.epochs=1", "dataset.limit_train=300", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 1, result.stderr
    assert "error: OPL gamma must be >= 0, got -1" in result.stderr  # the job's own line
    assert "error: this job of the sweep failed (its message is above)" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "seed0" / "dataset.limit_train-300+loss.gamma-0.5+trainer.epochs-1" / "DONE").exists()


def test_how_a_failed_job_ends_follows_its_launcher():
    import train
    from opl.engine.distributed import DistributedContext

    one, ranks = DistributedContext(), DistributedContext(1, 2)
    assert train.failure_policy(False, train.IN_PROCESS_LAUNCHER, one) == "exit"  # a single run
    assert train.failure_policy(True, train.IN_PROCESS_LAUNCHER, one) == "defer"  # the summary at the end
    assert train.failure_policy(True, train.POOL_LAUNCHER, one) == "raise"  # hydra/launcher=gpus
    slurm = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert train.failure_policy(True, slurm, one) == "exit"  # each job its own SLURM job: its status counts
    assert train.failure_policy(True, train.IN_PROCESS_LAUNCHER, ranks) == "exit"  # a rank must fail its job step


def test_sweep_finishes_every_job_despite_a_failure_and_reruns_skip_finished_ones(tmp_path):
    sweep = ["-m", "experiment=digits_opl", "loss.gamma=-1,0.5", "logger=none", "trainer.epochs=1",
             "trainer.progress=line", f"hydra.sweep.dir={tmp_path}"]
    first = run_cli(*sweep)
    assert first.returncode == 2 and "OPL gamma must be >= 0, got -1" in first.stderr and "Traceback" not in first.stderr
    # Sibling folders named so a path needs no quoting (ckpt_path=...); the failed job left none.
    assert sorted(p.name for p in (tmp_path / "seed0").iterdir()) == ["loss.gamma-0.5+trainer.epochs-1"]
    finished = tmp_path / "seed0" / "loss.gamma-0.5+trainer.epochs-1"
    assert (finished / "DONE").exists() and (finished / "results.json").exists()
    before = (finished / "results.json").read_bytes()
    again = run_cli(*sweep)
    assert again.returncode != 0 and "already finished" in again.stdout
    assert (finished / "results.json").read_bytes() == before
