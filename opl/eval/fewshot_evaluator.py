"""Episodic few-shot evaluation as an evaluator of the Trainer (`evaluators.episodes` in the configs).

At each evaluation, for every configured pool of novel classes (`DataSpec.episode_pools`: "val" for
model selection, "test" for the reported number) the frozen model in eval mode embeds

- every pool image once, un-augmented: the queries, and the support set when it is not augmented;
- the support images (the union over all episodes) once per augmented view, when support views are
  asked for: RFS passes every support image `n_aug_support_samples` times through the training
  augmentation (rfs dataset/mini_imagenet.py:158-165, eval_fewshot.py:48-49, default 5).

The pooled features (never the logits unless `feature_source="logits"`, which every metric then
says) go to `opl.eval.fewshot.evaluate_episodes`: L2-normalised, a logistic regression per
episode, mean accuracy and 95 % t interval. The episode lists are drawn once per evaluator from the
pool's labels with `sample_episodes` (seed `episode_seed`), so every evaluation, run and method
sees the same episodes; their sha256 goes into the metrics. The views' augmentation is seeded
per image (`view_params`), so a view does not depend on batching, devices or processes.

Data-parallel runs: each process embeds every world-th image, the features are gathered in pool
order on every process, rank 0 fits the episodes and the metrics are broadcast, so every rank
returns the same numbers.

Metrics, for pool p, `n_way` N and shot K (e.g. `test_5w1s_acc`): `p_NwKs_acc` (mean %),
`_ci95` (half-width), `_episodes` (how many), `_episodes_hash`, `_feature_source`, `_support_views`.
"""

import contextlib
import functools

import numpy as np
import torch

from opl.data.augment import BatchAugment
from opl.data.base import ImageTensors
from opl.engine.distributed import all_gather_rows, broadcast_object, world
from opl.errors import ConfigError
from opl.eval.fewshot import FEATURE_SOURCES, SOLVERS, Episodes, evaluate_episodes, sample_episodes


def view_params(augment: BatchAugment, n_images: int, seed: int, view: int) -> dict:
    """The augmentation parameters of view `view` for every image of a pool of `n_images`, drawn
    on the CPU from one generator per (seed, view): image i's draw is row i, whatever is embedded."""
    state = np.random.SeedSequence([seed, view]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)
    generator = torch.Generator().manual_seed(int(state))
    return augment.sample_params(torch.empty(n_images), generator)


@torch.no_grad()
def embed(model: torch.nn.Module, pool: ImageTensors, rows: torch.Tensor, augment: BatchAugment,
          batch_size: int, params: dict | None = None, output: str = "features",
          autocast=contextlib.nullcontext, memory_format=torch.contiguous_format) -> torch.Tensor:
    """float32 (len(rows), D) outputs of `model` in eval mode for the pool images `rows`, in that
    order, on `augment`'s device. With `params` (from `view_params`) each image is augmented with
    its own row of them, otherwise only normalised. Under data parallelism each process embeds
    every world-th row and every process receives them all."""
    rank, size = world()
    device = augment.mean.device
    mine = torch.arange(rank, len(rows), size)
    was_training = model.training
    model.eval()
    outputs = []
    # A process without rows still runs one image, so it knows the output width for the gather.
    for start in range(0, max(len(mine), 1), batch_size):
        index = rows[mine[start:start + batch_size]] if len(mine) else rows[:1]
        x = pool.images[index].to(device)
        if params is None:
            x = augment(x, train=False)
        else:
            x = augment.normalize(augment.apply(x, {k: v[index].to(device) for k, v in params.items()}))
        with autocast():
            features, logits = model(x.contiguous(memory_format=memory_format))
        outputs.append((features if output == "features" else logits).float()[:len(mine)])
    model.train(was_training)
    local = torch.cat(outputs)
    if size == 1:
        return local
    gathered = all_gather_rows(local)
    order = all_gather_rows(mine.to(device)).argsort()
    return gathered[order]


