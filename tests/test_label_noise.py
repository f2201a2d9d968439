"""Label noise (symmetric, pairflip) and the truncated Lq loss with its per-sample weights, against
explicit formulas and in the trainer (refresh schedule, weights from the current model, resume)."""

import math

import pytest
import torch

from opl.data.base import DataSpec, ImageTensors
from opl.data.noise import LabelNoise, corrupt_labels, transition_matrix, with_label_noise
from opl.errors import ConfigError
from opl.losses import TruncatedLq, truncated_lq
from test_trainer import Crash, crash_after, lines, make_trainer

C, PER_CLASS = 10, 4000


def clean_labels():
    return torch.arange(C).repeat(PER_CLASS)


def within_sampling_error(observed: torch.Tensor, expected: torch.Tensor, n: int) -> bool:
    """|observed - expected| below 5 binomial standard errors, element-wise."""
    se = torch.sqrt(expected * (1 - expected) / n).clamp_min(1e-12)
    return bool(((observed - expected).abs() <= 5 * se + 1e-12).all())


@pytest.mark.parametrize("rate", [0.2, 0.4, 0.99])
def test_symmetric_noise_transition_matrix(rate):
    clean = clean_labels()
    noisy = corrupt_labels(clean, C, LabelNoise("symmetric", rate, seed=3))
    target = torch.full((C, C), rate / (C - 1), dtype=torch.float64)
    target.fill_diagonal_(1 - rate)  # a flipped label never stays the same class
    assert within_sampling_error(transition_matrix(clean, noisy, C), target, PER_CLASS)


def test_pairflip_noise_transition_matrix():
    clean = clean_labels()
    noisy = corrupt_labels(clean, C, LabelNoise("pairflip", 0.4, seed=3))
    target = torch.zeros(C, C, dtype=torch.float64)
    for c in range(C):
        target[c, c], target[c, (c + 1) % C] = 0.6, 0.4
    observed = transition_matrix(clean, noisy, C)
    assert within_sampling_error(observed, target, PER_CLASS)
    assert observed[target == 0].sum() == 0  # nothing goes anywhere but c or c + 1


