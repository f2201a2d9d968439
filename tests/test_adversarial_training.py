"""PGD-AT and MART steps on the shared trainer (digits, CPU): robust accuracy is measured and below
clean accuracy, the parts are logged, resume is exact, compile is refused."""

import contextlib
import copy
import functools
import inspect
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from opl.config_types import locate
from opl.engine.evaluate import ClassificationEvaluator
from opl.errors import ConfigError
from opl.eval.adversarial import RobustAccuracy, normalized_forward, pgd_linf
from opl.losses import ClassificationLoss, ce_plus_opl
from opl.methods import AdversarialStep
from opl.models import MLP
from test_trainer import Crash, crash_after, lines, make_trainer

REPO = Path(__file__).resolve().parent.parent
FAST = dict(eps=24.0, step_size=8.0, steps=3, beta=6.0, start="uniform", start_std=0.001)
EVALUATORS = {"classification": ClassificationEvaluator(), "robust": RobustAccuracy(eps=24.0, step_size=8.0, steps=5)}


def adversarial(kind="pgd_at", **knobs):
    return functools.partial(AdversarialStep, kind=kind, **{**FAST, **knobs})


def test_pgd_at_with_opl_trains_and_reports_robust_accuracy(tmp_path):
    trainer = make_trainer(tmp_path, step=adversarial(), evaluators=EVALUATORS, epochs=3)
    assert isinstance(trainer.step, AdversarialStep)
    summary = trainer.fit()
    final = summary["final_epoch_test"]
    assert final["top1"] > 60.0  # still learns the clean task (chance 10%)
    assert final["adv_images"] == 200 and final["adv_top1"] < final["top1"] - 5.0
    record = lines(tmp_path / "metrics.jsonl")[-1]
    assert {"train_ce", "train_opl", "test_adv_top1"} <= set(record)


def test_mart_logs_its_parts_and_opl(tmp_path):
    trainer = make_trainer(tmp_path, step=adversarial("mart", beta=6.0), evaluators=EVALUATORS, epochs=2,
                           criterion=ce_plus_opl(weight=0.5))
    trainer.fit()
    record = lines(tmp_path / "metrics.jsonl")[-1]
    assert {"train_mart", "train_mart_adv", "train_mart_robust", "train_opl"} <= set(record)
    assert "train_ce" not in record  # MART replaces cross-entropy
    assert record["train_loss"] == pytest.approx(record["train_mart"] + 0.5 * record["train_opl"], rel=1e-4)
    assert record["train_mart"] == pytest.approx(record["train_mart_adv"] + 6.0 * record["train_mart_robust"], rel=1e-4)


def test_adversarial_resume_matches_uninterrupted(tmp_path):
    reference = make_trainer(tmp_path / "a", step=adversarial(), epochs=3)
    reference.fit()
    interrupted = make_trainer(tmp_path / "b", step=adversarial(), epochs=3, callbacks=(crash_after(1),))
    with pytest.raises(Crash):
        interrupted.fit()
    resumed = make_trainer(tmp_path / "b", step=adversarial(), epochs=3, init_seed=9)
    resumed.resume(tmp_path / "b" / "last.pt")
    resumed.fit()
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_robust_accuracy_limit_and_stronger_attack(tmp_path):
    trainer = make_trainer(tmp_path, epochs=2)
    trainer.fit()
    weak = RobustAccuracy(eps=4.0, step_size=1.0, steps=5, limit=150)(trainer)
    strong = RobustAccuracy(eps=32.0, step_size=8.0, steps=10, limit=150)(trainer)
    assert weak["test_adv_images"] == strong["test_adv_images"] == 150
    assert strong["test_adv_top1"] < weak["test_adv_top1"]


def test_bad_adversarial_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="kind"):
        make_trainer(tmp_path, step=adversarial("trades"))
    with pytest.raises(ConfigError, match="steps"):
        make_trainer(tmp_path, step=adversarial(steps=0))
    with pytest.raises(ConfigError, match="compile"):
        make_trainer(tmp_path, step=adversarial(), compile=True)
    with pytest.raises(ValueError, match="steps"):
        RobustAccuracy(steps=0)
    with pytest.raises(ConfigError, match="start"):
        make_trainer(tmp_path, step=adversarial(start="gaussian"))
    with pytest.raises(ValueError, match="start"):
        RobustAccuracy(start="gaussian")


@pytest.mark.parametrize("start", ["normal", "uniform_unclamped", "uniform", "none"])
def test_step_trains_on_the_configured_attack_start(start):
    """The step's examples are pgd_linf's from the configured start, drawn from the step's seeded
    generator, the model in eval mode for the attack; the loss is the criterion on those examples."""
    torch.manual_seed(0)
    data = types.SimpleNamespace(mean=(0.3,), std=(0.4,))
    model = MLP(10, 64, (32,))
    step = AdversarialStep(model, ClassificationLoss(), data, kind="pgd_at", eps=7.905, step_size=1.785, steps=3,
                           beta=6.0, start=start, start_std=0.001)
    step.bind(contextlib.nullcontext, torch.device("cpu"), seed=3)
    pixels = torch.rand(16, 1, 8, 8)
    x, y = (pixels - 0.3) / 0.4, torch.randint(0, 10, (16,))
    model.train()
    before = copy.deepcopy(model.state_dict())  # the step's train-mode forward moves the BN statistics
    parts = step(x, y, torch.arange(16))

    model.load_state_dict(before)
    model.eval()
    expected = pgd_linf(normalized_forward(model, (0.3,), (0.4,), contextlib.nullcontext), pixels, y, 7.905 / 255,
                        1.785 / 255, 3, start=start, generator=torch.Generator().manual_seed(3), start_std=0.001)
    model.train()
    loss = F.cross_entropy(model((expected - 0.3) / 0.4)[1], y)
    torch.testing.assert_close(parts["loss"], loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", sorted(p.stem for p in (REPO / "configs" / "method").glob("*.yaml")))
def test_every_method_config_sets_every_setting_its_step_requires(method):
    """The steps keep no paper values of their own (AdversarialStep, RSCStep: no defaults): each
    method config sets every keyword its target requires."""
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        node = compose("train", overrides=[f"method={method}"]).method
    params = inspect.signature(locate(node._target_)).parameters
    required = {name for name, p in params.items()
                if p.default is p.empty and p.kind != p.VAR_KEYWORD and name not in ("model", "criterion", "data")}
    assert required <= set(node), sorted(required - set(node))


def test_adversarial_step_has_no_attack_defaults():
    params = inspect.signature(AdversarialStep).parameters
    assert [n for n, p in params.items() if p.default is not p.empty] == []
