"""Data-parallel training with the one Trainer: two gloo processes under torchrun on the CPU match one
process with the whole batch; OPL's global scope equals the single-process loss (value and
gradient); only rank 0 writes; a run resumes with another world size; a failing rank ends the job;
sharded evaluation (classification and PGD) of a batch-norm model equals one process evaluating
the checkpoint; a NaN on one rank stops both at the same step; the launcher environments
(torchrun, SLURM, submitit) are read correctly."""

import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from opl.data.digits import digits
from opl.engine.distributed import DistributedContext, expand_nodelist
from opl.engine.evaluate import ClassificationEvaluator
from opl.engine.trainer import Trainer, TrainerConfig
from opl.errors import ConfigError
from opl.eval.adversarial import RobustAccuracy, robust_accuracy
from opl.losses import OrthogonalProjectionLoss, ce_plus_opl
from opl.methods import StandardStep
from opl.models import MLP
from opl.seed import seed_everything

REPO = Path(__file__).resolve().parent.parent
STOP_AFTER = 2
SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
SCHEDULE = {"kind": "multistep", "milestones": [3], "gamma": 0.2, "warmup_epochs": 1}
ROBUST_LIMIT = 37  # odd: rank 0 attacks 19 of these images, rank 1 18, each a part of its first batch
NAN_AT_STEP = 5  # rank 1's loss turns NaN at its 5th step, the first NaN check (log_every=5)


