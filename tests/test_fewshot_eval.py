"""Episodic evaluation: seeded episodes (checked against a transcription of RFS's sampling loop),
the batched logistic-regression solver against scikit-learn, and the t interval against scipy."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from sklearn.linear_model import LogisticRegression

from opl.errors import ConfigError
from opl.eval.fewshot import (evaluate_episodes, fit_logistic_regression_sklearn, fit_logistic_regression_torch,
                              mean_confidence_interval, sample_episodes)


def pool_labels(n_classes=12, per_class=30, seed=0):
    """A pool in file order with shuffled, sparse class ids (as RFS's novel pickles can have)."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(1000, n_classes, replace=False)
    return rng.permutation(np.repeat(ids, per_class))


def rfs_episode(labels, item, n_ways, n_shots, n_queries):
    """RFS's MetaImageNet.__init__ / __getitem__ with fix_seed=True (dataset/mini_imagenet.py:127-150),
    returning pool indices instead of images."""
    data = {}
    for idx in range(len(labels)):
        data.setdefault(labels[idx], []).append(idx)
    classes = list(data.keys())
    np.random.seed(item)
    cls_sampled = np.random.choice(classes, n_ways, False)
    support, query = [], []
    for cls in cls_sampled:
        imgs = np.asarray(data[cls])
        support_ids = np.random.choice(range(imgs.shape[0]), n_shots, False)
        query_ids = np.setxor1d(np.arange(imgs.shape[0]), support_ids)
        query_ids = np.random.choice(query_ids, n_queries, False)
        support.append(imgs[support_ids])
        query.append(imgs[query_ids])
    return cls_sampled, np.concatenate(support), np.concatenate(query)


def test_seed_zero_gives_rfs_fixed_seed_episodes():
    labels = pool_labels()
    episodes = sample_episodes(labels, 5, 5, 15, 20, seed=0)
    for e in range(20):
        classes, support, query = rfs_episode(labels, e, 5, 5, 15)
        assert episodes.classes[e].tolist() == classes.tolist()
        assert episodes.support[e].tolist() == support.tolist()
        assert episodes.query[e].tolist() == query.tolist()


def test_episodes_are_deterministic_well_formed_and_hashed():
    labels = pool_labels()
    episodes = sample_episodes(labels, 5, 1, 15, 50, seed=7)
    again = sample_episodes(labels, 5, 1, 15, 50, seed=7)
    assert episodes.digest() == again.digest() and len(episodes.digest()) == 64
    for name in ("classes", "support", "query"):
        assert np.array_equal(getattr(episodes, name), getattr(again, name))
    # episode e does not depend on how many are drawn; another seed gives other episodes
    assert np.array_equal(sample_episodes(labels, 5, 1, 15, 10, seed=7).support, episodes.support[:10])
    assert sample_episodes(labels, 5, 1, 15, 50, seed=8).digest() != episodes.digest()
    assert sample_episodes(labels, 5, 2, 15, 50, seed=7).digest() != episodes.digest()
    for e in range(len(episodes)):
        classes = episodes.classes[e]
        assert len(set(classes.tolist())) == 5 and set(classes.tolist()) <= set(labels.tolist())
        assert not set(episodes.support[e].tolist()) & set(episodes.query[e].tolist())
        assert len(set(episodes.query[e].tolist())) == 75
        assert labels[episodes.support[e]].tolist() == classes[episodes.support_labels[e]].tolist()
        assert labels[episodes.query[e]].tolist() == classes[episodes.query_labels[e]].tolist()
    assert episodes.support_labels[0].tolist() == [0, 1, 2, 3, 4]
    assert episodes.query_labels[0].tolist() == [k for k in range(5) for _ in range(15)]


def test_impossible_episodes_are_config_errors():
    labels = pool_labels(n_classes=4, per_class=10)
    with pytest.raises(ConfigError, match="5-way episodes need 5 classes; the pool has 4"):
        sample_episodes(labels, 5, 1, 15, 1)
    with pytest.raises(ConfigError, match="5-shot 6-query episodes need 11 images per class"):
        sample_episodes(labels, 2, 5, 6, 1)


def clustered_features(n_classes=16, per_class=40, dim=64, spread=0.35, seed=0):
    """Overlapping Gaussian classes: logistic regression is far from perfect on them."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    features = rng.normal(size=(n_classes, dim))[labels] * spread + rng.normal(size=(len(labels), dim))
    return torch.from_numpy(features.astype(np.float32)), labels


@pytest.mark.parametrize("shots", [1, 5])
def test_torch_solver_matches_scikit_learn_on_the_same_episodes(shots):
    features, labels = clustered_features()
    episodes = sample_episodes(labels, 5, shots, 15, 40, seed=0)
    rfs = evaluate_episodes(features, labels, episodes, fit_logistic_regression_sklearn)
    ours = evaluate_episodes(features, labels, episodes, fit_logistic_regression_torch)
    single = evaluate_episodes(features, labels, episodes,
                               lambda *a: fit_logistic_regression_torch(*a, dtype=torch.float32))
    assert 35.0 < rfs["acc"] < 90.0  # a task where the classifier matters
    assert abs(ours["acc"] - rfs["acc"]) <= 0.1 and abs(single["acc"] - rfs["acc"]) <= 0.1
    assert ours["episodes_hash"] == rfs["episodes_hash"] == episodes.digest()


def test_torch_solver_reaches_scikit_learns_optimum():
    """At a tight tolerance scikit-learn's minimiser and ours give the same class scores."""
    features, labels = clustered_features(seed=1)
    features = F.normalize(features.double(), dim=1)
    episodes = sample_episodes(labels, 5, 5, 15, 8, seed=3)
    support, query = features[episodes.support], features[episodes.query]
    scores = fit_logistic_regression_torch(support, episodes.support_labels, query, return_scores=True)
    for e in range(len(episodes)):
        model = LogisticRegression(C=1.0, tol=1e-12, max_iter=100_000).fit(support[e].numpy(),
                                                                           episodes.support_labels[e])
        reference = model.decision_function(query[e].numpy())
        # scores are defined up to a common shift of the (unpenalised) intercepts
        centred = scores[e] - scores[e].mean(axis=1, keepdims=True)
        np.testing.assert_allclose(centred, reference - reference.mean(axis=1, keepdims=True), atol=1e-6)


def test_interval_matches_scipy():
    values = np.random.default_rng(0).uniform(40, 90, 600)
    mean, half = mean_confidence_interval(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert mean == pytest.approx(values.mean(), rel=1e-12)
    assert half == pytest.approx((high - low) / 2, rel=1e-10)
    assert np.isnan(mean_confidence_interval([70.0])[1])


def test_evaluate_episodes_uses_one_feature_pass_and_reports_the_protocol():
    features, labels = clustered_features(n_classes=8, per_class=25)
    episodes = sample_episodes(labels, 5, 1, 10, 6, seed=0)
    seen = []

    def recording_solver(support, support_labels, query):
        seen.append((support, support_labels, query))
        return np.zeros(query.shape[:2], dtype=np.int64)  # always class 0

    views = torch.stack([features * 2.0, features + 1.0])  # two "augmented" copies of every image
    result = evaluate_episodes(features, labels, episodes, recording_solver, support_views=views)
    assert result["acc"] == pytest.approx(100.0 / 5)  # one class in five right
    assert {k: result[k] for k in ("n_episodes", "feature_source", "n_way", "n_shot", "n_query", "support_views")} == {
        "n_episodes": 6, "feature_source": "features", "n_way": 5, "n_shot": 1, "n_query": 10, "support_views": 2}
    assert result["episodes_hash"] == episodes.digest() and result["ci95"] == 0.0
    support, support_labels, query = seen[0]
    assert support.shape == (6, 10, 64) and query.shape == (6, 50, 64)
    assert support_labels[0].tolist() == [0, 1, 2, 3, 4] * 2
    normalized = F.normalize(views, dim=-1)
    assert torch.equal(support[2, :5], normalized[0, episodes.support[2]])
    assert torch.equal(support[2, 5:], normalized[1, episodes.support[2]])
    assert torch.allclose(query[2].norm(dim=1), torch.ones(50))
    with pytest.raises(ConfigError, match="not drawn from this pool"):
        evaluate_episodes(features, np.roll(labels, 1), episodes, recording_solver)
    with pytest.raises(ConfigError, match="feature_source"):
        evaluate_episodes(features, labels, episodes, recording_solver, feature_source="penultimate")
