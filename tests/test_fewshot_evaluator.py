"""The episodic evaluator in the Trainer: cached features against RFS's per-episode loop, one
embedding per image per evaluation and view, seeded views independent of batching, identical
episodes across runs and methods, the same numbers on two data-parallel processes, the DropBlock
counter over training and resume, the class-folder few-shot builder, the experiments' recipes,
and few-shot cells in records and tables."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from scipy import stats
from sklearn.linear_model import LogisticRegression

import train
from fewshot_fixtures import SMALL_COUNTS, colour_benchmark, make_trainer, tiny_model, write_mini
from opl.data.augment import BatchAugment
from opl.data.fewshot_folders import fewshot_folders
from opl.engine.evaluate import ClassificationEvaluator
from opl.errors import ConfigError, DatasetNotFoundError
from opl.eval.fewshot import sample_episodes
from opl.eval.fewshot_evaluator import EpisodeEvaluator, embed, view_params
from opl.results.records import make_record
from opl.results.tables import cell_result, load_specs, parse_spec, table_markdown

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
# ====================================================================== the evaluator's numbers
def test_cached_features_equal_rfs_per_episode_loop(tmp_path):
    """RFS embeds each episode's images and fits scikit-learn's LR per episode; the evaluator embeds
    each pool image once. Un-augmented support: the accuracies must agree (up to one query)."""
    data = colour_benchmark()
    trainer = make_trainer(tmp_path, data, {})
    evaluator = EpisodeEvaluator(pools=["test"], n_way=5, shots=[1, 3], n_query=4, n_episodes=5, support_views=0,
                                 solver="sklearn")
    metrics = evaluator(trainer)
    pool, model = data.episode_pools["test"], trainer.model.eval()
    normalise = BatchAugment(data.augment, data.mean, data.std)
    for shot in (1, 3):
        episodes = sample_episodes(pool.labels.numpy(), 5, shot, 4, 5, seed=0)
        accuracies = []
        for e in range(5):  # RFS's meta_test loop: one image at a time, float32 features to scikit-learn
            with torch.no_grad():
                feats = {part: torch.cat([model(normalise(pool.images[[i]], train=False))[0] for i in idx])
                         for part, idx in (("support", episodes.support[e]), ("query", episodes.query[e]))}
            xs, xq = (F.normalize(feats[p], dim=1).numpy() for p in ("support", "query"))
            clf = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000, random_state=0)
            predicted = clf.fit(xs, episodes.support_labels[e]).predict(xq)
            accuracies.append(100.0 * np.mean(predicted == episodes.query_labels[e]))
        key = f"test_5w{shot}s_"
        assert abs(metrics[key + "acc"] - np.mean(accuracies)) <= 100.0 / 20 / 5 + 1e-9
        half = stats.sem(accuracies) * stats.t.ppf(0.975, len(accuracies) - 1)
        if metrics[key + "acc"] == pytest.approx(np.mean(accuracies), abs=1e-9):
            assert metrics[key + "ci95"] == pytest.approx(half, rel=1e-9)
        assert metrics[key + "episodes"] == 5 and metrics[key + "episodes_hash"] == episodes.digest()
        assert metrics[key + "feature_source"] == "features" and metrics[key + "support_views"] == 0


class RowCounter:
    """Counts the images every forward pass of a module sees (eval and train mode separately)."""

    def __init__(self, module):
        self.rows = {True: 0, False: 0}
        module.register_forward_pre_hook(lambda m, args: self.rows.__setitem__(
            m.training, self.rows[m.training] + args[0].shape[0]))


def test_each_pool_image_is_embedded_once_per_evaluation_and_view(tmp_path):
    data = colour_benchmark()
    trainer = make_trainer(tmp_path, data, {})
    counter = RowCounter(trainer.model)
    evaluator = EpisodeEvaluator(pools=["val", "test"], n_way=5, shots=[1, 2], n_query=3, n_episodes=6,
                                 support_views=[3, 1], solver="torch")
    expected = 0
    for name, pool in data.episode_pools.items():
        support = set()
        for shot in (1, 2):
            support |= set(sample_episodes(pool.labels.numpy(), 5, shot, 3, 6).support.ravel().tolist())
        expected += len(pool) + 3 * len(support)  # plain pass + 3 views of the support images
    first = evaluator(trainer)
    assert counter.rows == {False: expected, True: 0}
    episodes = evaluator.episodes("test", data.episode_pools["test"])
    second = evaluator(trainer)
    assert counter.rows == {False: 2 * expected, True: 0}
    assert first == second  # same model, same episodes, same seeded views
    assert evaluator.episodes("test", data.episode_pools["test"]) is episodes  # drawn once
    assert first["val_5w1s_support_views"] == 3 and first["val_5w2s_support_views"] == 1
    assert trainer.model.dropblock_step.item() == 0  # evaluation passes do not advance DropBlock


def test_augmented_views_are_seeded_per_image(tmp_path):
    data = colour_benchmark()
    model = tiny_model()
    augment = BatchAugment(data.augment, data.mean, data.std)
    pool = data.episode_pools["test"]
    params = view_params(augment, len(pool), seed=0, view=1)
    assert set(params) == {"offsets", "flip", "factors", "order"}
    whole = embed(model, pool, torch.arange(len(pool)), augment, batch_size=7, params=params)
    rows = torch.tensor([5, 0, 31, 12])
    part = embed(model, pool, rows, augment, batch_size=2, params=params)
    torch.testing.assert_close(part, whole[rows])  # independent of batching and of the other rows
    again = view_params(augment, len(pool), seed=0, view=1)
    assert all(torch.equal(params[k], again[k]) for k in params)
    other = view_params(augment, len(pool), seed=0, view=2)
    assert not torch.equal(params["offsets"], other["offsets"])
    # Each view is the training augmentation of that image, then normalisation, through the model.
    by_hand = model.eval()(augment.normalize(augment.apply(pool.images[[12]].clone(), {k: v[[12]] for k, v in params.items()})))[0]
    torch.testing.assert_close(whole[12:13], by_hand)
    plain = embed(model, pool, rows, augment, batch_size=4)
    assert not torch.allclose(plain, part)


def test_evaluator_rejects_impossible_settings(tmp_path):
    with pytest.raises(ConfigError, match="support_views"):
        EpisodeEvaluator(shots=[1, 5], support_views=[5])
    with pytest.raises(ConfigError, match="solver must be one of sklearn, torch, got 'liblinear'"):
        EpisodeEvaluator(solver="liblinear")
    with pytest.raises(ConfigError, match="feature_source"):
        EpisodeEvaluator(feature_source="pixels")
    trainer = make_trainer(tmp_path, colour_benchmark(), {})
    with pytest.raises(ConfigError, match="no episode pool 'novel'"):
        EpisodeEvaluator(pools=["novel"], n_episodes=2, n_query=2)(trainer)


# ====================================================================== through the Trainer
def compose_experiment(name, *overrides):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", *overrides])


def small_counts_overrides() -> list[str]:
    """SMALL_COUNTS as Hydra command-line overrides."""
    def value(v):
        return "{" + ",".join(f"{k}:{x}" for k, x in v.items()) + "}" if isinstance(v, dict) else ("null" if v is None else str(v))
    return [f"dataset.{k}={value(v)}" for k, v in SMALL_COUNTS.items()]


def tiny_run(name, root, run_dir, seed=0, epochs=2):
    cfg = compose_experiment(
        name, f"dataset.root={root}", f"seed={seed}", f"trainer.epochs={epochs}", "trainer.batch_size=8",
        "trainer.device=cpu", "trainer.eval_every=1", "trainer.progress=line", "model.widths=[8,16,16,32]",
        "evaluators.episodes.n_query=2", "evaluators.episodes.n_episodes=5", "evaluators.episodes.support_views=[2,1]",
        *small_counts_overrides())
    trainer, data = train.build(cfg, run_dir, json.dumps(OmegaConf.to_container(cfg, resolve=True)))
    return trainer, data, trainer.fit(), cfg


def test_pretraining_then_episodes_same_episodes_for_every_run_and_method(tmp_path):
    root = write_mini(tmp_path / "mini", per_class=8)
    ce, data, ce_summary, cfg = tiny_run("fewshot_mini_rfs", root, tmp_path / "ce")
    opl, _, opl_summary, _ = tiny_run("fewshot_mini_rfs_opl", root, tmp_path / "opl", seed=1, epochs=1)
    assert getattr(ce.criterion, "opl", None) is None and opl.criterion.opl is not None
    # a new evaluator from the same configuration, on the trained model: the same episodes, views, numbers
    fresh = train.instantiate_checked(cfg.evaluators.episodes)(ce)
    final = ce_summary["final_epoch_test"]
    for shot in (1, 5):
        key = f"5w{shot}s_"
        labels = data.episode_pools["test"].labels.numpy()
        digest = sample_episodes(labels, 5, shot, 2, 5, seed=0).digest()  # drawn independently
        assert final[key + "episodes_hash"] == opl_summary["final_epoch_test"][key + "episodes_hash"] == digest
        assert final[key + "episodes"] == 5 and final[key + "feature_source"] == "features"
        assert 0.0 <= final[key + "acc"] <= 100.0 and final[key + "ci95"] >= 0.0
        assert {k: fresh["test_" + k] for k in final if k.startswith(key)} == {k: v for k, v in final.items()
                                                                               if k.startswith(key)}
        val_digest = sample_episodes(data.episode_pools["val"].labels.numpy(), 5, shot, 2, 5, seed=0).digest()
        assert fresh[f"val_{key}episodes_hash"] == val_digest
    assert final["5w1s_support_views"] == 2 and final["5w5s_support_views"] == 1
    # every evaluation epoch reports both pools; the classification evaluator gives top1 (base classes)
    lines = [json.loads(line) for line in (tmp_path / "ce" / "metrics.jsonl").read_text().splitlines()]
    assert [("val_5w1s_acc" in r, "test_5w5s_acc" in r, "test_top1" in r) for r in lines] == [(True,) * 3] * 2
    assert ce_summary["best_val_selected_test"]["5w1s_acc"] is not None  # val_top1 = held-out base images
    # DropBlock counts training steps only: 2 epochs x 4 batches of 8 (32 images, drop_last), not
    # the evaluation passes.
    assert ce.model.dropblock_step.item() == ce.state.global_step == 8


class Stop(Exception):
    pass


def test_dropblock_counter_resumes_exactly(tmp_path):
    data = colour_benchmark()

    def run(run_dir, resume=False, stop_at=None):
        def stop(trainer, epoch, record):
            if epoch == stop_at:
                raise Stop

        trainer = make_trainer(run_dir, data, {"classification": ClassificationEvaluator(geometry=False)}, epochs=3,
                               drop_last=True)
        trainer.callbacks.append(stop)
        if resume:
            trainer.resume(trainer.last_checkpoint)
        try:
            trainer.fit()
        except Stop:
            pass
        return trainer

    whole = run(tmp_path / "whole")
    interrupted = run(tmp_path / "parts", stop_at=1)
    assert interrupted.model.dropblock_step.item() == 4  # 32 images / batch 8
    resumed = run(tmp_path / "parts", resume=True)
    assert whole.model.dropblock_step.item() == resumed.model.dropblock_step.item() == 12
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(value, resumed.model.state_dict()[key], msg=key)


def test_two_processes_report_the_numbers_of_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "fewshot_ddp_worker.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    from fewshot_ddp_worker import evaluate
    single = evaluate(tmp_path / "single")
    assert ranks[0] == ranks[1]
    assert ranks[0].keys() == single.keys()
    for key, value in single.items():
        assert ranks[0][key] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), key


# ====================================================================== the class-folder builder
def test_class_folder_fewshot_builder(cifar10_jpg_format_root):
    kwargs = dict(name="toy", source="cifar10/toy", root=str(cifar10_jpg_format_root), num_classes=3,
                  base_classes=["class2", "class0", "class5"], novel_classes=["class7", "class1"],
                  mean=[0.5] * 3, std=[0.25] * 3, augment={"hflip": True})
    spec = fewshot_folders(**kwargs)
    assert spec.train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6  # ids in base_classes order
    assert spec.test.labels.tolist() == [0] * 2 + [1] * 2 + [2] * 2 and spec.val is None
    pool = spec.episode_pools["test"]
    assert pool.labels.tolist() == [0, 0, 1, 1] and pool.images.shape == (4, 3, 32, 32)
    from PIL import Image
    first = np.asarray(Image.open(cifar10_jpg_format_root / "test" / "class7" / "0000.jpg").convert("RGB"))
    assert torch.equal(pool.images[0], torch.from_numpy(first.copy()).permute(2, 0, 1))
    assert spec.variant == "cifar10/toy/fewshot/base=class2,class0,class5/novel=class7,class1@test"
    subset = fewshot_folders(**kwargs, base_train_per_class=4, novel_per_class=1)
    assert subset.train.labels.bincount().tolist() == [4, 4, 4] and len(subset.episode_pools["test"]) == 2
    assert subset.variant.endswith("|base_train=4/class@0|novel=1/class@0")
    assert subset.fingerprint != spec.fingerprint and len(spec.fingerprint) == 16
    # The hashed text: [path under root, size] of every file read (3 base classes in train and test,
    # 2 novel in test), sorted by path; the sizes come from the file index.
    read = sorted(p for split, classes in (("train", (0, 2, 5)), ("test", (0, 1, 2, 5, 7)))
                  for c in classes for p in (cifar10_jpg_format_root / split / f"class{c}").iterdir())
    listing = [[p.relative_to(cifar10_jpg_format_root).as_posix(), p.stat().st_size] for p in read]
    assert len(listing) == 18 + 10 and spec.fingerprint == hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    with pytest.raises(ConfigError, match="disjoint"):
        fewshot_folders(**{**kwargs, "novel_classes": ["class0", "class1"]})
    with pytest.raises(ConfigError, match="num_classes=4 but"):
        fewshot_folders(**{**kwargs, "num_classes": 4})
    with pytest.raises(DatasetNotFoundError, match="class9x"):
        fewshot_folders(**{**kwargs, "novel_classes": ["class9x", "class1"]})


# ====================================================================== recipes
def test_fewshot_experiments_pin_the_rfs_recipes():
    mini = compose_experiment("fewshot_mini_rfs")
    assert mini.model._target_ == "opl.models.resnet12" and mini.model.dropblock_size == 5
    assert list(mini.model.widths) == [64, 160, 320, 640] and mini.model.dropblock_mask == "rfs"
    assert (mini.optim.lr, mini.optim.momentum, mini.optim.weight_decay) == (0.05, 0.9, 5e-4)
    # RFS decays after epochs 60 and 80: 61 and 81 are the first decayed epochs (opl/engine/schedule.py)
    assert (mini.trainer.epochs, list(mini.sched.milestones), mini.sched.gamma) == (100, [61, 81], 0.1)
    assert (mini.trainer.batch_size, mini.trainer.drop_last, mini.sched.warmup_epochs) == (64, True, 0)
    assert OmegaConf.to_container(mini.dataset.augment) == {
        "crop_padding": 8, "hflip": True, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4}
    episodes = mini.evaluators.episodes
    assert (episodes.n_way, list(episodes.shots), episodes.n_query, episodes.n_episodes) == (5, [1, 5], 15, 600)
    assert (episodes.support_views, episodes.feature_source, list(episodes.pools)) == (5, "features", ["val", "test"])
    assert mini.loss._target_ == "opl.losses.ClassificationLoss"
    for name, dataset, epochs, milestones, block in (
            ("tiered", "tiered_imagenet", 60, [31, 41, 51], 5), ("cifarfs", "cifar_fs", 90, [46, 61, 76], 2),
            ("fc100", "fc100", 90, [46, 61, 76], 2)):
        cfg = compose_experiment(f"fewshot_{name}_rfs")
        assert (cfg.dataset.name, cfg.trainer.epochs, list(cfg.sched.milestones)) == (dataset, epochs, milestones)
        assert cfg.model.dropblock_size == block and cfg.trainer.batch_size == 64
        assert OmegaConf.to_container(cfg.evaluators.episodes) == OmegaConf.to_container(episodes)
    for name in ("mini", "tiered", "cifarfs", "fc100"):
        base, opl = compose_experiment(f"fewshot_{name}_rfs"), compose_experiment(f"fewshot_{name}_rfs_opl")
        assert opl.loss._target_ == "opl.losses.ce_plus_opl"
        assert (opl.loss.weight, opl.loss.gamma, opl.loss.neg_abs) == (1.0, 1.0, "elementwise")
        # same recipe apart from the loss
        strip = lambda c: {k: v for k, v in OmegaConf.to_container(c).items() if k not in ("loss", "name")}  # noqa: E731
        assert strip(base) == strip(opl)
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        grid = compose("train", overrides=["experiment=fewshot_mini_rfs_opl", "sweep=fewshot_grid"],
                       return_hydra_config=True)
    assert grid.hydra.sweeper.params == {"loss.weight": "0.05,0.1,1.0,2.0", "loss.gamma": "0.5,1.0,2.0"}


# ====================================================================== records and tables
def fewshot_results(seed, acc, ci, episodes=600, overrides_config=None):
    config = {"evaluators": {"episodes": {"n_episodes": episodes}}, **(overrides_config or {})}
    metrics = {"epoch": 100, "top1": 80.0, "5w1s_acc": acc, "5w1s_ci95": ci, "5w1s_episodes": episodes,
               "5w1s_episodes_hash": "ab" * 32, "5w1s_feature_source": "features", "5w1s_support_views": 5}
    return {"schema_version": 1, "name": "fewshot_mini_rfs", "seed": seed, "data_variant": "mini_imagenet/rfs-files/x",
            "experiment_config": config, "metrics": {"final_epoch_test": metrics, "epochs": 100},
            "finished_at": "2026-01-01T00:00:00+00:00", "environment": {"device_name": "cpu"}, "code": {"commit": "c"}}


def test_fewshot_cells_in_records_and_tables():
    records = [make_record(fewshot_results(s, acc, ci), {}, []) for s, acc, ci in ((0, 62.0, 0.6), (1, 63.0, 0.8))]
    records.append(make_record(fewshot_results(2, 70.0, 0.3, episodes=3000), {"evaluators.episodes.n_episodes": 3000}, []))
    assert records[0]["metrics"]["final_epoch_test"]["5w1s_episodes_hash"] == "ab" * 32
    spec = parse_spec("fs", {
        "title": "few-shot", "source": "test", "metric": "top1", "cells": [
            {"row": "RFS", "column": "mini 1-shot", "metric": "5w1s_acc", "pm_metric": "5w1s_ci95", "paper": 62.02,
             "paper_pm": 0.60, "ours": {"experiment": "fewshot_mini_rfs", "data_variant": "mini_imagenet/rfs-files/x"}},
            {"row": "RFS 3000", "column": "mini 1-shot", "metric": "5w1s_acc", "pm_metric": "5w1s_ci95",
             "ours": {"experiment": "fewshot_mini_rfs", "data_variant": "mini_imagenet/rfs-files/x",
                      "overrides": {"evaluators.episodes.n_episodes": 3000}}}]})
    six_hundred = cell_result(spec.cells[0], "final_epoch_test", records)
    assert [r["seed"] for r in six_hundred.records] == [0, 1]  # the 3,000-episode run stays out
    assert six_hundred.summary.mean == pytest.approx(62.5)
    assert [r["seed"] for r in cell_result(spec.cells[1], "final_epoch_test", records).records] == [2]
    text = table_markdown(spec, records)
    assert "| 62.02 ± 0.6 | 62.50 ± 0.71 (n=2); within-run ± 0.70 |" in text  # the paper's ± as given (a float: 0.6)
    assert "70.00 ± — (n=1); within-run ± 0.30" in text
    with pytest.raises(Exception, match="pm_metric"):
        parse_spec("bad", {"title": "t", "source": "s", "metric": "top1",
                           "cells": [{"row": "a", "column": "b", "pm_metric": 3}]})


def test_paper_fewshot_cells_select_the_experiments_on_the_builders_variants(tmp_path):
    from opl.data.fewshot import fewshot

    spec = next(s for s in load_specs(REPO / "results" / "paper") if s.name == "fewshot")
    ours = [c for c in spec.cells if c.ours is not None]
    assert {c.ours.experiment for c in ours} == {f"fewshot_{d}_{m}" for d in ("mini", "tiered", "cifarfs", "fc100")
                                                for m in ("rfs", "rfs_opl")}
    assert all(c.metric in ("5w1s_acc", "5w5s_acc") and c.pm_metric == c.metric.replace("acc", "ci95") for c in ours)
    mini_cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "dataset" / "mini_imagenet.yaml"))
    mini_cfg.pop("_target_")
    variant = fewshot(**{**mini_cfg, **SMALL_COUNTS, "root": str(write_mini(tmp_path))}).variant
    assert {c.ours.data_variant for c in ours if c.ours.experiment.startswith("fewshot_mini")} == {variant}
