"""Episodic few-shot evaluation as in RFS (WangYueFt/rfs eval/meta_eval.py), on seeded episodes.

1. `sample_episodes` draws N-way K-shot Q-query episodes from a pool's label array. Episode e uses
   `np.random.RandomState(seed + e)` and exactly the calls of RFS's `MetaImageNet.__getitem__`
   (dataset/mini_imagenet.py:134-150: classes, then per class the support, then the queries among
   the rest), with classes in order of first appearance and each class's images in pool order, as
   RFS's `self.data` dict holds them. So seed 0 gives RFS's own fixed-seed episodes
   (`fix_seed=True`, the default of its training-time meta loaders), episode e does not depend on
   how many are drawn, and the list is the same for every method, run and machine (legacy
   RandomState streams are frozen). Its sha256 (`Episodes.digest`) goes into every record.
2. The pool is embedded once; `evaluate_episodes` L2-normalises the features (meta_eval.py:55-57,
   `is_norm=True`), fits a multinomial logistic regression on each support set and scores the
   queries: `fit_logistic_regression_sklearn` (RFS's exact call, meta_eval.py:67-74) or
   `fit_logistic_regression_torch`, which solves all episodes of a chunk at once (batched Newton
   on the same objective, CPU or GPU).
3. Mean accuracy and the 95 % Student-t half-width over episodes (meta_eval.py:19-24).
"""

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from opl.errors import ConfigError
from opl.results.stats import NO_SPREAD, mean_minus_constant

FEATURE_SOURCES = ("features", "logits")


@dataclass(frozen=True)
class Episodes:
    """Episode e: classes[e] (pool labels; episode label k is classes[e, k]), and pool indices of
    its support (class-major: K shots of class 0, then class 1, ...) and queries (Q per class)."""

    n_way: int
    n_shot: int
    n_query: int
    seed: int
    classes: np.ndarray  # (E, n_way)
    support: np.ndarray  # (E, n_way * n_shot)
    query: np.ndarray  # (E, n_way * n_query)

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def support_labels(self) -> np.ndarray:
        return np.tile(np.repeat(np.arange(self.n_way), self.n_shot), (len(self), 1))

    @property
    def query_labels(self) -> np.ndarray:
        return np.tile(np.repeat(np.arange(self.n_way), self.n_query), (len(self), 1))

    def digest(self) -> str:
        """sha256 of the episode shape and every class and index, as little-endian int64."""
        h = hashlib.sha256(json.dumps([self.n_way, self.n_shot, self.n_query, len(self)]).encode())
        for array in (self.classes, self.support, self.query):
            h.update(np.ascontiguousarray(array, dtype="<i8").tobytes())
        return h.hexdigest()


def sample_episodes(labels, n_way: int, n_shot: int, n_query: int, n_episodes: int, seed: int = 0) -> Episodes:
    """`n_episodes` episodes over the pool whose label array is `labels` (see the module docstring)."""
    labels = np.asarray(labels)
    present, first = np.unique(labels, return_index=True)
    classes = present[np.argsort(first, kind="stable")]  # RFS: dict keys in order of first appearance
    members = {c: np.flatnonzero(labels == c) for c in classes.tolist()}
    if min(n_way, n_shot, n_query, n_episodes) < 1:
        raise ConfigError(f"episodes need n_way, n_shot, n_query and n_episodes >= 1, got "
                          f"{n_way}, {n_shot}, {n_query}, {n_episodes}")
    if n_way > len(classes):
        raise ConfigError(f"{n_way}-way episodes need {n_way} classes; the pool has {len(classes)}")
    small = {c: len(m) for c, m in members.items() if len(m) < n_shot + n_query}
    if small:
        c, n = next(iter(small.items()))
        raise ConfigError(f"{n_shot}-shot {n_query}-query episodes need {n_shot + n_query} images per class; "
                          f"{len(small)} pool classes have fewer (class {c}: {n})")
    drawn, support, query = [], [], []
    for e in range(n_episodes):
        rng = np.random.RandomState(seed + e)
        chosen = rng.choice(classes, n_way, replace=False)
        drawn.append(chosen)
        for c in chosen.tolist():
            pool = members[c]
            shots = rng.choice(len(pool), n_shot, replace=False)
            queries = rng.choice(np.setxor1d(np.arange(len(pool)), shots), n_query, replace=False)
            support.append(pool[shots])
            query.append(pool[queries])
    shape = (n_episodes, -1)
    return Episodes(n_way, n_shot, n_query, seed, np.stack(drawn).astype(np.int64),
                    np.concatenate(support).reshape(shape).astype(np.int64),
                    np.concatenate(query).reshape(shape).astype(np.int64))