class EpisodeEvaluator:
    """N-way K-shot accuracy ± 95 % interval on seeded episodes of each pool (see the module docstring).

    pools: which `DataSpec.episode_pools` to evaluate ("val", "test").
    shots: K values, each evaluated on its own episode list (all from one pre-trained model).
    support_views: augmented copies of each support image, one number for every K or one per K
        (RFS: 5 for every K; the OPL authors: 5 for 1-shot, 1 for 5-shot). 0 = the un-augmented
        support images (not RFS: its support is always augmented, even with 1 copy).
    solver: a key of `opl.eval.fewshot.SOLVERS`: "torch" (batched Newton, float64, where the features
        are: the Trainer's device) or "sklearn" (RFS's call).
    amp: embed under the run's autocast (bf16 on CUDA) instead of float32 as RFS does.
    """

    def __init__(self, pools=("val", "test"), n_way: int = 5, shots=(1, 5), n_query: int = 15, n_episodes: int = 600,
                 episode_seed: int = 0, support_views=5, augment_seed: int = 0, solver: str = "torch",
                 feature_source: str = "features", amp: bool = False, chunk: int = 256):
        self.pools = tuple(pools)
        self.shots = tuple(int(k) for k in shots)
        views = [support_views] * len(self.shots) if isinstance(support_views, int) else list(support_views)
        if len(views) != len(self.shots) or any(int(v) < 0 for v in views):
            raise ConfigError(f"evaluators.episodes.support_views must be a number >= 0 or one per shot {list(self.shots)}, "
                              f"got {support_views!r}")
        if not self.pools or not self.shots or len(set(self.shots)) != len(self.shots):
            raise ConfigError(f"evaluators.episodes needs pools and distinct shots; got pools={list(self.pools)}, "
                              f"shots={list(self.shots)}")
        if solver not in SOLVERS:
            raise ConfigError(f"evaluators.episodes.solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        if feature_source not in FEATURE_SOURCES:
            raise ConfigError(f"evaluators.episodes.feature_source must be one of {FEATURE_SOURCES}, got {feature_source!r}")
        if min(n_way, n_query, n_episodes, chunk) < 1:
            raise ConfigError("evaluators.episodes: n_way, n_query, n_episodes and chunk must be >= 1")
        self.views = dict(zip(self.shots, (int(v) for v in views)))
        self.n_way, self.n_query, self.n_episodes = int(n_way), int(n_query), int(n_episodes)
        self.episode_seed, self.augment_seed = int(episode_seed), int(augment_seed)
        self.solver, self.feature_source, self.amp, self.chunk = solver, feature_source, bool(amp), int(chunk)
        self._cache: dict[str, tuple] = {}

    def episodes(self, name: str, pool: ImageTensors) -> dict[int, Episodes]:
        """The episode lists of one pool by shot, drawn on first use and kept."""
        cached = self._cache.get(name)
        if cached is None or cached[0] is not pool.labels:
            labels = pool.labels.numpy()
            drawn = {k: sample_episodes(labels, self.n_way, k, self.n_query, self.n_episodes, self.episode_seed)
                     for k in self.shots}
            cached = self._cache[name] = (pool.labels, drawn)
        return cached[1]

    def _pool(self, trainer, name: str) -> ImageTensors:
        pools = trainer.data.episode_pools
        if name not in pools:
            raise ConfigError(f"{trainer.data.name} has no episode pool {name!r} (it has {sorted(pools) or 'none'}); "
                              "set evaluators.episodes.pools, or null the evaluator for data without novel classes")
        if not isinstance(pools[name], ImageTensors):
            raise ConfigError(f"episode pool {name!r} of {trainer.data.name} must be held in memory (ImageTensors)")
        return pools[name]

    def __call__(self, trainer) -> dict:
        augment = BatchAugment(trainer.data.augment, trainer.data.mean, trainer.data.std).to(trainer.device)
        embed_with = functools.partial(
            embed, trainer.model, augment=augment, batch_size=trainer.cfg.eval_batch_size, output=self.feature_source,
            autocast=trainer.autocast if self.amp else contextlib.nullcontext,
            memory_format=torch.channels_last if trainer.cfg.channels_last else torch.contiguous_format)
        results = {}
        for name in self.pools:
            pool = self._pool(trainer, name)
            episodes = self.episodes(name, pool)
            features = embed_with(pool, torch.arange(len(pool)))
            most = max(self.views.values())
            views = None
            if most:
                support = np.unique(np.concatenate([episodes[k].support.ravel() for k in self.shots if self.views[k]]))
                rows = torch.from_numpy(support)
                views = features.new_zeros((most, *features.shape))
                for v in range(most):
                    params = view_params(augment, len(pool), self.augment_seed, v)
                    views[v, rows.to(features.device)] = embed_with(pool, rows, params=params)
            if trainer.rank != 0:
                continue
            for k in self.shots:
                metrics = evaluate_episodes(
                    features, pool.labels, episodes[k], SOLVERS[self.solver],
                    support_views=views[:self.views[k]] if self.views[k] else None,
                    feature_source=self.feature_source, chunk=self.chunk)
                prefix = f"{name}_{self.n_way}w{k}s_"
                results.update({prefix + "acc": float(metrics["acc"]), prefix + "ci95": float(metrics["ci95"]),
                                prefix + "episodes": metrics["n_episodes"],
                                prefix + "episodes_hash": metrics["episodes_hash"],
                                prefix + "feature_source": metrics["feature_source"],
                                prefix + "support_views": metrics["support_views"]})
        return broadcast_object(results)
