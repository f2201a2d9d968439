"""Adversarial pieces: L-inf PGD in pixel space, the MART loss, and WideResNet-34-10."""

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from opl.eval.adversarial import normalized_forward, pgd_linf
from opl.losses.mart import mart_loss
from opl.models.wide_resnet import WideResNet, wide_resnet, wrn34_10

EPS, STEP = 8 / 255, 2 / 255


class TinyConv(nn.Module):
    """A small (features, logits) conv net for 3x8x8 inputs."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        features = self.body(x)
        return features, self.fc(features)


def logits_of(model):
    return lambda x: model(x)[1]


@pytest.fixture()
def conv_setup():
    torch.manual_seed(0)
    model = TinyConv().eval()
    images = torch.rand(6, 3, 8, 8)
    labels = torch.randint(0, 10, (6,))
    return model, images, labels


# ----------------------------------------------------------------------------- attacks: constraints

def test_pgd_stays_in_eps_ball_and_pixel_range(conv_setup):
    model, images, labels = conv_setup
    # Push some pixels to the range edges so the [0, 1] clamp is exercised.
    images[:, :, :2] = 0.0
    images[:, :, -2:] = 1.0
    forward = logits_of(model)
    adv_pgd = pgd_linf(forward, images, labels, EPS, STEP, steps=10, generator=torch.Generator().manual_seed(1))
    one_step = pgd_linf(forward, images, labels, EPS, step_size=EPS, steps=1, start="none")
    for adv in (adv_pgd, one_step):
        assert adv.shape == images.shape and adv.dtype == torch.float32
        assert not adv.requires_grad
        assert (adv - images).abs().max().item() <= EPS + 1e-6
        assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0
        assert (adv - images).abs().max().item() > EPS / 2  # it actually moved
    # One step of eps from the clean image moves every interior pixel by exactly eps (a zero gradient
    # sign is measure-zero here).
    interior = (images > EPS) & (images < 1 - EPS)
    assert torch.allclose((one_step - images).abs()[interior], torch.full_like(images[interior], EPS), atol=1e-6)


def test_pgd_projects_onto_box_corner_for_binary_linear_model():
    """For a 2-class linear model the input-gradient sign never changes, so enough large steps must
    land exactly on clamp(x + eps * sign(w_other - w_label), 0, 1)."""
    torch.manual_seed(0)
    linear = nn.Linear(12, 2)

    def forward(x):
        return linear(x.flatten(1))

    images = torch.rand(5, 1, 3, 4)
    labels = torch.tensor([0, 1, 0, 1, 1])
    adv = pgd_linf(forward, images, labels, eps=0.1, step_size=0.07, steps=5, start="uniform",
                   generator=torch.Generator().manual_seed(3))
    w = linear.weight.detach()
    direction = torch.sign(w[1 - labels] - w[labels]).view_as(images)
    expected = (images + 0.1 * direction).clamp(0, 1)
    assert torch.allclose(adv, expected, atol=1e-6)


def test_pgd_one_step_without_random_start_is_one_signed_gradient_step(conv_setup):
    model, images, labels = conv_setup
    forward = logits_of(model)
    one_step = pgd_linf(forward, images, labels, EPS, step_size=EPS, steps=1, start="none")
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(forward(x), labels, reduction="sum"), x)
    expected = (images + EPS * grad.sign()).clamp(0.0, 1.0)
    assert torch.equal(one_step, expected)


def test_zero_steps_without_random_start_is_identity(conv_setup):
    model, images, labels = conv_setup
    adv = pgd_linf(logits_of(model), images, labels, EPS, STEP, steps=0, start="none")
    assert torch.equal(adv, images)
    # eps = 0 pins the result to the clean images even with a random start and steps.
    pinned = pgd_linf(logits_of(model), images, labels, 0.0, STEP, steps=3)
    assert torch.equal(pinned, images)


def test_seeded_generator_makes_random_start_reproducible(conv_setup):
    model, images, labels = conv_setup
    forward = logits_of(model)

    def attack(seed, steps=0):
        return pgd_linf(forward, images, labels, EPS, STEP, steps, generator=torch.Generator().manual_seed(seed))

    start_a, start_b, start_c = attack(7), attack(7), attack(8)
    assert torch.equal(start_a, start_b)
    assert not torch.equal(start_a, start_c)
    assert (start_a - images).abs().max().item() <= EPS + 1e-6
    assert (start_a - images).abs().max().item() > 0.9 * EPS  # uniform over the whole ball
    # Symmetric in [-eps, eps] (interior pixels are not clamped): both signs, mean offset ~ 0.
    interior = (images > EPS) & (images < 1 - EPS)
    offsets = (start_a - images)[interior]
    assert (offsets < -EPS / 2).any() and (offsets > EPS / 2).any()
    assert abs(offsets.mean().item()) < 0.15 * EPS
    assert torch.equal(attack(7, steps=4), attack(7, steps=4))


def mart_training_attack(model, x_natural, y, noise, step_size, epsilon, perturb_steps):
    """YisenWang/MART mart.py `mart_loss`, the attack part, with its N(0, 1) draw passed in."""
    x_adv = x_natural.detach() + 0.001 * noise
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_ce = F.cross_entropy(model(x_adv)[1], y)
        grad = torch.autograd.grad(loss_ce, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv


def trades_mart_pgd_whitebox(model, X, y, uniform01, epsilon, num_steps, step_size):
    """`_pgd_whitebox` of TRADES pgd_attack_cifar10.py / MART train_resnet.py, with its
    uniform_(-eps, eps) draw passed in as U[0, 1) samples."""
    X_pgd = X + (-epsilon + 2 * epsilon * uniform01)
    for _ in range(num_steps):
        X_pgd = X_pgd.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = nn.CrossEntropyLoss()(model(X_pgd)[1], y)
        loss.backward()
        X_pgd = X_pgd.detach() + step_size * X_pgd.grad.sign()
        eta = torch.clamp(X_pgd - X, -epsilon, epsilon)
        X_pgd = torch.clamp(X + eta, 0, 1.0)
    return X_pgd.detach()


def test_normal_start_is_the_mart_trades_training_attack(conv_setup):
    model, images, labels = conv_setup
    images[:, :, :2] = 0.0  # pixels on the range edge: the start is not clipped, the steps are
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(4))
    reference = mart_training_attack(model, images, labels, noise, 0.007, 0.031, 10)
    ours = pgd_linf(logits_of(model), images, labels, 0.031, 0.007, 10, start="normal",
                    generator=torch.Generator().manual_seed(4), start_std=0.001)
    assert torch.equal(ours, reference)
    start = pgd_linf(logits_of(model), images, labels, 0.031, 0.007, 0, start="normal",
                     generator=torch.Generator().manual_seed(4))
    assert torch.equal(start, images + 0.001 * noise) and (start < 0).any()


def test_uniform_unclamped_start_is_the_trades_mart_evaluation(conv_setup):
    model, images, labels = conv_setup
    images[:, :, :2] = 0.0
    uniform01 = torch.rand(images.shape, generator=torch.Generator().manual_seed(6))
    reference = trades_mart_pgd_whitebox(model, images, labels, uniform01, 0.031, 20, 0.003)
    ours = pgd_linf(logits_of(model), images, labels, 0.031, 0.003, 20, start="uniform_unclamped",
                    generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    unclamped = pgd_linf(logits_of(model), images, labels, 0.031, 0.003, 0, start="uniform_unclamped",
                         generator=torch.Generator().manual_seed(6))
    clamped = pgd_linf(logits_of(model), images, labels, 0.031, 0.003, 0, start="uniform",
                       generator=torch.Generator().manual_seed(6))
    assert (unclamped < 0).any() and torch.equal(clamped, unclamped.clamp(0, 1))
    with pytest.raises(ValueError, match="start"):
        pgd_linf(logits_of(model), images, labels, 0.031, 0.003, 1, start="gaussian")


def test_attack_leaves_parameter_grads_untouched(conv_setup):
    model, images, labels = conv_setup
    forward = logits_of(model)
    pgd_linf(forward, images, labels, EPS, STEP, steps=3)
    assert all(p.grad is None for p in model.parameters())
    # Existing gradients (e.g. mid-accumulation in the trainer) are not changed either.
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    pgd_linf(forward, images, labels, EPS, STEP, steps=3)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())


def test_attacks_work_under_no_grad(conv_setup):
    model, images, labels = conv_setup
    forward = logits_of(model)
    free = pgd_linf(forward, images, labels, EPS, STEP, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        inside = pgd_linf(forward, images, labels, EPS, STEP, 5, generator=torch.Generator().manual_seed(2))
        assert not torch.is_grad_enabled()  # the attack restores the caller's mode
    assert torch.equal(free, inside)
    assert not torch.equal(inside, images)


@pytest.mark.parametrize("kwargs, message", [
    ({"eps": -0.1, "step_size": 0.01, "steps": 1}, "eps"),
    ({"eps": 0.1, "step_size": 0.0, "steps": 1}, "step_size"),
    ({"eps": 0.1, "step_size": -1.0, "steps": 1}, "step_size"),
    ({"eps": 0.1, "step_size": 0.01, "steps": -1}, "steps"),
    ({"eps": 0.1, "step_size": 0.01, "steps": 2.5}, "steps"),
    ({"eps": float("nan"), "step_size": 0.01, "steps": 1}, "eps"),
])
def test_bad_attack_arguments_rejected(conv_setup, kwargs, message):
    model, images, labels = conv_setup
    with pytest.raises(ValueError, match=message):
        pgd_linf(logits_of(model), images, labels, **kwargs)


# ----------------------------------------------------------------------------- attacks: strength

class DigitsMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU())
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        features = self.body(x)
        return features, self.fc(features)


@pytest.fixture(scope="module")
def trained_digits():
    """An MLP trained on scikit-learn's real 8x8 digits (pixels scaled to [0, 1]); held-out split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy((bunch.images / 16.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = DigitsMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    # One thread: 300 tiny steps gain nothing from a pool, and a contended pool is 10x slower.
    torch.set_num_threads(1)
    try:
        for _ in range(300):  # full-batch steps: ~1 s on one CPU core
            optimizer.zero_grad()
            F.cross_entropy(model(images[train])[1], labels[train]).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval().zero_grad(set_to_none=True)
    return model, images[test], labels[test]