def fit_logistic_regression_sklearn(support, support_labels, query, C: float = 1.0, max_iter: int = 1000) -> np.ndarray:
    """Query predictions (E, Q) from scikit-learn, one fit per episode, as RFS calls it
    (meta_eval.py:67-74: L2 penalty, C=1, lbfgs, max_iter 1000, multinomial, random_state 0).

    scikit-learn >= 1.8 deprecates `penalty` and >= 1.7 removed `multi_class`; the defaults used
    here are the same model (L2, multinomial for 3+ classes). For 2-way episodes current versions
    fit the binomial model, RFS's (sklearn 0.23) the two-class multinomial one.
    """
    from sklearn.linear_model import LogisticRegression

    support, support_labels, query = (np.asarray(torch.as_tensor(a).cpu()) for a in (support, support_labels, query))
    predictions = []
    for xs, ys, xq in zip(support, support_labels, query):
        model = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=0)
        predictions.append(model.fit(xs, ys).predict(xq))
    return np.stack(predictions).astype(np.int64)


def _objective(theta, z, onehot, reg):
    logits = z @ theta
    data = (torch.logsumexp(logits, dim=2) - (logits * onehot).sum(dim=2)).sum(dim=1)
    return data + 0.5 * (reg * theta.square()).sum(dim=(1, 2))


def fit_logistic_regression_torch(support, support_labels, query, C: float = 1.0, max_iter: int = 100,
                                  tol: float | None = None, dtype: torch.dtype = torch.float64,
                                  device: str | torch.device | None = None, return_scores: bool = False) -> np.ndarray:
    """Query predictions (E, Q) (or, with return_scores, the class scores (E, Q, N) that
    scikit-learn's `decision_function` gives) from the same objective as scikit-learn's multinomial logistic
    regression (sum of cross-entropies + ||W||^2 / (2C), intercept unpenalised), solved for all E
    episodes at once by damped Newton with backtracking line search.

    The minimiser's W lies in the span of the support features (representer theorem), so each
    episode is solved in an orthonormal basis of that span: S + 1 coefficients per class instead
    of D + 1, with the same penalty. The intercepts' common shift leaves the objective unchanged;
    a tiny ridge on that block keeps the Newton system regular without moving the predictions.
    """
    device = torch.device(device) if device is not None else torch.as_tensor(support).device
    x = torch.as_tensor(support).to(device=device, dtype=dtype)
    xq = torch.as_tensor(query).to(device=device, dtype=dtype)
    y = torch.as_tensor(support_labels).to(device=device, dtype=torch.int64)
    tol = tol if tol is not None else (1e-9 if dtype == torch.float64 else 1e-4)
    n_episodes, n_support, dim = x.shape
    n_classes = int(y.max()) + 1
    if dim > n_support:
        basis, _ = torch.linalg.qr(x.transpose(1, 2))  # (E, D, S), orthonormal columns
        x, xq = x @ basis, xq @ basis
    ones = torch.ones(*x.shape[:2], 1, dtype=dtype, device=device)
    z = torch.cat([x, ones], dim=2)  # (E, S, P): features + intercept column
    zq = torch.cat([xq, torch.ones(*xq.shape[:2], 1, dtype=dtype, device=device)], dim=2)
    p_dim = z.shape[2]
    onehot = F.one_hot(y, n_classes).to(dtype)
    reg = torch.full((p_dim, 1), 1.0 / C, dtype=dtype, device=device)
    reg[-1] = 0.0  # intercept
    ridge = torch.zeros(p_dim, n_classes, dtype=dtype, device=device)
    ridge[-1] = 1e-10 if dtype == torch.float64 else 1e-5
    diag = (reg.expand(p_dim, n_classes) + ridge).reshape(-1)
    eye = torch.eye(n_classes, dtype=dtype, device=device)
    theta = torch.zeros(n_episodes, p_dim, n_classes, dtype=dtype, device=device)
    value = _objective(theta, z, onehot, reg)
    slack = 1e-12 if dtype == torch.float64 else 1e-5  # relative rounding of the objective
    for _ in range(max_iter):
        prob = torch.softmax(z @ theta, dim=2)  # (E, S, N)
        grad = z.transpose(1, 2) @ (prob - onehot) + reg * theta  # (E, P, N)
        active = grad.abs().amax(dim=(1, 2)) > tol
        if not bool(active.any()):
            break
        # Hessian over (a, k) = (feature, class): sum_s z_sa z_sb (p_sk [k == l] - p_sk p_sl) + reg
        blocks = torch.einsum("esa,esk,esb->ekab", z, prob, z)  # (E, N, P, P)
        outer = (z.unsqueeze(3) * prob.unsqueeze(2)).reshape(n_episodes, n_support, -1)  # (E, S, P*N)
        hess = torch.einsum("ekab,kl->eakbl", blocks, eye).reshape(n_episodes, p_dim * n_classes, -1)
        hess = hess - outer.transpose(1, 2) @ outer + torch.diag_embed(diag)
        step = torch.linalg.solve(hess, -grad.reshape(n_episodes, -1, 1)).reshape(theta.shape)
        step = step * active.view(-1, 1, 1)  # converged episodes stay where they are
        slope = (grad * step).sum(dim=(1, 2))
        size = torch.ones(n_episodes, 1, 1, dtype=dtype, device=device)
        for _ in range(40):  # backtracking (Armijo) per episode, up to the objective's rounding
            candidate = _objective(theta + size * step, z, onehot, reg)
            accepted = candidate <= value + 1e-4 * size.view(-1) * slope + slack * value.abs()
            if bool(accepted.all()):
                break
            size = torch.where(accepted.view(-1, 1, 1), size, size / 2)
        theta = theta + size * step
        value = _objective(theta, z, onehot, reg)
    scores = zq @ theta
    return scores.cpu().numpy() if return_scores else scores.argmax(dim=2).cpu().numpy().astype(np.int64)


