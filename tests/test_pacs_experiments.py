"""The PACS experiments: the RSC code's recipe, our LR of every epoch against the RSC code's
early-stepped StepLR, the two choices a run must state (target, pretrained weights), the weights
round trip through the experiment's config, which records fill the paper's PACS cells, and the
Avg cell (mean over the four targets within a seed, then over seeds)."""

import functools
import hashlib
import importlib.util
import math
import statistics
import warnings

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torch import nn

from conftest import REPO
from opl.engine.schedule import build_scheduler
from opl.errors import CheckpointError
from opl.models import TimmBackbone
from opl.results.records import RecordError, config_overrides, run_key, strip_keys, validate_record
from opl.results.stats import welch_difference
from opl.results.tables import MeanOf, SpecError, cell_result, comparison_interval, load_specs, parse_spec, table_markdown
from train import instantiate_checked

PACS_EXPERIMENTS = ("pacs_erm", "pacs_erm_opl", "pacs_rsc", "pacs_rsc_opl")
TARGETS = {"Art": "art_painting", "Cartoon": "cartoon", "Sketch": "sketch", "Photo": "photo"}


def compose_run(*overrides, hydra_config=False):
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_config)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"opl_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- recipe ---------------------------------------------------------------------------------------
def test_head_recipe_of_the_rsc_code():
    for name in PACS_EXPERIMENTS:
        cfg = compose_run(f"experiment={name}")
        assert cfg.name == name and cfg.dataset._target_ == "opl.data.pacs.pacs"
        assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.nesterov) == (0.01, 0.9, 5e-4, False)
        assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.dataset.mirror_batch) == (20, 64, True)
        assert (cfg.sched.kind, list(cfg.sched.milestones), cfg.sched.gamma, cfg.sched.warmup_epochs) == ("multistep", [16], 0.1, 0)
        assert cfg.trainer.drop_last is True and cfg.trainer.eval_every == 1
        assert cfg.trainer.test_selection_after_epoch == 0  # the oracle: best test over every epoch
        assert (cfg.dataset.image_size, cfg.dataset.splits) == (222, "corrected")
        assert cfg.model.arch == "resnet18.tv_in1k"  # torchvision's weights when pretrained
        rsc = name.startswith("pacs_rsc")
        assert cfg.method._target_ == ("opl.methods.rsc.RSCStep" if rsc else "opl.methods.StandardStep")
        assert cfg.trainer.compile == (False if rsc else "auto")  # the RSC step refuses compile
        if name.endswith("_opl"):  # UNKNOWN for PACS: the authors' general recommendation
            assert (cfg.loss._target_, cfg.loss.weight, cfg.loss.gamma) == ("opl.losses.ce_plus_opl", 1.0, 0.5)
        else:
            assert cfg.loss._target_ == "opl.losses.ClassificationLoss"
    rsc = compose_run("experiment=pacs_rsc")
    assert rsc.trainer.compile is False
    assert (rsc.method.spatial_fraction, rsc.method.channel_fraction, rsc.method.batch_fraction_start,
            rsc.method.batch_fraction_step, rsc.method.confidence_offset) == (1 / 3, 0.3125, 0.3, 0.2, 1e-4)
    assert compose_run("experiment=pacs_rsc", "model=resnet50_tv").model.arch == "resnet50.tv_in1k"


def test_september_2020_recipe_is_one_experiment_away():
    sep, head = compose_run("experiment=pacs_rsc_sep2020"), compose_run("experiment=pacs_rsc")
    assert (sep.trainer.epochs, sep.trainer.batch_size, sep.dataset.mirror_batch, sep.optim.lr) == (30, 128, False, 0.008)
    assert list(sep.sched.milestones) == [24] and sep.method.batch_fraction_step == 0.0
    assert math.ceil(512 * sep.method.channel_fraction) == int(512 / 3.0) == 170  # ResNet-18's channels
    assert round(128 * sep.method.batch_fraction_start) == int(round(128 / 3.0))
    assert sep.method.confidence_offset == 1e-5
    assert sep.method.spatial_fraction == head.method.spatial_fraction
    opl = compose_run("experiment=pacs_rsc_opl_sep2020")
    assert opl.loss.gamma == 0.5 and opl.trainer.epochs == 30 and opl.method._target_ == sep.method._target_


