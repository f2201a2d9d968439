"""Every experiment composes, pins the paper's recipe, and instantiates and trains on tiny data."""

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train
from conftest import SHARED_DATA, require

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def compose_experiment(name, *overrides):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", *overrides])


def test_every_required_experiment_exists():
    assert {"cifar100_ce", "cifar100_opl", "cifar100_r110_ce", "cifar100_r110_opl", "cifar10_ce", "cifar10_opl",
            "digits_ce", "digits_opl"} <= set(EXPERIMENTS)
    robustness = {f"{d}_noise_{n}_{m}" for d in ("cifar10", "cifar100") for n in ("sym", "pair") for m in ("tl", "tl_opl")}
    robustness |= {f"{d}_{m}" for d in ("cifar10", "cifar100") for m in ("pgd_at", "pgd_at_opl", "mart", "mart_opl")}
    assert robustness <= set(EXPERIMENTS)
    assert {f"pacs_{m}" for m in ("erm", "erm_opl", "rsc", "rsc_opl")} <= set(EXPERIMENTS)


def test_label_noise_and_adversarial_recipes():
    tl = compose_experiment("cifar100_noise_pair_tl_opl")
    assert tl.model._target_ == "opl.models.resnet18_cifar" and tl.dataset.which == "cifar100"
    assert (tl.label_noise.kind, tl.label_noise.rate) == ("pairflip", 0.4)
    assert (tl.loss.q, tl.loss.k, tl.loss.start_epoch, tl.loss.refresh_every) == (0.7, 0.5, 80, 10)
    assert (tl.loss.weight, tl.loss.gamma) == (0.1, 2.0)
    assert (tl.optim.lr, tl.optim.momentum, tl.optim.weight_decay) == (0.01, 0.9, 1e-4)
    assert list(tl.sched.milestones) == [81, 121] and tl.trainer.epochs == 150  # their [80, 120], stepped after each epoch
    c10 = compose_experiment("cifar10_noise_sym_tl")
    assert c10.loss.start_epoch == 40 and list(c10.sched.milestones) == [41, 81] and c10.trainer.epochs == 120
    assert c10.label_noise.kind == "symmetric" and "weight" not in c10.loss
    mart = compose_experiment("cifar10_mart_opl")
    assert (mart.method.kind, mart.method.eps, mart.method.step_size) == ("mart", 8, 2)
    assert (mart.method.steps, mart.evaluators.robust.steps, mart.method.beta) == (10, 20, 6.0)
    assert mart.loss._target_ == "opl.losses.ce_plus_opl" and mart.trainer.compile is False
    pgd = compose_experiment("cifar100_pgd_at")
    assert pgd.method.kind == "pgd_at" and pgd.method._target_ == "opl.methods.AdversarialStep"
    assert set(pgd.evaluators) == {"classification", "robust"}
    assert compose_experiment("cifar100_opl").method._target_ == "opl.methods.StandardStep"


def test_mart_reference_presets_are_the_scripts():
    """YisenWang/MART train_resnet.py and train_wideresnet.py, in our units (1/255) where they differ."""
    r18 = compose_experiment("cifar10_mart_r18_ref")
    assert r18.model._target_ == "opl.models.resnet18_cifar" and r18.model.init == "pytorch"
    assert list(r18.dataset.mean) == [0.0, 0.0, 0.0] and list(r18.dataset.std) == [1.0, 1.0, 1.0]
    assert (r18.optim.lr, r18.optim.momentum, r18.optim.weight_decay) == (0.01, 0.9, 3.5e-3)
    assert (r18.trainer.epochs, r18.trainer.batch_size, r18.trainer.drop_last) == (120, 128, False)
    attack = r18.method
    assert (attack.kind, attack.beta, attack.steps, attack.start, attack.start_std) == ("mart", 5.0, 10, "normal", 0.001)
    assert attack.eps / 255 == pytest.approx(0.031, abs=1e-15) and attack.step_size / 255 == pytest.approx(0.007, abs=1e-15)
    robust = r18.evaluators.robust
    assert (robust.steps, robust.start) == (20, "uniform_unclamped")
    assert robust.eps / 255 == pytest.approx(0.031, abs=1e-15) and robust.step_size / 255 == pytest.approx(0.003, abs=1e-15)
    pgd = compose_experiment("cifar10_pgd_at_r18_ref_opl")
    assert (pgd.method.kind, pgd.method.start, pgd.optim.weight_decay) == ("pgd_at", "normal", 3.5e-3)
    assert pgd.loss._target_ == "opl.losses.ce_plus_opl"
    assert compose_experiment("cifar10_mart_r18_ref_opl").method.kind == "mart"
    wrn = compose_experiment("cifar10_mart_wrn_ref")
    assert wrn.model._target_ == "opl.models.wrn34_10" and (wrn.method.kind, wrn.method.beta) == ("mart", 6.0)
    assert (wrn.optim.lr, wrn.optim.weight_decay, wrn.trainer.epochs) == (0.1, 7e-4, 90)
    assert wrn.evaluators.robust.step_size / 255 == pytest.approx(0.031 / 10, abs=1e-15)
    ours = compose_experiment("cifar10_mart")
    assert (ours.method.start, ours.method.eps, ours.method.beta, ours.evaluators.robust.start) == ("uniform", 8, 6.0, "uniform")


