"""The shared trainer end to end on tiny real data (digits): training, resume, checkpoints,
selection protocols, the logged LR, the epoch line and failure modes."""

import functools
import json
import re

import pytest
import torch

from opl.data.digits import digits
from opl.engine.checkpoint import atomic_save, load_checkpoint, tensors_to
from opl.engine.trainer import COMPILE_MODES, Trainer, TrainerConfig
from opl.errors import CheckpointError, ConfigError, NonFiniteLossError
from opl.losses import ClassificationLoss, ce_plus_opl
from opl.methods import StandardStep
from opl.models import MLP
from opl.seed import seed_everything

SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
SCHEDULE = {"kind": "multistep", "milestones": [2], "gamma": 0.2, "warmup_epochs": 1}


def make_trainer(run_dir, seed=0, criterion=None, val=0.0, callbacks=(), signature="sig", step=None,
                 evaluators=None, init_seed=None, **overrides):
    seed_everything(seed if init_seed is None else init_seed)
    data = digits(10, [0.3053], [0.3759], val_fraction=val, limit_train=400, limit_test=200)
    cfg = TrainerConfig(**{"epochs": 4, "batch_size": 32, "eval_batch_size": 100, "device": "cpu",
                           "num_workers": 0, "log_every": 5, "progress": "line", **overrides})
    model = MLP(10, 64, (64, 32))
    step = (step or StandardStep)(model, criterion or ce_plus_opl(), data)
    return Trainer(cfg, step, data, SGD, SCHEDULE, run_dir, seed, evaluators=evaluators,
                   callbacks=callbacks, config_signature=signature)


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_learns_and_writes_metrics(tmp_path):
    trainer = make_trainer(tmp_path, val=0.1, test_selection_after_epoch=2)
    summary = trainer.fit()
    final = summary["final_epoch_test"]
    assert final["epoch"] == 4 and final["top1"] > 80.0  # chance is 10%
    assert final["top1"] <= final["top5"] <= 100.0
    assert 0.0 < final["same_cos"] <= 1.0 and final["same_cos"] > final["diff_abs_cos"]
    records = lines(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert {"train_loss", "train_ce", "train_opl", "train_opl_s", "train_opl_d", "train_top1", "lr",
            "images_per_s", "test_top1", "test_top5", "test_same_cos", "test_diff_abs_cos", "val_top1"} <= set(records[-1])
    # Per-epoch train loss is the mean of ce + opl (weight 1).
    assert records[-1]["train_loss"] == pytest.approx(records[-1]["train_ce"] + records[-1]["train_opl"], rel=1e-5)
    # Selection protocols: best validation epoch's test numbers; authors' best test from epoch 2 on.
    best_val = max(records, key=lambda r: r["val_top1"])
    assert summary["best_val_selected_test"]["epoch"] == best_val["epoch"]
    assert summary["best_val_selected_test"]["top1"] == best_val["test_top1"]
    best_test = max(records[2:], key=lambda r: r["test_top1"])  # epochs after 2: 3 and 4
    assert summary["authors_best_on_test"]["top1"] == best_test["test_top1"]
    assert summary["authors_best_on_test"]["epoch"] in (3, 4) and summary["authors_best_on_test"]["after_epoch"] == 2
    assert (tmp_path / "best_val.pt").exists() and (tmp_path / "last.pt").exists()


def test_lr_schedule_warmup_and_milestones(tmp_path):
    trainer = make_trainer(tmp_path, epochs=3)
    iters = len(trainer.train_loader)
    seen = []
    for _ in range(3 * iters):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    # Per-iteration linear warm-up over epoch 1, from LR 0 (the authors' WarmUpLR) ...
    assert seen[:iters] == pytest.approx([0.05 * i / iters for i in range(iters)])
    # ... then milestone 2: epoch 2 (1-based) already runs at x0.2.
    assert seen[iters:] == pytest.approx([0.01] * (2 * iters))


def authors_best_on_test(test_accuracies: list[float], after: int) -> tuple[int | None, float]:
    """kahnchana/opl classification/cifar/train.py: `best_acc = 0.0`; for epoch in 1..EPOCH, after
    evaluating, `if epoch > settings.MILESTONES[1] and best_acc < acc: best_acc = acc` (and save)."""
    best_acc, best_epoch = 0.0, None
    for epoch, acc in enumerate(test_accuracies, start=1):
        if epoch > after and best_acc < acc:
            best_acc, best_epoch = acc, epoch
    return best_epoch, best_acc


class ScriptedTest:
    """An evaluator that reports a given test accuracy per epoch."""

    def __init__(self, accuracies):
        self.accuracies, self.epoch = accuracies, 0

    def __call__(self, trainer) -> dict:
        self.epoch += 1
        return {"test_top1": self.accuracies[self.epoch - 1], "test_top5": 100.0}


@pytest.mark.parametrize("accuracies", [
    [50.0, 60.0, 90.0, 70.0, 80.0, 80.0],  # the best epoch is epoch 3 = `after`: excluded; a tie keeps the first
    [10.0, 20.0, 30.0, 40.0, 35.0, 40.0],
    [99.0, 98.0, 97.0, 20.0, 30.0, 25.0],
])
def test_authors_best_on_test_window_is_epochs_after_the_milestone(tmp_path, accuracies):
    # The authors' settings.MILESTONES[1] = 120 of 200 epochs; here 3 of 6 (1-based epochs, as theirs).
    trainer = make_trainer(tmp_path, epochs=6, test_selection_after_epoch=3,
                           evaluators={"scripted": ScriptedTest(accuracies)})
    best = trainer.fit()["authors_best_on_test"]
    assert (best["epoch"], best["top1"]) == authors_best_on_test(accuracies, after=3)
    assert best["epoch"] > 3 and best["after_epoch"] == 3


class Crash(Exception):
    pass


def crash_after(epoch):
    def callback(trainer, finished_epoch, record):
        if finished_epoch == epoch:
            raise Crash(f"simulated crash after epoch {epoch}")
    return callback


@pytest.mark.parametrize("loader", ["dataloader", "device"])
def test_resume_after_crash_matches_uninterrupted(tmp_path, loader):
    reference = make_trainer(tmp_path / "a", loader=loader)
    reference.fit()
    interrupted = make_trainer(tmp_path / "b", loader=loader, callbacks=(crash_after(2),))
    with pytest.raises(Crash):
        interrupted.fit()
    resumed = make_trainer(tmp_path / "b", init_seed=123, loader=loader)  # a different init: resume must overwrite it
    resumed.resume(tmp_path / "b" / "last.pt")
    assert resumed.state.epoch == 2
    resumed.fit()
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    a, b = lines(tmp_path / "a" / "metrics.jsonl"), lines(tmp_path / "b" / "metrics.jsonl")
    assert [r["epoch"] for r in b] == [1, 2, 3, 4]
    assert [r["test_top1"] for r in a] == [r["test_top1"] for r in b]


def test_resume_drops_metrics_written_after_the_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=(crash_after(2),), ckpt_every=2)
    with pytest.raises(Crash):
        trainer.fit()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 3, "train_loss": 1.0}) + "\n")  # crash after logging epoch 3
    resumed = make_trainer(tmp_path)
    resumed.resume(tmp_path / "last.pt")
    assert [r["epoch"] for r in lines(tmp_path / "metrics.jsonl")] == [1, 2]