# ---- LR per epoch, against the RSC code's StepLR ----------------------------------------------------
def rsc_code_lrs(lr: float, epochs: int) -> list[float]:
    """The LR of each 0-based epoch in the RSC code: StepLR(step_size=int(0.8 * epochs), gamma 0.1)
    (optimizer/optimizer_helper.py:11-12) stepped at the START of every epoch (train.py:131)."""
    weight = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=int(epochs * .8))
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": the RSC code's order
        for _ in range(epochs):
            scheduler.step()
            lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("name", ["pacs_erm", "pacs_rsc_opl", "pacs_rsc_sep2020", "pacs_cpu_rsc"])
def test_lr_of_every_epoch_equals_the_rsc_code(name):
    cfg = compose_run(f"experiment={name}")
    schedule = OmegaConf.to_container(cfg.sched, resolve=True)
    weight = nn.Parameter(torch.zeros(1))
    optimizer = instantiate_checked(cfg.optim)([weight])
    iters = 3
    scheduler = build_scheduler(optimizer, iters, cfg.trainer.epochs, **schedule)
    ours = []
    for _ in range(cfg.trainer.epochs):  # one optimiser and one scheduler step per iteration, as the Trainer
        seen = set()
        for _ in range(iters):
            seen.add(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert len(seen) == 1, seen  # constant within an epoch, as the RSC code's
        ours.append(seen.pop())
    expected = rsc_code_lrs(cfg.optim.lr, cfg.trainer.epochs)
    assert ours == pytest.approx(expected, rel=1e-12, abs=0)
    assert sum(lr < cfg.optim.lr for lr in expected) == cfg.trainer.epochs - int(0.8 * cfg.trainer.epochs) + 1


# ---- the choices a run must state ------------------------------------------------------------------
def test_target_and_pretrained_have_no_default():
    for name in PACS_EXPERIMENTS + ("pacs_rsc_sep2020",):
        assert OmegaConf.missing_keys(compose_run(f"experiment={name}")) == {"dataset.target", "model.pretrained"}
    cfg = compose_run("experiment=pacs_rsc", "model=resnet50_tv", "dataset.target=sketch")
    assert OmegaConf.missing_keys(cfg) == {"model.pretrained"}  # the other backbone refuses the same way
    with pytest.raises(MissingMandatoryValue, match="model.pretrained"):
        instantiate_checked(cfg.model)
    stated = compose_run("experiment=pacs_rsc", "dataset.target=sketch", "model.pretrained=false")
    assert not OmegaConf.missing_keys(stated)
    assert instantiate_checked(stated.model).weights_source is None  # from scratch, as said


def test_pretrained_weights_round_trip_through_the_experiment(tmp_path):
    """torchvision's ResNet-18 state dict (the RSC code's weights, here with random values) as a local
    file: every tensor but the 1000-class classifier arrives in the 7-class PACS model, sha256 kept."""
    torch.manual_seed(0)
    source = torchvision.models.resnet18()
    for m in source.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18_tv.pth"
    torch.save(source.state_dict(), path)
    cfg = compose_run("experiment=pacs_rsc_opl", "dataset.target=photo", "model.pretrained=false",
                      f"model.pretrained_path={path}")
    model = instantiate_checked(cfg.model)
    assert model.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and model.net.fc.out_features == 7
    loaded, original = model.net.state_dict(), source.state_dict()
    assert set(loaded) == set(original)
    for key, value in original.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key


def test_pretrained_true_offline_names_the_offline_route(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = compose_run("experiment=pacs_rsc", "dataset.target=photo", "model.pretrained=true")
    with pytest.raises(CheckpointError, match=r"resnet18\.tv_in1k weights .*model\.pretrained_path=FILE"):
        instantiate_checked(cfg.model)


# ---- sweeps -------------------------------------------------------------------------------------------
def test_sweeps_compose_on_pacs():
    cfg = compose_run("experiment=pacs_rsc_opl", "sweep=pacs_targets", hydra_config=True)
    assert cfg.hydra.sweeper.params["dataset.target"] == "art_painting,cartoon,photo,sketch"
    for sweep, key in (("gamma", "loss.gamma"), ("weight", "loss.weight")):
        cfg = compose_run("experiment=pacs_rsc_opl", f"sweep={sweep}", hydra_config=True)
        first = cfg.hydra.sweeper.params[key].split(",")[0]
        assert OmegaConf.select(compose_run("experiment=pacs_rsc_opl", f"{key}={first}"), key) == float(first)


# ---- which records fill the paper's cells ----------------------------------------------------------
@functools.lru_cache(maxsize=None)
def run_config(*overrides: str) -> tuple[str, str, dict]:
    """(name, data variant, configuration) of `train.py <overrides>` as train.py records them."""
    cfg = compose_run(*overrides, hydra_config=True)
    excluded = [k for k in cfg.hydra.job.config.override_dirname.exclude_keys if k != "seed"]
    container = OmegaConf.to_container(cfg, resolve=False)
    del container["hydra"]
    owned = strip_keys(OmegaConf.to_container(OmegaConf.create(container), resolve=True), excluded)
    return cfg.name, f"pacs/{cfg.dataset.splits}|target={cfg.dataset.target}|size={cfg.dataset.image_size}", owned


def run_record(seed: int, top1: float, *overrides: str) -> dict:
    """The record `train.py -m <overrides> seed=<seed>` followed by collect_results.py would give
    (the experiment configuration and its overrides computed as they do; metrics made up)."""
    name, variant, owned = run_config(*overrides)
    owned = {**owned, "seed": seed}
    metrics = {"top1": top1}
    record = {"schema_version": 1, "run_key": run_key(owned, seed, variant), "experiment": name, "seed": seed,
              "data_variant": variant, "overrides": config_overrides(owned, DEFAULTS(name)),
              "metrics": {"final_epoch_test": metrics, "best_val_selected_test": metrics, "authors_best_on_test": metrics},
              "epochs": 20, "finished_at": "2026-01-01T00:00:00+00:00", "device": "test", "code": {}, "history": [],
              "config": owned}
    validate_record(record, "run_record")
    return record


DEFAULTS = load_script("collect_results").ExperimentDefaults()


@pytest.fixture(scope="module")
def pacs_spec():
    return next(spec for spec in load_specs(REPO / "results" / "paper") if spec.name == "pacs")


def filled(spec, record) -> list[tuple[str, str]]:
    return [(c.row, c.column) for c in spec.cells
            if not isinstance(c.ours, MeanOf) and cell_result(c, "best_val_selected_test", [record]).summary is not None]


def test_only_pretrained_resnet50_runs_fill_the_paper_cells(pacs_spec):
    r50 = ("model=resnet50_tv", "model.pretrained=true")
    assert filled(pacs_spec, run_record(0, 80.0, "experiment=pacs_rsc", "dataset.target=art_painting", *r50)) == \
        [("RSC", "Art")]
    assert filled(pacs_spec, run_record(0, 80.0, "experiment=pacs_rsc_opl", "dataset.target=sketch", *r50)) == \
        [("RSC + OPL", "Sketch")]
    assert filled(pacs_spec, run_record(0, 80.0, "experiment=pacs_erm", "dataset.target=photo", *r50)) == \
        [("ERM (ours only)", "Photo")]
    # From scratch, other weights, the default ResNet-18, other data: a variant of their own.
    for other in (("model=resnet50_tv", "model.pretrained=false"),
                  ("model=resnet50_tv", "model.pretrained=false", "model.pretrained_path=/weights/r50.pth"),
                  ("model.pretrained=true",),
                  ("model=resnet50", "model.pretrained=true"),
                  ("model=resnet50_tv", "model.pretrained=true", "dataset.splits=official"),
                  ("model=resnet50_tv", "model.pretrained=true", "dataset.image_size=96")):
        record = run_record(0, 80.0, "experiment=pacs_rsc", "dataset.target=art_painting", *other)
        assert filled(pacs_spec, record) == [], other
        assert cell_result(pacs_spec.cell("RSC", "Avg"), "best_val_selected_test", [record]).summary is None


def test_avg_cell_of_the_paper_table_from_four_targets_and_three_seeds(pacs_spec):
    r50 = ("model=resnet50_tv", "model.pretrained=true")
    values = {"art_painting": (84.0, 86.0, 85.0), "cartoon": (80.0, 79.0, 81.0), "sketch": (82.0, 83.0, 78.0),
              "photo": (96.0, 97.0, 95.0)}
    records = [run_record(seed, top1[seed], "experiment=pacs_rsc", f"dataset.target={target}", *r50)
               for target, top1 in values.items() for seed in range(3)]
    records.append(run_record(0, 10.0, "experiment=pacs_rsc", "dataset.target=art_painting", "model.pretrained=true"))
    avg = cell_result(pacs_spec.cell("RSC", "Avg"), "best_val_selected_test", records)
    per_seed = [statistics.mean(v[seed] for v in values.values()) for seed in range(3)]  # 85.5, 86.25, 84.75
    assert avg.values == pytest.approx(per_seed) and avg.summary.n == 3
    assert avg.summary.mean == pytest.approx(statistics.mean(per_seed))
    assert avg.summary.std == pytest.approx(statistics.stdev(per_seed))
    assert avg.vs_paper.estimate == pytest.approx(statistics.mean(per_seed) - 87.47)
    assert len(avg.records) == 12 and all(r["overrides"]["model.pretrained"] is True for r in avg.records)


# ---- the Avg cell: a mean over selections within each seed -----------------------------------------
V = "v"
AVG_SPEC = {
    "title": "T", "source": "S", "metric": "top1", "protocols": ["final_epoch_test"],
    "cells": [{"row": "A", "column": "Avg", "paper": 70.0,
               "ours": {"mean_of": [{"experiment": "a", "data_variant": f"{V}{t}", "overrides": {"t": t}} for t in range(4)]}},
              {"row": "B", "column": "Avg",
               "ours": {"mean_of": [{"experiment": "b", "data_variant": f"{V}{t}", "overrides": {"t": t}} for t in range(4)]}},
              {"row": "A", "column": "T0", "ours": {"experiment": "a", "data_variant": f"{V}0", "overrides": {"t": 0}}}],
    "comparisons": [{"label": "B − A", "column": "Avg", "treatment": "B", "baseline": "A"}],
}


def rec(experiment: str, target: int, seed: int, top1: float, overrides=None) -> dict:
    overrides = {"t": target} if overrides is None else overrides
    config = {"name": experiment, "overrides": overrides}
    return {"schema_version": 1, "run_key": run_key(config, seed, f"{V}{target}"), "experiment": experiment,
            "seed": seed, "data_variant": f"{V}{target}", "overrides": overrides,
            "metrics": {"final_epoch_test": {"top1": top1}, "best_val_selected_test": None, "authors_best_on_test": None},
            "epochs": 1, "finished_at": "2026-01-01T00:00:00+00:00", "device": "cpu", "code": {}, "history": [],
            "config": config}


A = {0: [60.0, 70.0, 80.0, 90.0], 1: [62.0, 71.0, 79.0, 92.0], 2: [58.0, 69.0, 83.0, 86.0]}  # per seed, per target
B = {0: [65.0, 72.0, 80.0, 91.0], 1: [66.0, 75.0, 84.0, 95.0]}


def avg_records():
    records = [rec("a", t, seed, v) for seed, row in A.items() for t, v in enumerate(row)]
    records += [rec("b", t, seed, v) for seed, row in B.items() for t, v in enumerate(row)]
    records += [rec("a", t, 0, 1.0, overrides={"t": t, "model.pretrained": False}) for t in range(4)]  # not mixed in
    return records


def test_mean_of_pairs_targets_by_seed_then_summarises_seeds():
    spec = parse_spec("t", AVG_SPEC)
    assert isinstance(spec.cell("A", "Avg").ours, MeanOf) and len(spec.cell("A", "Avg").ours.parts) == 4
    a = cell_result(spec.cell("A", "Avg"), "final_epoch_test", avg_records())
    assert a.values == (75.0, 76.0, 74.0)  # seed 0: (60 + 70 + 80 + 90) / 4, ...
    assert (a.summary.n, a.summary.mean, a.summary.std) == (3, 75.0, 1.0)
    assert a.vs_paper.estimate == pytest.approx(5.0)
    assert sorted((r["seed"], r["data_variant"]) for r in a.records) == sorted((s, f"{V}{t}") for s in A for t in range(4))
    # The Welch interval compares the per-seed averages, as for any other cell.
    paper, ours, treatment, baseline = comparison_interval(spec, spec.comparisons[0], "final_epoch_test", avg_records())
    assert treatment.values == (77.0, 80.0) and paper is None
    expected = welch_difference([77.0, 80.0], [75.0, 76.0, 74.0])
    assert (ours.estimate, ours.low, ours.high) == pytest.approx((expected.estimate, expected.low, expected.high))
    assert ours.estimate == pytest.approx(3.5)
    # A plain cell of the same table is unchanged: one value per seed.
    assert cell_result(spec.cell("A", "T0"), "final_epoch_test", avg_records()).values == (60.0, 62.0, 58.0)
    text = table_markdown(spec, avg_records())
    assert "mean of v0; v1; v2; v3" in text and "75.00 ± 1.00 (n=3)" in text


def test_mean_of_a_seed_lacking_a_target_is_an_error():
    spec = parse_spec("t", AVG_SPEC)
    records = [r for r in avg_records() if not (r["experiment"] == "a" and r["seed"] == 2 and r["data_variant"] == "v3")]
    with pytest.raises(SpecError, match=r"\('A', 'Avg'\) averages 4 selections, but seed 2 has no final_epoch_test "
                                        r"record for a on v3 with \{'t': 3\}"):
        cell_result(spec.cell("A", "Avg"), "final_epoch_test", records)
    assert cell_result(spec.cell("A", "Avg"), "final_epoch_test", []).summary is None  # nothing run: a dash
    twin = rec("a", 1, 0, 70.0)
    twin["config"]["other"] = 1  # the same seed of one target twice
    twin["run_key"] = run_key(twin["config"], 0, "v1")
    with pytest.raises(RecordError, match="same seed"):  # the one selection function of tables and figures
        cell_result(spec.cell("A", "Avg"), "final_epoch_test", avg_records() + [twin])


@pytest.mark.parametrize("ours, message", [
    ({"mean_of": [{"experiment": "a", "data_variant": "v"}]}, "at least two selectors"),
    ({"mean_of": {"experiment": "a", "data_variant": "v"}}, "at least two selectors"),
    ({"mean_of": [{"experiment": "a", "data_variant": "v"}] * 2}, "the same selector twice"),
    ({"mean_of": [{"experiment": "a", "data_variant": "v"}, {"experiment": "a"}]}, "mean_of 2: missing 'data_variant'"),
    ({"mean_of": [{"experiment": "a", "data_variant": "v"}, "b"]}, "mean_of 2: a selector must be a mapping"),
    ({"mean_of": [{"experiment": "a", "data_variant": "v"}, {"experiment": "b", "data_variant": "v", "seed": 1}]},
     r"mean_of 2: unknown keys \['seed'\]"),
    ({"mean_of": [{"experiment": "a", "data_variant": "v"}, {"experiment": "b", "data_variant": "v"}],
      "experiment": "a"}, r"unknown keys \['experiment'\]"),
])
def test_mean_of_spec_errors(ours, message):
    with pytest.raises(SpecError, match=message):
        parse_spec("t", {"title": "T", "source": "S", "metric": "top1", "cells": [{"row": "r", "column": "c", "ours": ours}]})


def test_limit_val_keeps_a_seeded_subset_with_its_domains():
    import yaml

    from conftest import SHARED_DATA, require
    from opl.data.pacs import pacs

    config = yaml.safe_load((REPO / "configs/dataset/pacs.yaml").read_text())
    kwargs = {k: v for k, v in config.items() if k not in ("_target_", "root", "target", "limit_val")}
    root = str(require(SHARED_DATA / "pacs"))
    full = pacs(root, target="cartoon", **kwargs)
    small = pacs(root, target="cartoon", limit_val=40, **kwargs)
    assert len(full.val) == 208 + 171 + 398 and len(small.val) == 40
    assert small.variant == full.variant + "|crossval=40@0" and len(small.train) == len(full.train)
    index = [full.val.paths.index(p) for p in small.val.paths]
    assert index == sorted(index) and len(set(index)) == 40  # a subset, in list order
    assert small.val.domain_names == full.val.domain_names == ("art_painting", "photo", "sketch")
    assert small.val.domains.tolist() == full.val.domains[index].tolist()
    assert small.val.labels.tolist() == full.val.labels[index].tolist()
    assert pacs(root, target="cartoon", limit_val=40, **kwargs).val.paths == small.val.paths  # seeded