def test_trained_digits_model_is_accurate(trained_digits):
    model, images, labels = trained_digits
    with torch.no_grad():
        accuracy = (model(images)[1].argmax(1) == labels).float().mean().item()
    assert accuracy > 0.9


def test_pgd_hurts_a_trained_model(trained_digits):
    model, images, labels = trained_digits
    forward = logits_of(model)
    eps = 0.1
    adv_pgd = pgd_linf(forward, images, labels, eps, step_size=eps / 4, steps=10,
                       generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        results = {}
        for name, x in (("clean", images), ("pgd", adv_pgd)):
            logits = forward(x)
            results[name] = (F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item())
    (clean_loss, clean_acc), (pgd_loss, pgd_acc) = (results[k] for k in ("clean", "pgd"))
    assert pgd_loss > clean_loss + 1.0, results  # a clear margin, not noise
    assert pgd_acc < clean_acc - 0.2, results
    assert (adv_pgd - images).abs().max().item() <= eps + 1e-6


def test_more_pgd_steps_are_stronger(trained_digits):
    model, images, labels = trained_digits
    forward = logits_of(model)

    def loss_after(steps):
        adv = pgd_linf(forward, images, labels, 0.05, 0.0125, steps, start="none")
        with torch.no_grad():
            return F.cross_entropy(forward(adv), labels).item()

    losses = [loss_after(s) for s in (0, 1, 5)]
    assert losses[0] < losses[1] < losses[2], losses


# ----------------------------------------------------------------------------- normalized_forward

def test_normalized_forward_matches_manual_normalisation(conv_setup):
    model, images, _ = conv_setup
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    entered = []

    @contextlib.contextmanager
    def counting_autocast():
        entered.append(1)
        yield

    forward = normalized_forward(model, mean, std, counting_autocast)
    manual = model((images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))[1]
    assert torch.allclose(forward(images), manual, atol=1e-6)
    assert len(entered) == 1
    # Per-channel, not a scalar: swapping the channel statistics changes the output.
    swapped = normalized_forward(model, mean[::-1], std[::-1], contextlib.nullcontext)
    assert not torch.allclose(swapped(images), manual, atol=1e-4)
    # Float64 input stays float64 (statistics follow the input's dtype).
    double = normalized_forward(model.double(), mean, std, contextlib.nullcontext)(images.double())
    assert double.dtype == torch.float64
    assert torch.allclose(double.float(), manual, atol=1e-5)


def test_normalized_forward_rejects_bad_statistics(conv_setup):
    model = conv_setup[0]
    with pytest.raises(ValueError):
        normalized_forward(model, (0.5, 0.5, 0.5), (0.2, 0.2), contextlib.nullcontext)
    with pytest.raises(ValueError):
        normalized_forward(model, (0.5,), (0.0,), contextlib.nullcontext)


def test_pgd_through_normalized_forward_keeps_pixel_eps(conv_setup):
    """eps is measured in pixels even though the model sees normalised inputs (std < 1 would
    otherwise inflate it)."""
    model, images, labels = conv_setup
    forward = normalized_forward(model, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), contextlib.nullcontext)
    adv = pgd_linf(forward, images, labels, EPS, STEP, 5, generator=torch.Generator().manual_seed(0))
    assert (adv - images).abs().max().item() <= EPS + 1e-6
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- MART