def test_checkpoint_is_weights_only_and_complete(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1)
    trainer.fit()
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "step_rng", "state"} <= set(ckpt)
    assert ckpt["state"]["epoch"] == 1 and ckpt["config_signature"] == "sig"
    assert not list(tmp_path.glob(".last.pt.*.tmp"))  # the atomic write left no temporary file


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    trainer = make_trainer(tmp_path / "run")
    with pytest.raises(CheckpointError, match="corrupt"):
        trainer.resume(bad)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        trainer.resume(tmp_path / "absent.pt")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1)
    trainer.fit()
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        make_trainer(tmp_path / "other").resume(tmp_path / "cut.pt")


def test_mismatched_checkpoints_are_refused(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1)
    trainer.fit()
    with pytest.raises(CheckpointError, match="different configuration"):
        make_trainer(tmp_path / "x", signature="another").resume(tmp_path / "last.pt")
    other_model = make_trainer(tmp_path / "y")
    other_model.model.fc = torch.nn.Linear(32, 7)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        other_model.load_weights(tmp_path / "last.pt")
    atomic_save({"model": {"foo": torch.zeros(1)}}, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="not a resumable"):
        make_trainer(tmp_path / "z").resume(tmp_path / "weights.pt")


class Explode(torch.nn.Module):
    """CE + OPL whose loss turns to NaN from a given step on."""

    def __init__(self, at_step):
        super().__init__()
        self.inner, self.at_step, self.calls = ce_plus_opl(), at_step, 0
        self.needs_pairs = True

    def forward(self, logits, features, labels, index=None):
        self.calls += 1
        parts = self.inner(logits, features, labels, index)
        if self.calls >= self.at_step:
            parts["loss"] = parts["loss"] * float("nan")
        return parts


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    iters = 400 // 32
    trainer = make_trainer(tmp_path, criterion=Explode(at_step=iters + 3))
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit()
    assert err.value.step == iters + 3 and f"step {iters + 3}" in str(err.value)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["state"]["epoch"] == 1  # the epoch before the NaN, not overwritten
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_impossible_values_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="batch_size must be >= 2"):
        make_trainer(tmp_path, batch_size=1)
    make_trainer(tmp_path / "ce", criterion=ClassificationLoss(), batch_size=1)  # CE alone is fine
    with pytest.raises(ConfigError, match="exceeds"):
        make_trainer(tmp_path, batch_size=401, drop_last=True)
    assert len(make_trainer(tmp_path / "one", batch_size=401).train_loader) == 1  # one batch of all 400
    with pytest.raises(ConfigError, match="epochs"):
        make_trainer(tmp_path, epochs=0)
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        make_trainer(tmp_path, amp="fp16")
    with pytest.raises(ValueError, match="gamma"):
        ce_plus_opl(gamma=-1.0)