def test_cifar100_opl_is_the_authors_recipe():
    cfg = compose_experiment("cifar100_opl")
    assert cfg.name == "cifar100_opl" and cfg.model._target_ == "opl.models.resnet56"
    assert cfg.model.num_classes == 100
    assert (cfg.loss.weight, cfg.loss.gamma, cfg.loss.neg_abs) == (1.0, 0.5, "elementwise")
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 5e-4)
    assert list(cfg.sched.milestones) == [60, 120, 160] and cfg.sched.gamma == 0.2 and cfg.sched.warmup_epochs == 1
    assert (cfg.trainer.epochs, cfg.trainer.batch_size) == (200, 128)
    assert cfg.dataset.val_fraction == 0.1 and cfg.dataset.split_seed == 0
    assert list(cfg.dataset.mean) == [0.5071, 0.4865, 0.4409] and list(cfg.dataset.std) == [0.2673, 0.2564, 0.2762]
    assert OmegaConf.to_container(cfg.dataset.augment) == {
        "crop_padding": 4, "hflip": True, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4}
    assert cfg.trainer.test_selection_after_epoch == 120
    ce = compose_experiment("cifar100_ce")
    assert ce.loss._target_ == "opl.losses.ClassificationLoss" and "gamma" not in ce.loss
    assert compose_experiment("cifar100_r110_opl").model._target_ == "opl.models.resnet110"


def test_default_run_is_the_digits_opl_demo():
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train")
    assert cfg.name == "digits_opl" and cfg.dataset._target_ == "opl.data.digits.digits"


def test_sweeps_compose():
    for sweep, key, values in (("gamma", "loss.gamma", "0.1,0.25,0.5,1.0,2.0"), ("seeds", "seed", "0,1,2,3,4"),
                               ("weight", "loss.weight", "0.1,0.25,0.5,1.0,2.0")):
        with initialize_config_dir(str(CONFIGS), version_base="1.3"):
            cfg = compose("train", overrides=["experiment=cifar100_opl", f"sweep={sweep}"], return_hydra_config=True)
        assert cfg.hydra.sweeper.params[key] == values


def shrink_fewshot(cfg, tmp_path, cifar100_root, cifar10_jpg_format_root) -> None:
    """Few-shot experiments on fixture data: RFS-layout files with few classes (miniImageNet,
    tieredImageNet), CIFAR-FS / FC100 built from the real partial CIFAR-100, the class-folder
    check on a tiny JPEG tree; a narrow ResNet-12 and two 1-shot 1-query episodes per pool."""
    from fewshot_fixtures import SMALL_COUNTS, write_mini, write_tiered

    ds = cfg.dataset
    if ds._target_ == "opl.data.fewshot.fewshot":
        ds.images_per_class = None
        if ds.name in ("cifar_fs", "fc100"):
            ds.source, ds.root = "cifar100", str(cifar100_root)
        else:
            ds.root = str({"mini_imagenet": write_mini, "tiered_imagenet": write_tiered}[ds.name](tmp_path / ds.name))
            ds.num_classes, ds.classes = SMALL_COUNTS["num_classes"], SMALL_COUNTS["classes"]
    else:
        ds.root = str(cifar10_jpg_format_root)
        ds.base_classes, ds.novel_classes = [f"class{c}" for c in range(6)], [f"class{c}" for c in range(6, 10)]
        ds.base_train_per_class = ds.base_test_per_class = ds.novel_per_class = None
    cfg.model.widths = [8, 16, 16, 32]
    cfg.evaluators.episodes.shots, cfg.evaluators.episodes.n_query = [1], 1
    cfg.evaluators.episodes.n_episodes, cfg.evaluators.episodes.support_views = 2, 1


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_instantiates_and_trains_on_tiny_data(name, tmp_path, cifar100_root, cifar10_format_root,
                                                        cifar10_jpg_format_root):
    roots = {"opl.data.cifar.cifar": lambda ds: (cifar100_root if ds.which == "cifar100" else cifar10_format_root),
             "opl.data.folders.cifar10_jpg": lambda ds: cifar10_jpg_format_root,
             "opl.data.pacs.pacs": lambda ds: require(SHARED_DATA / "pacs")}  # a few real images
    cfg = compose_experiment(
        name, "trainer.epochs=1", "trainer.batch_size=16", "trainer.device=cpu", "trainer.num_workers=0",
        "trainer.test_selection_after_epoch=null", "dataset.limit_train=32", "dataset.limit_test=16",
        "trainer.progress=line")
    adversarial = "robust" in cfg.evaluators
    if adversarial:  # the recipe's PGD-10 / PGD-20 on CPU would dominate the suite
        cfg.method.steps = cfg.evaluators.robust.steps = 1
    if cfg.model._target_ == "opl.models.wrn34_10":  # 20 s per CPU step: a WRN-10-1 of the same code instead
        cfg.model = {"_target_": "opl.models.wide_resnet", "depth": 10, "widen_factor": 1, "num_classes": cfg.model.num_classes}
    fewshot = cfg.evaluators.get("episodes") is not None
    if fewshot:
        shrink_fewshot(cfg, tmp_path, cifar100_root, cifar10_jpg_format_root)
    elif cfg.dataset._target_ == "opl.data.folders.image_folder":  # ImageNet recipes on a small class-folder tree
        cfg.dataset.update(root=str(cifar10_jpg_format_root), classes=None, num_classes=10, test_split="test",
                           image_size=32)
    elif "root" in cfg.dataset:
        cfg.dataset.root = str(roots[cfg.dataset._target_](cfg.dataset))
        if "download" in cfg.dataset:
            cfg.dataset.download = False
    if cfg.dataset._target_ == "opl.data.pacs.pacs":
        # The choices a PACS run must state (??? in the config); no ImageNet weights offline; small
        # images (ResNet's last map 2x2, enough for RSC's spatial muting) and 16 validation images.
        if OmegaConf.is_missing(cfg.dataset, "target"):
            cfg.dataset.target = "cartoon"
        if OmegaConf.is_missing(cfg.model, "pretrained"):
            cfg.model.pretrained = False
        cfg.dataset.image_size, cfg.dataset.limit_val = 64, 16
    assert not OmegaConf.missing_keys(cfg), OmegaConf.missing_keys(cfg)
    trainer, data = train.build(cfg, tmp_path, json.dumps(OmegaConf.to_container(cfg, resolve=True)))
    assert data.num_classes == cfg.model.num_classes
    summary = trainer.fit()
    assert summary["epochs"] == 1 and 0.0 <= summary["final_epoch_test"]["top1"] <= 100.0
    assert summary["final_epoch_test"]["loss"] > 0
    if adversarial:
        assert 0.0 <= summary["final_epoch_test"]["adv_top1"] <= summary["final_epoch_test"]["top1"] + 100.0 / 16
    if fewshot:
        key = f"{cfg.evaluators.episodes.n_way}w1s_"
        assert 0.0 <= summary["final_epoch_test"][key + "acc"] <= 100.0
        assert summary["final_epoch_test"][key + "episodes"] == 2