def mart_reference(logits_adv, logits_clean, labels, beta):
    """The formula, one sample at a time, in float64 Python/NumPy."""
    z_adv, z_nat = logits_adv.double().numpy(), logits_clean.double().numpy()
    adv_terms, robust_terms = [], []
    for za, zn, y in zip(z_adv, z_nat, labels.tolist()):
        p_adv = np.exp(za - za.max()) / np.exp(za - za.max()).sum()
        p_nat = np.exp(zn - zn.max()) / np.exp(zn - zn.max()).sum()
        ranked = sorted(range(len(p_adv)), key=lambda j: p_adv[j])
        top, second = ranked[-1], ranked[-2]
        wrong = second if top == y else top
        ce = -math.log(p_adv[y])
        boost = -math.log(1.0001 - p_adv[wrong] + 1e-12)
        adv_terms.append(ce + boost)
        kl = sum(p_nat[j] * (math.log(p_nat[j]) - math.log(p_adv[j] + 1e-12)) for j in range(len(p_nat)))
        robust_terms.append(kl * (1.0000001 - p_nat[y]))
    mart_adv = sum(adv_terms) / len(adv_terms)
    mart_robust = sum(robust_terms) / len(robust_terms)
    return mart_adv + beta * mart_robust, mart_adv, mart_robust