def test_bf16_autocast_on_cpu_trains(tmp_path):
    trainer = make_trainer(tmp_path, epochs=2, amp="bf16")
    summary = trainer.fit()
    assert summary["final_epoch_test"]["top1"] > 50.0


def test_deterministic_mode_repeats_exactly(tmp_path):
    first = make_trainer(tmp_path / "a", epochs=1, deterministic=True)
    first.fit()
    second = make_trainer(tmp_path / "b", epochs=1, deterministic=True)
    second.fit()
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key])
    torch.use_deterministic_algorithms(False)


def test_resume_refuses_a_checkpoint_of_another_seed(tmp_path):
    make_trainer(tmp_path, epochs=1).fit()
    with pytest.raises(CheckpointError, match="seed 0, this run has seed 4"):
        make_trainer(tmp_path, seed=4).resume(tmp_path / "last.pt")


def test_logged_lr_is_the_lr_the_epoch_ran_with(tmp_path):
    trainer = make_trainer(tmp_path, epochs=3)
    used = []  # the LR of every optimizer step, read as the step runs
    trainer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: used.append(optimizer.param_groups[0]["lr"]))
    trainer.fit()
    iters = len(trainer.train_loader)
    records = lines(tmp_path / "metrics.jsonl")
    for record in records:
        ran = used[(record["epoch"] - 1) * iters:record["epoch"] * iters]
        assert (record["lr"], record["lr_last"]) == pytest.approx((ran[0], ran[-1]), rel=1e-12)
    # Warm-up from 0 over epoch 1, then milestone 2: epoch 1 must not log epoch 2's decayed LR.
    assert (records[0]["lr"], records[0]["lr_last"]) == pytest.approx((0.0, 0.05 * (iters - 1) / iters))
    assert [r["lr"] for r in records[1:]] == pytest.approx([0.01, 0.01])


class ScriptedVal:
    """An evaluator that reports a given validation accuracy per call (and nothing else)."""

    def __init__(self, accuracies):
        self.accuracies = list(accuracies)

    def __call__(self, trainer) -> dict:
        return {"val_top1": self.accuracies.pop(0)}


def best_val_epoch(run_dir):
    return load_checkpoint(run_dir / "best_val.pt")["epoch"]


def test_best_val_weights_never_run_ahead_of_the_checkpoint(tmp_path):
    """ckpt_every=2 and a crash after epoch 3, the best so far: last.pt (epoch 2) selects epoch 2,
    so must best_val.pt. Resumed, epochs 3-4 validate worse: epoch 2 stays the selection."""
    trainer = make_trainer(tmp_path, ckpt_every=2, evaluators={"v": ScriptedVal([10, 20, 30])},
                           callbacks=(crash_after(3),))
    with pytest.raises(Crash):
        trainer.fit()
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert checkpoint["state"]["epoch"] == 2 and checkpoint["state"]["best_val"]["epoch"] == 2
    assert best_val_epoch(tmp_path) == 2
    resumed = make_trainer(tmp_path, ckpt_every=2, evaluators={"v": ScriptedVal([15, 15])})
    resumed.resume(tmp_path / "last.pt")
    summary = resumed.fit()
    assert summary["best_val_selected_test"]["epoch"] == best_val_epoch(tmp_path) == 2
    best = load_checkpoint(tmp_path / "best_val.pt")["model"]
    assert all(torch.equal(best[k], v) for k, v in checkpoint["model"].items())
    assert not (tmp_path / "best_val.pending.pt").exists()


