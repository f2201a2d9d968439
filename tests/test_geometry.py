"""feature_geometry against an explicit float64 double loop over ordered pairs i != j."""

import math

import pytest
import torch

from opl.eval.geometry import feature_geometry


def reference_geometry(features, labels):
    """Means over ordered pairs i != j of cos = dot / (|a| |b|), in float64 Python arithmetic."""
    rows = features.to(torch.float64).tolist()
    ys = [int(v) for v in labels.tolist()]
    norms = [math.sqrt(sum(v * v for v in r)) for r in rows]
    same, diff = [], []
    for i in range(len(rows)):
        for j in range(len(rows)):
            if i == j:
                continue
            cos = sum(a * b for a, b in zip(rows[i], rows[j])) / (norms[i] * norms[j])
            (same if ys[i] == ys[j] else diff).append(cos)
    nan = float("nan")
    return {
        "same_cos": sum(same) / len(same) if same else nan,
        "diff_abs_cos": sum(abs(c) for c in diff) / len(diff) if diff else nan,
        "diff_cos": sum(diff) / len(diff) if diff else nan,
    }


def signed_batch(n, dim, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    features = centres[labels] + 0.8 * torch.randn(n, dim, generator=g)  # signed, clustered
    return features, labels


@pytest.mark.parametrize("chunk", [1, 7, 37, 40, 1000])
def test_matches_reference_for_any_chunk(chunk):
    """Exact pair means for chunk < N (even non-dividing), chunk == N and chunk > N."""
    features, labels = signed_batch(37, 6, 4, seed=0)
    got = feature_geometry(features, labels, chunk=chunk)
    ref = reference_geometry(features, labels)
    assert set(got) == {"same_cos", "diff_abs_cos", "diff_cos"}
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key
    assert all(isinstance(v, float) for v in got.values())


def test_signed_features_separate_abs_and_signed_means():
    """With signed features diff_abs_cos > |diff_cos|; both match the reference."""
    features, labels = signed_batch(30, 5, 3, seed=1)
    got = feature_geometry(features, labels, chunk=8)
    ref = reference_geometry(features, labels)
    assert ref["diff_cos"] < ref["diff_abs_cos"] - 0.05  # the test data really has negative cosines
    assert got["diff_cos"] == pytest.approx(ref["diff_cos"], abs=1e-6)
    assert got["diff_abs_cos"] == pytest.approx(ref["diff_abs_cos"], abs=1e-6)
    assert got["same_cos"] == pytest.approx(ref["same_cos"], abs=1e-6)
    assert got["same_cos"] > ref["diff_cos"]


def test_diagonal_excluded_and_scale_invariant():
    """Self-pairs are not counted (a singleton class has no same pairs) and row scale is irrelevant."""
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 2])
    got = feature_geometry(features, labels, chunk=3)
    # same pairs: (0,1), (1,0) -> cos 0; diagonal (cos 1) must not be included
    assert got["same_cos"] == pytest.approx(0.0, abs=1e-7)
    ref = reference_geometry(features, labels)
    scaled = feature_geometry(features * torch.tensor([[5.0], [0.1], [2.0], [9.0]]), labels, chunk=2)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-6)
        assert scaled[key] == pytest.approx(ref[key], abs=1e-6)


def test_degenerate_label_sets_give_nan():
    """No same-class pair -> same_cos NaN; no different-class pair -> diff stats NaN."""
    features = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    distinct = feature_geometry(features, torch.arange(5), chunk=2)
    ref = reference_geometry(features, torch.arange(5))
    assert math.isnan(distinct["same_cos"])
    assert distinct["diff_cos"] == pytest.approx(ref["diff_cos"], abs=1e-6)
    one_class = feature_geometry(features, torch.zeros(5, dtype=torch.long), chunk=2)
    assert math.isnan(one_class["diff_cos"]) and math.isnan(one_class["diff_abs_cos"])
    assert one_class["same_cos"] == pytest.approx(reference_geometry(features, torch.zeros(5))["same_cos"], abs=1e-6)


def test_does_not_track_gradients_or_modify_input():
    """Runs under no_grad and leaves the input features untouched."""
    features, labels = signed_batch(12, 4, 3, seed=3)
    features.requires_grad_(True)
    before = features.detach().clone()
    got = feature_geometry(features, labels, chunk=5)
    assert torch.equal(features.detach(), before)
    assert got["same_cos"] == pytest.approx(reference_geometry(before, labels)["same_cos"], abs=1e-6)