def test_imagenet_recipes():
    cfg = compose_experiment("imagenet_r50_opl")
    assert (cfg.model._target_, cfg.model.arch, cfg.model.num_classes) == ("opl.models.TimmBackbone", "resnet50", 1000)
    assert (cfg.loss.weight, cfg.loss.gamma, cfg.loss.scope) == (0.1, 2.0, "local")
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.4, 0.9, 1e-4)
    assert (cfg.trainer.epochs, cfg.trainer.batch_size) == (90, 1024) and list(cfg.sched.milestones) == [31, 61]
    assert cfg.dataset.image_size == 224 and cfg.dataset.test_split == "val" and cfg.dataset.augment.hflip
    assert compose_experiment("imagenet_r50d_ce").model.arch == "resnet50d"
    r18 = compose_experiment("imagenet_r18_ce")
    assert r18.model.arch == "resnet18" and r18.loss._target_ == "opl.losses.ClassificationLoss" and "weight" not in r18.loss


def test_every_table_and_figure_selector_names_an_existing_experiment():
    from opl.results.figures import load_figure_specs
    from opl.results.tables import MeanOf, load_specs

    results = CONFIGS.parent / "results"
    cells = [cell for folder in ("paper", "local") for spec in load_specs(results / folder) for cell in spec.cells]
    named = {selector.experiment for cell in cells if cell.ours is not None
             for selector in (cell.ours.parts if isinstance(cell.ours, MeanOf) else (cell.ours,))}
    for figure in load_figure_specs(results / "figures.yaml"):
        named |= {selector.experiment for _, selector in figure["series"]}
    assert named and named <= set(EXPERIMENTS), sorted(named - set(EXPERIMENTS))


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation other than "-" and "_" dropped, spaces to '-'."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_every_experiment_links_existing_deviation_sections():
    docs = CONFIGS.parent / "docs" / "deviations.md"
    sections = {github_anchor(line[3:]) for line in docs.read_text().splitlines() if line.startswith("## ")}
    for name in EXPERIMENTS:
        text = (CONFIGS / "experiment" / f"{name}.yaml").read_text()
        comment = re.search(r"# Deviations \(docs/deviations\.md\):(.*?)\n(?!#   )", text, re.S)
        assert comment, f"{name}.yaml has no '# Deviations (docs/deviations.md): #...' line"
        anchors = re.findall(r"#([a-z0-9-]+)", comment.group(1))
        assert anchors and set(anchors) <= sections, (name, sorted(set(anchors) - sections))
