"""PGD-AT and MART on the shared trainer (digits, CPU): robust accuracy is measured and below clean
accuracy, the parts are logged, resume is exact, compile is refused."""

import pytest
import torch

from opl.engine.adversarial import AdversarialConfig, AdversarialTrainStep, adversarial_accuracy
from opl.errors import ConfigError
from opl.losses import ce_plus_opl
from test_trainer import Crash, crash_after, lines, make_trainer

FAST = dict(eps=24.0, step_size=8.0, steps=3, eval_eps=24.0, eval_step_size=8.0, eval_steps=5)


def test_pgd_at_with_opl_trains_and_reports_robust_accuracy(tmp_path):
    trainer = make_trainer(tmp_path, adversarial=AdversarialConfig("pgd_at", **FAST), epochs=3)
    assert isinstance(trainer.step, AdversarialTrainStep)
    summary = trainer.fit()
    final = summary["final_epoch_test"]
    assert final["top1"] > 60.0  # still learns the clean task (chance 10%)
    assert final["adv_images"] == 200 and final["adv_top1"] < final["top1"] - 5.0
    record = lines(tmp_path / "metrics.jsonl")[-1]
    assert {"train_ce", "train_opl", "test_adv_top1"} <= set(record)


def test_mart_logs_its_parts_and_opl(tmp_path):
    trainer = make_trainer(tmp_path, adversarial=AdversarialConfig("mart", **FAST, beta=6.0), epochs=2,
                           criterion=ce_plus_opl(weight=0.5))
    trainer.fit()
    record = lines(tmp_path / "metrics.jsonl")[-1]
    assert {"train_mart", "train_mart_adv", "train_mart_robust", "train_opl"} <= set(record)
    assert "train_ce" not in record  # MART replaces cross-entropy
    assert record["train_loss"] == pytest.approx(record["train_mart"] + 0.5 * record["train_opl"], rel=1e-4)
    assert record["train_mart"] == pytest.approx(record["train_mart_adv"] + 6.0 * record["train_mart_robust"], rel=1e-4)


def test_adversarial_resume_matches_uninterrupted(tmp_path):
    config = AdversarialConfig("pgd_at", **FAST)
    reference = make_trainer(tmp_path / "a", adversarial=config, epochs=3)
    reference.fit()
    interrupted = make_trainer(tmp_path / "b", adversarial=config, epochs=3, callbacks=(crash_after(1),))
    with pytest.raises(Crash):
        interrupted.fit()
    resumed = make_trainer(tmp_path / "b", adversarial=config, epochs=3, seed=9)
    resumed.resume(tmp_path / "b" / "last.pt")
    resumed.fit()
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_robust_accuracy_limit_and_stronger_attack(tmp_path):
    trainer = make_trainer(tmp_path, epochs=2)
    trainer.fit()
    loader, data = trainer.eval_loaders["test"], trainer.data
    weak = adversarial_accuracy(trainer.model, loader, trainer.autocast, data.mean, data.std,
                                AdversarialConfig(eval_eps=4.0, eval_step_size=1.0, eval_steps=5, eval_limit=150))
    strong = adversarial_accuracy(trainer.model, loader, trainer.autocast, data.mean, data.std,
                                  AdversarialConfig(eval_eps=32.0, eval_step_size=8.0, eval_steps=10, eval_limit=150))
    assert weak["adv_images"] == strong["adv_images"] == 150
    assert strong["adv_top1"] < weak["adv_top1"]


def test_bad_adversarial_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="method"):
        AdversarialConfig("trades")
    with pytest.raises(ConfigError, match="steps"):
        AdversarialConfig("pgd_at", steps=0)
    with pytest.raises(ConfigError, match="compile"):
        make_trainer(tmp_path, adversarial=AdversarialConfig("pgd_at"), compile=True)