def test_noise_is_seeded_and_independent_of_the_global_rng():
    clean = clean_labels()
    torch.manual_seed(1)
    a = corrupt_labels(clean, C, LabelNoise("symmetric", 0.4, seed=7))
    torch.manual_seed(2)
    b = corrupt_labels(clean, C, LabelNoise("symmetric", 0.4, seed=7))
    c = corrupt_labels(clean, C, LabelNoise("symmetric", 0.4, seed=8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(clean, clean_labels())  # input untouched


def test_bad_noise_settings_are_rejected():
    with pytest.raises(ValueError, match="kind"):
        LabelNoise("uniform", 0.4)
    with pytest.raises(ValueError, match="rate"):
        LabelNoise("symmetric", 1.0)


def test_with_label_noise_changes_training_labels_only_and_records_the_realised_rate():
    g = torch.Generator().manual_seed(0)
    split = lambda n: ImageTensors(torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=g),  # noqa: E731
                                   torch.arange(n) % C)
    spec = DataSpec("toy", "toy/v", C, split(2000), split(300), split(200), (0.5,) * 3, (0.25,) * 3)
    noisy = with_label_noise(spec, LabelNoise("pairflip", 0.3, seed=1))
    changed = int((noisy.train.labels != spec.train.labels).sum())
    facts = noisy.notes["label_noise"]
    assert facts["flipped"] == changed and facts["realised_rate"] == pytest.approx(changed / 2000)
    assert abs(facts["realised_rate"] - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 2000)
    assert torch.equal(noisy.train.images, spec.train.images)
    assert torch.equal(noisy.test.labels, spec.test.labels) and torch.equal(noisy.val.labels, spec.val.labels)
    assert noisy.variant == "toy/v|noise=pairflip0.3@1"


def test_label_noise_refuses_folder_datasets():
    spec = DataSpec("folders", "f", C, torch.utils.data.TensorDataset(torch.zeros(4, 3)), None, None, (0.5,), (0.25,))
    with pytest.raises(ConfigError, match="in-memory"):
        with_label_noise(spec, LabelNoise("symmetric", 0.4))


# ---------------------------------------------------------------------------------------- truncated loss
def explicit_truncated_loss(logits, labels, weights, q, k):
    total = 0.0
    for i in range(len(labels)):
        row = [math.exp(v) for v in logits[i].double().tolist()]
        p = row[int(labels[i])] / sum(row)
        total += weights[i] * ((1 - p ** q) / q - (1 - k ** q) / q)
    return total / len(labels)


def test_truncated_loss_matches_formula_and_weights_select_by_index():
    torch.manual_seed(0)
    logits, labels = torch.randn(12, 5) * 3, torch.randint(0, 5, (12,))
    tl = TruncatedLq(q=0.7, k=0.5, start_epoch=3, refresh_every=2)
    index = torch.arange(12)
    assert tl(logits, labels, index).item() == pytest.approx(explicit_truncated_loss(logits, labels, [1.0] * 12, 0.7, 0.5),
                                                             rel=1e-5)
    # Refresh from a "training set" of 20 samples; the batch reads the weights of its own indices.
    set_logits, set_labels = torch.randn(20, 5) * 3, torch.randint(0, 5, (20,))
    tl.refresh(set_logits, set_labels)
    p = torch.softmax(set_logits.double(), 1)[torch.arange(20), set_labels]
    expected = [1.0 if pi > 0.5 else 0.0 for pi in p.tolist()]
    assert tl.weights.tolist() == expected and 0 < sum(expected) < 20
    index = torch.tensor([19, 3, 7, 0, 11, 12, 5, 8, 2, 14, 1, 16])
    w = [expected[i] for i in index.tolist()]
    assert tl(logits, labels, index).item() == pytest.approx(explicit_truncated_loss(logits, labels, w, 0.7, 0.5), rel=1e-5)


def test_truncated_loss_refresh_schedule_and_bad_values():
    tl = TruncatedLq(start_epoch=40, refresh_every=10)
    assert [e for e in range(1, 121) if tl.refresh_due(e)] == [40, 50, 60, 70, 80, 90, 100, 110, 120]
    for kwargs in ({"q": 0.0}, {"k": 1.0}, {"start_epoch": 0}):
        with pytest.raises(ValueError):
            TruncatedLq(**kwargs)


def test_truncated_loss_plus_opl_parts():
    torch.manual_seed(0)
    criterion = truncated_lq(weight=0.1, gamma=2.0)
    features, logits, labels = torch.rand(16, 8), torch.randn(16, 4), torch.arange(16) % 4
    parts = criterion(logits, features, labels, torch.arange(16))
    assert set(parts) == {"loss", "tl", "opl", "opl_s", "opl_d"}
    assert parts["loss"].item() == pytest.approx(parts["tl"].item() + 0.1 * parts["opl"].item(), rel=1e-6)
    assert criterion.opl.gamma == 2.0 and truncated_lq().opl is None


def test_trainer_refreshes_weights_from_the_current_model(tmp_path):
    expected = {}

    def after_epoch(trainer, epoch, record):
        _, logits, labels = trainer.predict("train")
        p = torch.softmax(logits.double(), 1)[torch.arange(len(labels)), labels]
        expected[epoch] = (p > 0.5).float()

    criterion = truncated_lq(start_epoch=2, refresh_every=2)
    trainer = make_trainer(tmp_path, criterion=criterion, epochs=4, callbacks=(after_epoch,))
    trainer.fit()
    # Refreshed at the start of epochs 2 and 4, from the model as it was after epochs 1 and 3.
    assert torch.equal(criterion.base.weights, expected[3])
    records = lines(tmp_path / "metrics.jsonl")
    assert "tl_kept_fraction" not in records[0]
    assert records[1]["tl_kept_fraction"] == pytest.approx(expected[1].mean().item())
    assert records[3]["tl_kept_fraction"] == pytest.approx(expected[3].mean().item())
    assert 0.0 < records[3]["tl_kept_fraction"] <= 1.0 and "train_tl" in records[3]


def test_resume_restores_truncated_loss_weights(tmp_path):
    make = lambda path, **kw: make_trainer(path, criterion=truncated_lq(start_epoch=2, refresh_every=2), epochs=4, **kw)  # noqa: E731
    reference = make(tmp_path / "a")
    reference.fit()
    interrupted = make(tmp_path / "b", callbacks=(crash_after(2),))
    with pytest.raises(Crash):
        interrupted.fit()
    resumed = make(tmp_path / "b", init_seed=5)
    resumed.resume(tmp_path / "b" / "last.pt")
    assert torch.equal(resumed.criterion.base.weights, interrupted.criterion.base.weights)
    resumed.fit()
    assert torch.equal(resumed.criterion.base.weights, reference.criterion.base.weights)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
