"""OrthogonalProjectionLoss and ClassificationLoss against an independent float64 reference.

The reference below is a plain Python double loop over ordered pairs (i, j) that follows
paper.md section 1 literally; it shares no code with the library.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from opl.losses import ClassificationLoss, OrthogonalProjectionLoss, ce_plus_opl

EPS = 1e-6
MODES = ("elementwise", "mean", "none")


def reference_opl(features, labels, gamma=0.5, neg_abs="elementwise", eps=EPS):
    """Paper.md section 1, by hand: cosines as dot / (|a| |b|), means with `count + eps` denominators."""
    rows = features.detach().to(torch.float64).tolist()
    ys = [int(v) for v in labels.tolist()]
    norms = [math.sqrt(sum(v * v for v in r)) for r in rows]
    n = len(rows)
    pos_sum, pos_n, neg_sum, neg_abs_sum, neg_n = 0.0, 0, 0.0, 0.0, 0
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            cos = sum(a * b for a, b in zip(rows[i], rows[j])) / (norms[i] * norms[j])
            if ys[i] == ys[j]:
                pos_sum += cos
                pos_n += 1
            else:
                neg_sum += cos
                neg_abs_sum += abs(cos)
                neg_n += 1
    s = pos_sum / (pos_n + eps)
    if neg_abs == "elementwise":
        d = neg_abs_sum / (neg_n + eps)
    elif neg_abs == "mean":
        d = abs(neg_sum / (neg_n + eps))
    elif neg_abs == "none":
        d = neg_sum / (neg_n + eps)
    else:
        raise AssertionError(neg_abs)
    return {"loss": (1.0 - s) + gamma * d, "s": s, "d": d, "pos_pairs": pos_n, "neg_pairs": neg_n}


def assert_matches_reference(parts, ref, atol):
    assert parts.loss.item() == pytest.approx(ref["loss"], abs=atol)
    assert parts.s.item() == pytest.approx(ref["s"], abs=atol)
    assert parts.d.item() == pytest.approx(ref["d"], abs=atol)
    assert parts.pos_pairs.item() == ref["pos_pairs"]
    assert parts.neg_pairs.item() == ref["neg_pairs"]


def make_batch(batch, dim, num_classes, seed, signed=True):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, dim, generator=g)
    if not signed:
        features = features.relu() + 0.01  # post-ReLU-like, no all-zero row
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    return features, labels


# --------------------------------------------------------------------------- value vs reference


@pytest.mark.parametrize("neg_abs", MODES)
@pytest.mark.parametrize(
    "batch,dim,num_classes",
    [(4, 3, 2), (9, 5, 3), (16, 8, 2), (24, 16, 12), (32, 7, 100), (13, 64, 4)],
)
def test_matches_reference_float32(batch, dim, num_classes, neg_abs):
    """float32 loss, s, d and pair counts equal the float64 double-loop reference (signed features)."""
    features, labels = make_batch(batch, dim, num_classes, seed=batch * 31 + dim)
    gamma = 0.7
    parts = OrthogonalProjectionLoss(gamma=gamma, neg_abs=neg_abs).components(features, labels)
    assert parts.loss.dtype == torch.float32
    assert_matches_reference(parts, reference_opl(features, labels, gamma, neg_abs), atol=2e-6)


@pytest.mark.parametrize("neg_abs", MODES)
def test_matches_reference_float64_tight(neg_abs):
    """float64 input stays float64 and matches the reference to near machine precision."""
    features, labels = make_batch(20, 6, 3, seed=5)
    features = features.double()
    parts = OrthogonalProjectionLoss(gamma=2.0, neg_abs=neg_abs).components(features, labels)
    assert parts.loss.dtype == torch.float64
    assert_matches_reference(parts, reference_opl(features, labels, 2.0, neg_abs), atol=1e-12)


def test_gamma_scales_only_d_term():
    """loss = (1 - s) + gamma * d for several gammas, including gamma = 0 (pure 1 - s)."""
    features, labels = make_batch(12, 5, 3, seed=11)
    ref = reference_opl(features, labels, gamma=0.0)
    for gamma in (0.0, 0.5, 1.0, 2.0, 7.5):
        loss = OrthogonalProjectionLoss(gamma=gamma)(features, labels)
        assert loss.item() == pytest.approx((1 - ref["s"]) + gamma * ref["d"], abs=3e-6)


def test_pair_counts_from_class_sizes():
    """pos_pairs = sum_c n_c (n_c - 1), neg_pairs = B^2 - sum_c n_c^2 (ordered pairs)."""
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])  # class sizes 3, 2, 1, 4
    features = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    parts = OrthogonalProjectionLoss().components(features, labels)
    assert parts.pos_pairs.item() == 3 * 2 + 2 * 1 + 0 + 4 * 3  # 20
    assert parts.neg_pairs.item() == 100 - (9 + 4 + 1 + 16)  # 70
    assert parts.pos_pairs.item() + parts.neg_pairs.item() == 10 * 9


# --------------------------------------------------------------------------- degenerate batches


@pytest.mark.parametrize("neg_abs", MODES)
def test_all_one_class(neg_abs):
    """One class: no negative pair, so d = 0 and neg_pairs = 0; s still the mean off-diagonal cosine."""
    features = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    labels = torch.full((7,), 3)
    parts = OrthogonalProjectionLoss(gamma=0.5, neg_abs=neg_abs).components(features, labels)
    assert parts.neg_pairs.item() == 0
    assert parts.pos_pairs.item() == 42
    assert parts.d.item() == 0.0
    assert torch.isfinite(parts.loss)
    ref = reference_opl(features, labels, 0.5, neg_abs)
    assert_matches_reference(parts, ref, atol=2e-6)
    assert parts.loss.item() == pytest.approx(1.0 - ref["s"], abs=2e-6)


@pytest.mark.parametrize("neg_abs", MODES)
def test_all_labels_distinct(neg_abs):
    """All labels distinct: no positive pair, so s = 0 (not NaN) and pos_pairs = 0; loss = 1 + gamma d."""
    features = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(6)
    parts = OrthogonalProjectionLoss(gamma=0.5, neg_abs=neg_abs).components(features, labels)
    assert parts.pos_pairs.item() == 0
    assert parts.neg_pairs.item() == 30
    assert parts.s.item() == 0.0
    ref = reference_opl(features, labels, 0.5, neg_abs)
    assert_matches_reference(parts, ref, atol=2e-6)
    assert parts.loss.item() == pytest.approx(1.0 + 0.5 * ref["d"], abs=2e-6)


def test_batch_of_two_same_class():
    """Two samples of one class: s = cos(f0, f1) * 2 / (2 + eps), d = 0, loss = 1 - s."""
    f = torch.tensor([[1.0, 2.0, 0.0], [2.0, -1.0, 3.0]], dtype=torch.float64)
    cos = (1 * 2 + 2 * -1 + 0 * 3) / (math.sqrt(5) * math.sqrt(14))
    parts = OrthogonalProjectionLoss(gamma=0.5).components(f, torch.tensor([4, 4]))
    expected_s = 2 * cos / (2 + EPS)
    assert parts.s.item() == pytest.approx(expected_s, abs=1e-14)
    assert parts.d.item() == 0.0
    assert parts.loss.item() == pytest.approx(1 - expected_s, abs=1e-14)
    assert (parts.pos_pairs.item(), parts.neg_pairs.item()) == (2, 0)


@pytest.mark.parametrize("neg_abs,expected_d", [("elementwise", 0.6), ("mean", 0.6), ("none", -0.6)])
def test_batch_of_two_different_classes(neg_abs, expected_d):
    """Two samples of different classes with cos = -0.6: s = 0, d per neg_abs mode, loss = 1 + gamma d."""
    f = torch.tensor([[3.0, 4.0], [-3.0, 0.0]], dtype=torch.float64)  # cos = -9 / (5 * 3) = -0.6
    parts = OrthogonalProjectionLoss(gamma=2.0, neg_abs=neg_abs).components(f, torch.tensor([0, 1]))
    d = 2 * expected_d / (2 + EPS)
    assert parts.s.item() == 0.0
    assert parts.d.item() == pytest.approx(d, abs=1e-14)
    assert parts.loss.item() == pytest.approx(1.0 + 2.0 * d, abs=1e-14)
    assert (parts.pos_pairs.item(), parts.neg_pairs.item()) == (0, 2)


def test_perfect_geometry_reaches_minimum():
    """Identical same-class features and orthogonal classes give loss ~ 0 (s ~ 1, d = 0)."""
    e = torch.eye(3, dtype=torch.float64)
    features = torch.cat([e[0:1] * 2, e[0:1] * 5, e[1:2], e[1:2] * 3, e[2:3] * 0.5, e[2:3]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    parts = OrthogonalProjectionLoss(gamma=0.5).components(features, labels)
    assert parts.d.item() == 0.0
    assert parts.s.item() == pytest.approx(6 / (6 + EPS), abs=1e-14)
    assert parts.loss.item() == pytest.approx(1 - 6 / (6 + EPS), abs=1e-14)


# --------------------------------------------------------------------------- gradients / invariances


@pytest.mark.parametrize("neg_abs", MODES)
def test_gradcheck_float64(neg_abs):
    """Analytical gradients w.r.t. features agree with finite differences (float64)."""
    g = torch.Generator().manual_seed(3)
    features = torch.randn(6, 4, generator=g, dtype=torch.float64) + 0.3
    features.requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    loss_fn = OrthogonalProjectionLoss(gamma=0.8, neg_abs=neg_abs)
    # the |.| kinks must be far from the probe points for finite differences to be valid
    ref = reference_opl(features, labels, 0.8, "none")
    assert abs(ref["d"]) > 1e-3
    assert torch.autograd.gradcheck(lambda f: loss_fn(f, labels), (features,), eps=1e-6, atol=1e-6)
    loss_fn(features, labels).backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_gradient_is_orthogonal_to_each_row():
    """The loss depends only on directions, so d loss / d f_i is orthogonal to f_i."""
    features, labels = make_batch(10, 6, 3, seed=21)
    features = features.double().requires_grad_(True)
    OrthogonalProjectionLoss()(features, labels).backward()
    radial = (features.grad * features.detach()).sum(dim=1)
    assert features.grad.abs().max() > 1e-3
    assert radial.abs().max() < 1e-12


@pytest.mark.parametrize("neg_abs", MODES)
def test_invariant_to_positive_row_rescaling(neg_abs):
    """Scaling each feature row by its own positive factor leaves every component unchanged."""
    features, labels = make_batch(15, 8, 4, seed=7)
    features = features.double()
    scale = torch.exp(torch.randn(15, 1, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 2)
    loss_fn = OrthogonalProjectionLoss(gamma=0.5, neg_abs=neg_abs)
    a = loss_fn.components(features, labels)
    b = loss_fn.components(features * scale, labels)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("neg_abs", MODES)
def test_invariant_to_batch_permutation(neg_abs):
    """Permuting samples (features and labels together) leaves every component unchanged."""
    features, labels = make_batch(17, 5, 3, seed=9)
    features = features.double()
    perm = torch.randperm(17, generator=torch.Generator().manual_seed(10))
    assert not torch.equal(perm, torch.arange(17))
    loss_fn = OrthogonalProjectionLoss(gamma=0.5, neg_abs=neg_abs)
    a = loss_fn.components(features, labels)
    b = loss_fn.components(features[perm], labels[perm])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


def test_relabelling_classes_changes_nothing_but_splitting_does():
    """Only the partition matters: renaming classes is a no-op, merging two classes is not."""
    features, labels = make_batch(12, 5, 3, seed=12)
    loss_fn = OrthogonalProjectionLoss()
    base = loss_fn(features, labels)
    renamed = torch.tensor([7, 42, -1])[labels]
    torch.testing.assert_close(loss_fn(features, renamed), base, rtol=0, atol=1e-6)
    merged = torch.where(labels == 2, torch.zeros_like(labels), labels)
    assert abs(loss_fn(features, merged).item() - base.item()) > 1e-3


# --------------------------------------------------------------------------- dtypes


def test_bfloat16_input_computed_in_float32():
    """bf16 features give a float32 loss close to the float64 reference of the bf16-rounded features."""
    features, labels = make_batch(16, 12, 3, seed=13)
    fb = features.bfloat16()
    for neg_abs in MODES:
        parts = OrthogonalProjectionLoss(gamma=0.5, neg_abs=neg_abs).components(fb, labels)
        assert parts.loss.dtype == torch.float32
        assert parts.s.dtype == torch.float32 and parts.d.dtype == torch.float32
        assert_matches_reference(parts, reference_opl(fb.double(), labels, 0.5, neg_abs), atol=1e-5)


def test_float16_under_bf16_autocast_returns_float32():
    """Under CPU bf16 autocast, float16 input is still reduced in float32 (no bf16 matmul)."""
    features, labels = make_batch(16, 12, 3, seed=14)
    fh = features.half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = OrthogonalProjectionLoss(gamma=0.5).components(fh, labels)
    assert parts.loss.dtype == torch.float32
    # a bf16 Gram matrix would be off by ~1e-2; float32 matches to ~1e-6
    assert_matches_reference(parts, reference_opl(fh.double(), labels, 0.5), atol=1e-5)


# --------------------------------------------------------------------------- neg_abs modes


def test_neg_abs_modes_coincide_on_nonnegative_features():
    """With post-ReLU features every cosine is >= 0, so elementwise / mean / none are equal."""
    features, labels = make_batch(20, 10, 4, seed=15, signed=False)
    assert (features >= 0).all()
    results = [OrthogonalProjectionLoss(gamma=1.5, neg_abs=m).components(features, labels) for m in MODES]
    for other in results[1:]:
        for x, y in zip(results[0], other):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-7)
    assert results[0].d.item() > 0.1  # the d term is really present


def test_neg_abs_modes_differ_on_signed_features():
    """Signed features with anti-aligned classes: none < 0, mean = |none|, elementwise >= mean; s shared."""
    g = torch.Generator().manual_seed(16)
    direction = torch.randn(1, 8, generator=g)
    noise = torch.randn(12, 8, generator=g)
    labels = torch.tensor([0] * 6 + [1] * 6)
    features = torch.where(labels.view(-1, 1) == 0, direction, -direction) * 2 + noise
    parts = {m: OrthogonalProjectionLoss(gamma=1.0, neg_abs=m).components(features, labels) for m in MODES}
    d = {m: parts[m].d.item() for m in MODES}
    assert d["none"] < -0.05
    assert d["mean"] == pytest.approx(abs(d["none"]), abs=1e-7)
    assert d["elementwise"] >= d["mean"] - 1e-7
    assert d["elementwise"] > d["none"] + 0.1
    for m in MODES:
        assert parts[m].s.item() == pytest.approx(parts["none"].s.item(), abs=1e-7)
        assert parts[m].d.item() == pytest.approx(reference_opl(features, labels, 1.0, m)["d"], abs=2e-6)
    assert parts["elementwise"].loss.item() > parts["none"].loss.item()


def test_elementwise_strictly_exceeds_mean_with_mixed_signs():
    """When different-class cosines have mixed signs, mean |cos| > |mean cos| strictly."""
    features, labels = make_batch(24, 6, 3, seed=17)
    ref = reference_opl(features, labels, 0.5, "none")
    e = OrthogonalProjectionLoss(neg_abs="elementwise").components(features, labels).d.item()
    m = OrthogonalProjectionLoss(neg_abs="mean").components(features, labels).d.item()
    assert m == pytest.approx(abs(ref["d"]), abs=2e-6)
    assert e > m + 0.05


# --------------------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    "kwargs",
    [{"gamma": -0.1}, {"gamma": float("nan")}, {"neg_abs": "abs"}, {"neg_abs": "Elementwise"}, {"eps": 0.0}],
)
def test_rejects_bad_arguments(kwargs):
    """Negative / NaN gamma, unknown neg_abs and non-positive eps raise ValueError."""
    with pytest.raises(ValueError):
        OrthogonalProjectionLoss(**kwargs)


def test_rejects_non_2d_features():
    """Features must be (batch, dim): un-pooled maps are an error, not silently flattened."""
    with pytest.raises(ValueError):
        OrthogonalProjectionLoss()(torch.randn(4, 3, 2), torch.tensor([0, 0, 1, 1]))


# --------------------------------------------------------------------------- ClassificationLoss


def test_ce_plus_opl_dict_and_values():
    """ce_plus_opl returns loss/ce/opl/opl_s/opl_d with loss = ce + weight * opl and ce = F.cross_entropy."""
    g = torch.Generator().manual_seed(18)
    logits = torch.randn(10, 5, generator=g)
    features, labels = make_batch(10, 7, 5, seed=19)
    criterion = ce_plus_opl(weight=0.3, gamma=2.0, neg_abs="mean")
    out = criterion(logits, features, labels)
    assert set(out) == {"loss", "ce", "opl", "opl_s", "opl_d"}
    assert all(v.dim() == 0 for v in out.values())
    ref = reference_opl(features, labels, gamma=2.0, neg_abs="mean")
    torch.testing.assert_close(out["ce"], F.cross_entropy(logits, labels))
    assert out["opl"].item() == pytest.approx(ref["loss"], abs=2e-6)
    assert out["opl_s"].item() == pytest.approx(ref["s"], abs=2e-6)
    assert out["opl_d"].item() == pytest.approx(ref["d"], abs=2e-6)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + 0.3 * out["opl"].item(), abs=1e-6)
    # independent CE: -mean log softmax at the label
    logp = logits.double().log_softmax(dim=1)
    assert out["ce"].item() == pytest.approx(-logp[torch.arange(10), labels].mean().item(), abs=1e-6)


def test_ce_only_dict():
    """ClassificationLoss() is plain CE: keys loss/ce only, loss == ce, features ignored."""
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(20))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    criterion = ClassificationLoss()
    out = criterion(logits, torch.randn(6, 3), labels)
    assert set(out) == {"loss", "ce"}
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, labels))
    torch.testing.assert_close(out["ce"], out["loss"])
    assert criterion.needs_pairs is False


def test_needs_pairs_and_weight_validation():
    """OPL criteria need pairs; a negative OPL weight is rejected."""
    assert ce_plus_opl().needs_pairs is True
    assert ClassificationLoss(OrthogonalProjectionLoss(), weight=0.0).needs_pairs is True
    with pytest.raises(ValueError):
        ce_plus_opl(weight=-1.0)
    with pytest.raises(ValueError):
        ce_plus_opl(gamma=-1.0)


def test_ce_plus_opl_backward_reaches_features_and_logits():
    """The combined loss back-propagates into both logits (CE) and features (OPL)."""
    logits = torch.randn(8, 3, generator=torch.Generator().manual_seed(22)).requires_grad_(True)
    features, labels = make_batch(8, 5, 3, seed=23)
    features.requires_grad_(True)
    ce_plus_opl(weight=1.0)(logits, features, labels)["loss"].backward()
    assert logits.grad.abs().sum() > 0 and features.grad.abs().sum() > 0


# --------------------------------------------------------------------------- torch.compile


def _no_cxx_compiler(err: BaseException) -> bool:
    """True when `err` (or an exception it wraps) says inductor found no usable C++ compiler."""
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

    while err is not None:
        if isinstance(err, (InvalidCxxCompiler, CppCompileError)):
            return True
        err = err.__cause__ or err.__context__
    return False


def test_compiles_fullgraph_on_cpu():
    """The loss has no graph break / host sync: torch.compile(fullgraph=True) gives the same value."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import CppCompileError, InductorError, InvalidCxxCompiler

    features, labels = make_batch(8, 4, 3, seed=24)
    loss_fn = OrthogonalProjectionLoss(gamma=0.5)
    compiled = torch.compile(loss_fn, fullgraph=True)
    try:
        value = compiled(features, labels)
    except (BackendCompilerFailed, InductorError, CppCompileError, InvalidCxxCompiler) as err:
        if _no_cxx_compiler(err):
            pytest.skip(f"torch.compile needs a usable C++ compiler: {type(err).__name__}: {err}")
        raise
    finally:
        torch._dynamo.reset()
    assert value.item() == pytest.approx(reference_opl(features, labels, 0.5)["loss"], abs=2e-6)
    torch.testing.assert_close(value, loss_fn(features, labels), rtol=0, atol=1e-6)