@pytest.mark.parametrize("pattern", ["label_is_top_adv", "label_is_lowest_adv", "label_is_second_adv", "random"])
@pytest.mark.parametrize("beta", [0.0, 6.0])
def test_mart_matches_per_sample_reference(pattern, beta):
    torch.manual_seed({"label_is_top_adv": 0, "label_is_lowest_adv": 1, "label_is_second_adv": 2, "random": 3}[pattern])
    logits_adv = 3 * torch.randn(16, 10)
    logits_clean = logits_adv + torch.randn(16, 10)  # correlated, like clean vs adversarial
    order = logits_adv.argsort(dim=1)
    labels = {"label_is_top_adv": order[:, -1], "label_is_lowest_adv": order[:, 0],
              "label_is_second_adv": order[:, -2], "random": torch.randint(0, 10, (16,))}[pattern]
    out = mart_loss(logits_adv, logits_clean, labels, beta=beta)
    expected = mart_reference(logits_adv, logits_clean, labels, beta)
    for key, value in zip(("loss", "mart_adv", "mart_robust"), expected):
        assert out[key].dtype == torch.float32 and out[key].dim() == 0
        assert out[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_mart_wrong_class_choice_matters():
    """The boosted term must use the runner-up when the label is the top adversarial class: with the
    top class instead, the NLL term would be log(1.0001 - p_top) and the loss very different."""
    logits_adv = torch.tensor([[4.0, 1.0, 0.0]])
    labels = torch.tensor([0])
    out = mart_loss(logits_adv, logits_adv.clone(), labels, beta=0.0)
    p = F.softmax(logits_adv.double(), dim=1)[0]
    expected = -math.log(p[0]) - math.log(1.0001 - p[1] + 1e-12)
    assert out["mart_adv"].item() == pytest.approx(expected, rel=1e-6)
    assert out["mart_robust"].item() == pytest.approx(0.0, abs=1e-6)  # identical branches: KL = 0


def test_mart_keeps_authors_weight_offset_for_confident_clean_inputs():
    """When the clean prediction is certain (p_nat[y] == 1 in float32), the KL is still weighted by
    1.0000001 - 1 > 0, not dropped: the authors' constant, visible only in this corner."""
    logits_clean = torch.tensor([[100.0, 0.0, 0.0]])
    logits_adv = torch.tensor([[0.0, 100.0, 0.0]])
    out = mart_loss(logits_adv, logits_clean, torch.tensor([0]), beta=1.0)
    kl = -math.log(math.exp(-100.0) + 1e-12)  # p_nat is one-hot on class 0
    assert F.softmax(logits_clean, 1)[0, 0].item() == 1.0
    assert 0.0 < out["mart_robust"].item() == pytest.approx(kl * (1.0000001 - 1.0), rel=0.25)


def test_mart_robust_term_backpropagates_into_both_branches():
    torch.manual_seed(6)
    logits_adv = torch.randn(5, 10, dtype=torch.float32, requires_grad=True)
    logits_clean = torch.randn(5, 10, dtype=torch.float32, requires_grad=True)
    labels = torch.randint(0, 10, (5,))
    robust = mart_loss(logits_adv, logits_clean, labels)["mart_robust"]
    grad_adv, grad_clean = torch.autograd.grad(robust, (logits_adv, logits_clean))
    assert grad_adv.abs().sum() > 1e-3 and grad_clean.abs().sum() > 1e-3
    # And it is the gradient of the formula: directional finite difference of the float64 reference.
    direction = torch.randn(5, 10)
    h = 1e-4
    plus = mart_reference(logits_adv.detach() + h * direction, logits_clean.detach(), labels, 1.0)[2]
    minus = mart_reference(logits_adv.detach() - h * direction, logits_clean.detach(), labels, 1.0)[2]
    assert (grad_adv * direction).sum().item() == pytest.approx((plus - minus) / (2 * h), rel=1e-3, abs=1e-5)


def test_mart_beta_scales_only_the_robust_term():
    torch.manual_seed(4)
    logits_adv, logits_clean = torch.randn(8, 10), torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    outs = {beta: mart_loss(logits_adv, logits_clean, labels, beta) for beta in (0.0, 1.0, 6.0)}
    assert outs[0.0]["mart_robust"].item() > 0.01  # the test needs a non-trivial robust term
    for beta, out in outs.items():
        assert torch.equal(out["mart_adv"], outs[0.0]["mart_adv"])
        assert torch.equal(out["mart_robust"], outs[0.0]["mart_robust"])
        assert out["loss"].item() == pytest.approx(out["mart_adv"].item() + beta * out["mart_robust"].item(), rel=1e-6)
    assert torch.equal(outs[0.0]["loss"], outs[0.0]["mart_adv"])
    assert outs[6.0]["loss"].item() - outs[1.0]["loss"].item() == pytest.approx(5 * outs[0.0]["mart_robust"].item(),
                                                                               rel=1e-5)


def test_mart_half_precision_and_gradients():
    torch.manual_seed(5)
    logits_adv = torch.randn(4, 10, requires_grad=True)
    logits_clean = torch.randn(4, 10, requires_grad=True)
    labels = torch.tensor([0, 3, 9, 3])
    out = mart_loss(logits_adv, logits_clean, labels, 6.0)
    out["loss"].backward()
    # Gradients reach both branches (the authors' code does not detach the clean branch).
    assert logits_adv.grad.abs().sum() > 0 and logits_clean.grad.abs().sum() > 0
    half = mart_loss(logits_adv.detach().bfloat16(), logits_clean.detach().bfloat16(), labels)
    assert half["loss"].dtype == torch.float32
    with pytest.raises(ValueError, match="beta"):
        mart_loss(logits_adv, logits_clean, labels, beta=-0.5)


# ----------------------------------------------------------------------------- WideResNet

def expected_wrn_params(depth: int, k: int, num_classes: int) -> int:
    """By hand from the architecture: bias-free convs (k*k*in*out), BN = 2 per channel, a 1x1 conv
    shortcut (no BN) where the shape changes, final BN, linear 64k -> classes with bias."""
    n = (depth - 4) // 6
    total = 3 * 3 * 3 * 16  # stem conv, no BN after it (pre-activation blocks)
    in_planes = 16
    for planes, stride in zip((16 * k, 32 * k, 64 * k), (1, 2, 2)):
        for block in range(n):
            total += 2 * in_planes + 9 * in_planes * planes + 2 * planes + 9 * planes * planes
            if in_planes != planes or (stride != 1 and block == 0):
                total += in_planes * planes
            in_planes = planes
    return total + 2 * in_planes + in_planes * num_classes + num_classes


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_wrn34_10_formula_gives_the_cited_count():
    assert expected_wrn_params(34, 10, 10) == 46_160_474


@pytest.fixture(scope="module")
def wrn34():
    torch.manual_seed(0)
    return wrn34_10(10).eval()


def test_wrn34_10_param_count_and_shapes(wrn34):
    assert n_params(wrn34) == expected_wrn_params(34, 10, 10) == 46_160_474
    assert wrn34.feature_dim == 640
    assert sum(isinstance(m, nn.Conv2d) for m in wrn34.modules()) == 1 + 2 * 15 + 3  # stem, blocks, shortcuts
    with torch.no_grad():
        features, logits = wrn34(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, 640) and logits.shape == (2, 10)
    assert torch.isfinite(logits).all() and (features >= 0).all()  # features follow the final ReLU


@pytest.mark.parametrize("depth, k, classes", [(16, 2, 10), (28, 10, 10), (34, 10, 100), (16, 1, 10), (22, 4, 7)])
def test_wrn_param_counts_match_formula(depth, k, classes):
    assert n_params(wide_resnet(depth, k, classes)) == expected_wrn_params(depth, k, classes)


def test_wrn16_2_forward_backward_and_init():
    torch.manual_seed(0)
    model = wide_resnet(16, 2, 10)
    assert isinstance(model, WideResNet) and model.feature_dim == 128
    x = torch.rand(4, 3, 32, 32)
    features, logits = model(x)
    assert features.shape == (4, 128) and logits.shape == (4, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    fresh = wide_resnet(16, 2, 10)
    assert torch.equal(fresh.fc.bias, torch.zeros(10))
    bns = [m for m in fresh.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in bns)
    # kaiming fan_out: std = sqrt(2 / (3*3*out_channels)); a conv with in != out tells it from fan_in.
    conv = fresh.layers[2].conv1  # first block of stage 2
    assert (conv.in_channels, conv.out_channels) == (32, 64)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.05)
    # Non-32x32 input still pools to the feature vector.
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 16, 16))[0].shape == (1, 128)