def test_a_crash_between_last_pt_and_best_val_is_repaired(tmp_path, monkeypatch):
    promote = Trainer._promote_best_val

    def crash_in_the_final_epoch(self):
        if self.state.epoch == 2:
            raise Crash("after last.pt, before best_val.pt")
        promote(self)

    monkeypatch.setattr(Trainer, "_promote_best_val", crash_in_the_final_epoch)
    trainer = make_trainer(tmp_path, epochs=2, evaluators={"v": ScriptedVal([10, 20])})
    with pytest.raises(Crash):
        trainer.fit()
    monkeypatch.undo()
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert checkpoint["state"]["best_val"]["epoch"] == 2 and best_val_epoch(tmp_path) == 1
    resumed = make_trainer(tmp_path, epochs=2, evaluators={})
    resumed.resume(tmp_path / "last.pt")
    resumed.fit()  # no epoch left: only the repair
    assert best_val_epoch(tmp_path) == 2
    best = load_checkpoint(tmp_path / "best_val.pt")["model"]
    assert all(torch.equal(best[k], v) for k, v in checkpoint["model"].items())


class LossOnlyStep(StandardStep):
    """The TrainingStep interface's minimum: the loss alone."""

    def forward(self, x, y, index):
        return {"loss": super().forward(x, y, index)["loss"]}


class FewShotLike:
    def __call__(self, trainer) -> dict:
        return {"val_top1": 50.0, "test_5w1s_acc": 61.5, "test_5w1s_ci95": 0.8, "test_5w1s_episodes_hash": "ab12"}


def test_epoch_line_shows_what_the_step_and_evaluators_report(tmp_path, capsys):
    number = r"\d+\.\d\d"
    make_trainer(tmp_path / "standard", epochs=1, val=0.1).fit()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(rf"epoch 1/1  loss \d+\.\d{{4}}  train@1 {number}  lr 0  \d+ img/s  test@1 {number}  "
                        rf"test@5 {number}  val@1 {number}", line), line
    # A step without train_top1, an evaluator without test_top1 (the authors' selection then has nothing to select on).
    summary = make_trainer(tmp_path / "generic", epochs=2, step=LossOnlyStep, evaluators={"f": FewShotLike()},
                           test_selection_after_epoch=0).fit()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(rf"epoch 2/2  loss \d+\.\d{{4}}  lr 0.01  \d+ img/s  test_5w1s_acc 61.50  val@1 50.00", line), line
    assert summary["authors_best_on_test"] is None and summary["best_val_selected_test"]["epoch"] == 1


@pytest.mark.parametrize("key, value, accepted", [
    ("loader", "gpu", "auto, device, dataloader"),
    ("progress", "fancy", "auto, bar, line, silent"),
    ("compile_mode", "fast", "auto, default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs"),
])
def test_trainer_choices_are_one_line_config_errors(key, value, accepted):
    with pytest.raises(ConfigError) as err:
        TrainerConfig(**{key: value})
    assert str(err.value) == f"trainer.{key} must be one of {accepted}, got '{value}'"
    for choice in accepted.split(", "):
        TrainerConfig(**{key: choice})


def test_compile_modes_are_the_ones_torch_compile_knows():
    from torch._inductor import list_mode_options

    assert set(COMPILE_MODES) - {"auto"} <= set(list_mode_options())


def test_sync_bn_without_cuda_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^trainer.sync_bn needs CUDA"):
        make_trainer(tmp_path, sync_bn=True)


def test_criterion_state_follows_the_device_on_resume():
    """Resume reads the checkpoint onto the CPU; the criterion's nested state (the truncated loss's
    weights sit in an extra-state dict) is moved to the run's device before it is assigned."""
    weights = torch.ones(5)
    state = {"base._extra_state": {"weights": weights}, "steps": [weights, (weights, 3)], "none": None}
    moved = tensors_to(state, torch.device("meta"))
    assert moved["base._extra_state"]["weights"].device.type == "meta"
    assert [t.device.type for t in (moved["steps"][0], moved["steps"][1][0])] == ["meta", "meta"]
    assert moved["steps"][1][1] == 3 and moved["none"] is None and isinstance(moved["steps"][1], tuple)
    assert weights.device.type == "cpu"  # the loaded state itself is left as it was