# The solvers by the name `evaluators.episodes.solver` gives: (support, support_labels, query) -> predictions;
# the torch one runs on the device the features are on.
SOLVERS = {"sklearn": fit_logistic_regression_sklearn, "torch": fit_logistic_regression_torch}


def mean_confidence_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t interval), as RFS's mean_confidence_interval: 0 when every
    episode scored the same, NaN for a single value."""
    interval = mean_minus_constant(values, 0.0, confidence)
    if interval.undetermined == NO_SPREAD:
        return interval.estimate, 0.0
    half = interval.high - interval.estimate if interval.high is not None else math.nan
    return interval.estimate, half


def evaluate_episodes(features, labels, episodes: Episodes, solver=fit_logistic_regression_torch,
                      support_views=None, feature_source: str = "features", normalize: bool = True,
                      chunk: int = 256) -> dict:
    """Accuracy (%) over `episodes` from features computed once for the whole pool.

    features: (N, D) for every pool image (model features, or logits with feature_source="logits").
    labels: the pool's (N,) labels the episodes were drawn from (checked against the episodes).
    support_views: optional (V, N, D) features of V augmented copies of every pool image; the
        support set is then the V copies of each support image (RFS's n_aug_support_samples,
        meta_eval + dataset/mini_imagenet.py:158-165), the queries stay un-augmented.
    """
    if feature_source not in FEATURE_SOURCES:
        raise ConfigError(f"feature_source must be one of {FEATURE_SOURCES}, got {feature_source!r}")
    features = torch.as_tensor(features)
    labels = np.asarray(torch.as_tensor(labels).cpu())
    if labels.shape != (features.shape[0],):
        raise ConfigError(f"{features.shape[0]} feature rows but labels of shape {labels.shape}")
    drawn = episodes.classes[np.arange(len(episodes))[:, None], episodes.support_labels]
    if not (np.array_equal(labels[episodes.support], drawn)
            and np.array_equal(labels[episodes.query],
                               episodes.classes[np.arange(len(episodes))[:, None], episodes.query_labels])):
        raise ConfigError("the episodes were not drawn from this pool (labels at their indices differ)")
    views = features.unsqueeze(0) if support_views is None else torch.as_tensor(support_views)
    if normalize:
        features, views = F.normalize(features, dim=-1), F.normalize(views, dim=-1)
    accuracies = []
    for start in range(0, len(episodes), chunk):
        rows = slice(start, start + chunk)
        support_index = torch.as_tensor(episodes.support[rows], device=views.device)
        support = views[:, support_index].permute(1, 0, 2, 3).flatten(1, 2)  # (e, V * S, D), view-major
        support_labels = np.tile(episodes.support_labels[rows], (1, views.shape[0]))
        query = features[torch.as_tensor(episodes.query[rows], device=features.device)]
        predictions = solver(support, support_labels, query)
        accuracies.append((predictions == episodes.query_labels[rows]).mean(axis=1) * 100.0)
    accuracies = np.concatenate(accuracies)
    mean, half = mean_confidence_interval(accuracies)
    return {
        "acc": mean,
        "ci95": half,
        "n_episodes": len(episodes),
        "episodes_hash": episodes.digest(),
        "feature_source": feature_source,
        "n_way": episodes.n_way,
        "n_shot": episodes.n_shot,
        "n_query": episodes.n_query,
        "support_views": 0 if support_views is None else int(views.shape[0]),
        "episode_acc": accuracies,
    }