class PlainMLP(nn.Module):
    """No batch norm: its gradient over a batch is the mean of per-sample gradients, so splitting the
    batch over processes (DDP averages) must give the single-process update."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        features = self.body(x)
        return features, self.fc(features)


def make_trainer(run_dir, callbacks=(), epochs=4, batch_norm=False, criterion=None, evaluators=None, **overrides):
    seed_everything(0)
    data = digits(10, [0.3053], [0.3759], limit_train=448, limit_test=200)
    cfg = TrainerConfig(**{"epochs": epochs, "batch_size": 64, "eval_batch_size": 64, "device": "cpu",
                           "num_workers": 0, "progress": "line", **overrides})
    model = MLP(10, 64, (64, 32)) if batch_norm else PlainMLP()
    step = StandardStep(model, criterion or ce_plus_opl(scope="global"))
    return Trainer(cfg, step, data, SGD, SCHEDULE, run_dir, seed=0, callbacks=callbacks, evaluators=evaluators)


def batch_norm_evaluators():
    """Classification, and PGD with no random start (deterministic, so one process must reproduce
    the sharded count exactly) on the first ROBUST_LIMIT test images."""
    return {"classification": ClassificationEvaluator(geometry=False),
            "robust": RobustAccuracy(eps=8.0, step_size=2.0, steps=3, limit=ROBUST_LIMIT, start="none")}


def torchrun(mode: str, out: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "distributed_worker.py"), mode, str(out)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def finished_run(tmp_path_factory, mode: str, folder: str) -> Path:
    """The output folder of a two-process worker run in `mode` that must end with status 0."""
    out = tmp_path_factory.mktemp(folder)
    proc = torchrun(mode, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    return finished_run(tmp_path_factory, "train", "ddp")


def assert_close_weights(a: dict, b: dict) -> None:
    for key, value in a.items():
        assert torch.allclose(value, b[key], atol=2e-5, rtol=1e-4), key


def test_two_processes_with_half_batches_match_one_process(two_process_run, tmp_path):
    single = make_trainer(tmp_path, callbacks=(stop_after(STOP_AFTER),))
    with pytest.raises(Stopped):
        single.fit()
    assert_close_weights(torch.load(two_process_run / "weights_after_stop.pt", weights_only=True), single.model.state_dict())
    # Metrics are global: rank 0's log of the 2-process run equals the single-process one.
    two = [json.loads(line) for line in (two_process_run / "rank0" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in two] == [1, 2]
    for a, b in zip(two, one):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["test_top1"] == b["test_top1"]  # sharded evaluation counts every test image once


def test_only_rank_zero_writes(two_process_run):
    assert {p.name for p in (two_process_run / "rank0").iterdir()} >= {"last.pt", "metrics.jsonl"}
    assert list((two_process_run / "rank1").iterdir()) == []


def test_global_opl_equals_single_process_value_and_gradient(two_process_run):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(8, 5, generator=generator, dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 0, 1, 1, 2, 0])
    loss = OrthogonalProjectionLoss(gamma=0.5)(features, labels)
    loss.backward()
    for rank in (0, 1):
        result = json.loads((two_process_run / f"opl_rank{rank}.json").read_text())
        assert result["loss"] == pytest.approx(loss.item(), rel=1e-12)
        # Every process's copy of the loss sends gradient to these rows; DDP then averages over the 2.
        assert torch.allclose(torch.tensor(result["grad"], dtype=torch.float64) / 2, features.grad[rank::2], atol=1e-12)


def test_resume_with_another_world_size(two_process_run, tmp_path):
    """The 2-process run stopped after epoch 2; one process finishes it like an uninterrupted run."""
    resumed = make_trainer(two_process_run / "rank0")
    resumed.resume(two_process_run / "rank0" / "last.pt")
    assert resumed.state.epoch == STOP_AFTER
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.2)  # epoch 3 is the first decayed one
    resumed.fit()
    uninterrupted = make_trainer(tmp_path)
    uninterrupted.fit()
    assert_close_weights(resumed.model.state_dict(), uninterrupted.model.state_dict())
    epochs = [json.loads(line)["epoch"] for line in (two_process_run / "rank0" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def consistency_run(tmp_path_factory):
    return finished_run(tmp_path_factory, "consistency", "ddp_consistency")


def test_sharded_evaluation_of_batch_norm_equals_one_process_on_the_checkpoint(consistency_run, tmp_path):
    """After the last step each rank's BN statistics include its own batch; the evaluation must still
    be of one model: rank 0's, the one last.pt holds (what eval_only reproduces)."""
    before = [torch.tensor(json.loads((consistency_run / f"running_mean_rank{r}.json").read_text())) for r in (0, 1)]
    assert not torch.allclose(before[0], before[1], atol=1e-4)  # the ranks did hold different statistics
    logged = json.loads((consistency_run / "rank0" / "metrics.jsonl").read_text().splitlines()[-1])
    rank1 = json.loads((consistency_run / "evaluation_rank1.json").read_text())
    single = make_trainer(tmp_path, epochs=1, batch_norm=True, evaluators=batch_norm_evaluators())
    single.load_weights(consistency_run / "rank0" / "last.pt")
    expected = single.evaluate_all()
    for evaluation in (logged, rank1):
        assert evaluation["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-5)
        assert evaluation["test_top1"] == expected["test_top1"]
        # PGD over the first ROBUST_LIMIT images of the whole test set, counted over both ranks.
        assert evaluation["test_adv_images"] == expected["test_adv_images"] == ROBUST_LIMIT
        assert evaluation["test_adv_top1"] == expected["test_adv_top1"]
    # The images a per-rank limit would attack on rank 0 (its shard's first ROBUST_LIMIT) score
    # otherwise, so the comparison above tells the two apart.
    x, y, index = (torch.cat(parts) for parts in zip(*single.eval_loader("test")))
    own = index[0::2][:ROBUST_LIMIT]
    robust = batch_norm_evaluators()["robust"]
    per_rank = robust_accuracy(single.model, [(x[own], y[own], own)], single.autocast, single.data.mean, single.data.std,
                               robust.eps / 255, robust.step_size / 255, robust.steps, start=robust.start)
    assert per_rank["adv_images"] == ROBUST_LIMIT and per_rank["adv_top1"] != expected["test_adv_top1"]


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(consistency_run):
    """Without agreement rank 1 stops alone and rank 0 dies waiting in the next all-reduce."""
    stops = [json.loads((consistency_run / f"nan_rank{r}.json").read_text()) for r in (0, 1)]
    assert stops[0] == stops[1]
    assert stops[0]["step"] == NAN_AT_STEP and f"at step {NAN_AT_STEP} (epoch 1)" in stops[0]["message"]


def test_a_split_smaller_than_the_world_is_refused_on_every_rank(consistency_run):
    messages = [(consistency_run / f"tiny_rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1] == ("the test split of digits has 1 image(s), fewer than the 2 processes: "
                                          "each needs at least one")


def test_a_failing_rank_ends_the_job(tmp_path):
    started = time.monotonic()
    proc = torchrun("fail", tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stderr
    assert time.monotonic() - started < 90  # torchrun stops the other rank; nothing waits for the collective timeout


def test_a_refusal_of_rank_zero_reaches_the_other_rank_at_once(tmp_path):
    """Two `python train.py` processes of one data-parallel run started side by side with nothing
    supervising them (srun without --kill-on-bad-exit): rank 0 refuses the run folder, which another
    configuration owns, before training. Rank 1, waiting for rank 0's decision, stops with the same
    line and status instead of after dist_timeout_s (600 s here)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run_config.json").write_text(json.dumps({"config": {"name": "another"}, "data_variant": "x",
                                                         "data_fingerprint": "y"}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "train.py", "logger=none", "trainer.device=cpu", "trainer.epochs=1",
                               "dataset.limit_train=300", "dist_timeout_s=600", f"hydra.run.dir={run_dir}"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "RANK": str(rank),
                                   "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)})
             for rank in (0, 1)]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert time.monotonic() - started < 120
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 2, err[-3000:]
        assert f"error: {run_dir} belongs to a run with another configuration" in err and "Traceback" not in err


def test_global_batch_must_divide_among_processes(tmp_path, monkeypatch):
    monkeypatch.setattr("opl.engine.trainer.world", lambda: (0, 3))
    with pytest.raises(ConfigError, match="must divide among the 3 processes"):
        make_trainer(tmp_path)


class Stopped(Exception):
    pass


def stop_after(epoch):
    def callback(trainer, finished, record):
        if finished == epoch:
            raise Stopped
    return callback


# ---- launcher environments --------------------------------------------------------------------
def test_slurm_nodelist_expansion():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[9-11]") == ["a9", "a10", "a11"]
    with pytest.raises(ConfigError):
        expand_nodelist("")


def test_launcher_environments():
    torchrun_env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "29500"}
    assert DistributedContext.from_env(torchrun_env) == DistributedContext(3, 8, 1, "h0", 29500, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[02-05]",
             "SLURM_JOB_ID": "123456"}
    ctx = DistributedContext.from_env(slurm)
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.master_addr, ctx.launcher) == (5, 8, 1, "gpu02", "slurm")
    assert ctx.master_port == 20000 + 123456 % 20000
    assert DistributedContext.from_env({**slurm, "SLURM_NTASKS": "1"}) == DistributedContext()  # one task: no group
    local = {"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_LOCALID": "1",
             "SUBMITIT_LOCAL_JOB_ID": "4242"}
    assert DistributedContext.from_env(local).launcher == "submitit_local"
    assert DistributedContext.from_env({}) == DistributedContext()
    with pytest.raises(ConfigError, match="launcher environment"):
        DistributedContext.from_env({"RANK": "x", "WORLD_SIZE": "2"})
    assert DistributedContext(0, 2, 1).device("cpu") == "cpu"


@pytest.mark.parametrize("launcher, fields", [
    ("slurm", {"tasks_per_node": 8, "gpus_per_node": 8, "nodes": 1, "partition": None, "account": None,
               "setup": ["export SLURM_KILL_BAD_EXIT=1"]}),  # srun --kill-on-bad-exit
    ("gpus", {"n_jobs": 4}),
])
def test_cluster_launcher_configs_compose(launcher, fields):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}", "experiment=imagenet_r50_opl"],
                      return_hydra_config=True)
    assert {k: cfg.hydra.launcher[k] for k in fields} == fields
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")