def test_wrn_block_structure_matches_trades():
    """Pre-activation: a projection shortcut reads relu(bn1(x)), an identity shortcut the raw x."""
    torch.manual_seed(0)
    model = wide_resnet(16, 2, 10)
    blocks = list(model.layers)
    assert [b.shortcut is not None for b in blocks] == [True, False, True, False, True, False]  # n = 2 per stage
    for block in blocks:  # random BN affine/statistics so bn1 is not close to the identity
        for bn in (block.bn1, block.bn2):
            bn.weight.data.uniform_(0.5, 1.5); bn.bias.data.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5); bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(2, 16, 8, 8)
    for block in (blocks[0], blocks[2]):  # projection, stride 1 then stride 2
        x_in = x if block is blocks[0] else torch.randn(2, 32, 8, 8)
        pre = F.relu(block.bn1(x_in))
        body = block.conv2(F.relu(block.bn2(block.conv1(pre))))
        with torch.no_grad():
            assert torch.allclose(block(x_in), body + block.shortcut(pre), atol=1e-5)
            assert not torch.allclose(block(x_in), body + block.shortcut(x_in), atol=1e-3)
    identity = blocks[1]
    x_in = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        body = identity.conv2(F.relu(identity.bn2(identity.conv1(F.relu(identity.bn1(x_in))))))
        assert torch.allclose(identity(x_in), body + x_in, atol=1e-5)
    assert blocks[2].conv1.stride == (2, 2) and blocks[2].shortcut.stride == (2, 2)


def test_wrn_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = wide_resnet(10, 1, 10, dropout=0.5)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x)[1], model(x)[1])
        model.train()
        assert not torch.equal(model(x)[1], model(x)[1])


@pytest.mark.parametrize("depth", [33, 35, 4, 0, 20])
def test_wrn_bad_depth_rejected(depth):
    with pytest.raises(ValueError, match="6n \\+ 4"):
        wide_resnet(depth, 2, 10)


def test_wrn_bad_other_arguments_rejected():
    for kwargs in ({"widen_factor": 0}, {"num_classes": 1}, {"dropout": 1.0}, {"dropout": -0.1}):
        with pytest.raises(ValueError):
            wide_resnet(16, **{"widen_factor": 1, **kwargs})
