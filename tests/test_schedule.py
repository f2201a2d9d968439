"""Each recipe's learning rate at every iteration equals its reference's, computed by the reference's
own rule (written out here from the reference scripts, with their values, never from our configs)."""

import functools
import math
import warnings

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from opl.engine.schedule import build_scheduler, lr_factor
from test_configs import CONFIGS, EXPERIMENTS


def sgd(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)


class AuthorsWarmUpLR(torch.optim.lr_scheduler.LRScheduler):
    """kahnchana/opl classification/cifar/utils.py `WarmUpLR`: base_lr * last_epoch / (total_iters + 1e-8)."""

    def __init__(self, optimizer, total_iters, last_epoch=-1):
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [base_lr * self.last_epoch / (self.total_iters + 1e-8) for base_lr in self.base_lrs]


@functools.cache
def authors_cifar(iters: int) -> list[float]:
    """kahnchana/opl classification/cifar/train.py: lr 0.1; MultiStepLR(settings.MILESTONES =
    [60, 120, 160], gamma=0.2) built first, then WarmUpLR(iters * warm), warm = 1; for epoch in
    1..EPOCH=200: `if epoch > warm: train_scheduler.step(epoch)`, then per batch optimizer.step()
    and `if epoch <= warm: warmup_scheduler.step()`."""
    optimizer = sgd(0.1)
    train_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[60, 120, 160], gamma=0.2)
    warmup_scheduler = AuthorsWarmUpLR(optimizer, iters * 1)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # step(epoch) is deprecated, but it is what the authors call
        for epoch in range(1, 201):
            if epoch > 1:
                train_scheduler.step(epoch)
            for _ in range(iters):
                lrs.append(optimizer.param_groups[0]["lr"])
                if epoch <= 1:
                    warmup_scheduler.step()
    return lrs


def stepped_after_each_epoch(lr: float, milestones: list[int], epochs: int, iters: int) -> list[float]:
    """MultiStepLR(milestones, gamma=0.1) stepped once after each epoch:
    * kahnchana/opl label_noise/truncated_loss/main.py (as AlanChou/Truncated-Loss): lr 0.01 (script),
      `for epoch in range(start_epoch=0, epochs)`: train, test, then scheduler.step(). Scripts:
      CIFAR-10 --schedule 40 80 --epochs 120, CIFAR-100 --schedule 80 120 --epochs 150.
    * pytorch/vision references/classification/train.py: StepLR(step_size=30, gamma=0.1) stepped
      after each of 90 epochs (= milestones 30, 60)."""
    optimizer = sgd(lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no optimizer.step() in this simulation
        for _ in range(epochs):
            lrs += [optimizer.param_groups[0]["lr"]] * iters
            scheduler.step()
    return lrs


def rfs_adjust_learning_rate(lr: float, decay_epochs: list[int], epochs: int, iters: int) -> list[float]:
    """WangYueFt/rfs util.py adjust_learning_rate, called before each 1-based epoch of
    train_supervised.py: steps = np.sum(epoch > np.asarray(lr_decay_epochs)), lr x 0.1 ** steps."""
    lrs = []
    for epoch in range(1, epochs + 1):
        lrs += [lr * 0.1 ** int(np.sum(epoch > np.asarray(decay_epochs)))] * iters
    return lrs


def rsc_step_lr(lr: float, epochs: int, iters: int) -> list[float]:
    """DeLightCMU/RSC Domain_Generalization: StepLR(step_size=int(0.8 * epochs), gamma 0.1)
    (optimizer/optimizer_helper.py:11-12) stepped at the START of every epoch (train.py:131)."""
    optimizer = sgd(lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=int(epochs * 0.8))
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the RSC code steps the scheduler before the optimizer
        for _ in range(epochs):
            scheduler.step()
            lrs += [optimizer.param_groups[0]["lr"]] * iters
    return lrs


def adjust_learning_rate(lr: float, epochs: int, iters: int) -> list[float]:
    """TRADES train_trades_cifar10.py and MART train_resnet.py / train_wideresnet.py: for epoch in
    1..epochs, before training: lr x0.1 if epoch >= 75, x0.01 if >= 90, x0.001 if >= 100."""
    lrs = []
    for epoch in range(1, epochs + 1):
        value = lr
        if epoch >= 75:
            value = lr * 0.1
        if epoch >= 90:
            value = lr * 0.01
        if epoch >= 100:
            value = lr * 0.001
        lrs += [value] * iters
    return lrs


# Iterations per epoch as in each reference: ceil(training images / 128), the last smaller batch kept.
AUTHORS_CIFAR_ITERS = math.ceil(45_000 / 128)  # 10% validation split
FULL_TRAIN_ITERS = math.ceil(50_000 / 128)

AUTHORS_CIFAR = lambda: authors_cifar(AUTHORS_CIFAR_ITERS)  # noqa: E731
NOISE_C10 = lambda: stepped_after_each_epoch(0.01, [40, 80], 120, FULL_TRAIN_ITERS)  # noqa: E731
NOISE_C100 = lambda: stepped_after_each_epoch(0.01, [80, 120], 150, FULL_TRAIN_ITERS)  # noqa: E731
IMAGENET_TRAIN = 1_281_167
# Base-class training images of the few-shot benchmarks (600 per class; tieredImageNet's count as
# released), batch 64 with drop_last as RFS's loader.
FEWSHOT_TRAIN = {"mini_imagenet": 38_400, "tiered_imagenet": 448_695, "cifar_fs": 38_400, "fc100": 36_000,
                 "cifar10_fewshot_cpu": 3_000}
RFS_MINI = lambda: rfs_adjust_learning_rate(0.05, [60, 80], 100, 38_400 // 64)  # noqa: E731
RFS_TIERED = lambda: rfs_adjust_learning_rate(0.05, [30, 40, 50], 60, 448_695 // 64)  # noqa: E731
RFS_CIFARFS = lambda: rfs_adjust_learning_rate(0.05, [45, 60, 75], 90, 38_400 // 64)  # noqa: E731
RFS_FC100 = lambda: rfs_adjust_learning_rate(0.05, [45, 60, 75], 90, 36_000 // 64)  # noqa: E731
RFS_RULE_CPU = lambda: rfs_adjust_learning_rate(0.05, [12, 16], 20, 3_000 // 64)  # noqa: E731 (RFS's rule, our CPU check)
# torchvision's reference at the experiments' global batch 1,024 and LR 0.4 (0.1 per 256; docs/deviations.md).
IMAGENET = lambda: stepped_after_each_epoch(0.4, [30, 60], 90, math.ceil(IMAGENET_TRAIN / 1024))  # noqa: E731
ADVERSARIAL_OURS = lambda: adjust_learning_rate(0.1, 100, FULL_TRAIN_ITERS)  # noqa: E731 (their rule, our 100 epochs)
MART_R18 = lambda: adjust_learning_rate(0.01, 120, FULL_TRAIN_ITERS)  # noqa: E731 (MART train_resnet.py)
MART_WRN = lambda: adjust_learning_rate(0.1, 90, FULL_TRAIN_ITERS)  # noqa: E731 (MART train_wideresnet.py)

REFERENCE = {
    "cifar100_ce": AUTHORS_CIFAR, "cifar100_opl": AUTHORS_CIFAR, "cifar100_r110_ce": AUTHORS_CIFAR,
    "cifar100_r110_opl": AUTHORS_CIFAR, "cifar10_ce": AUTHORS_CIFAR, "cifar10_opl": AUTHORS_CIFAR,
    **{f"cifar10_noise_{n}_{m}": NOISE_C10 for n in ("sym", "pair") for m in ("tl", "tl_opl")},
    **{f"cifar100_noise_{n}_{m}": NOISE_C100 for n in ("sym", "pair") for m in ("tl", "tl_opl")},
    **{f"{d}_{m}": ADVERSARIAL_OURS for d in ("cifar10", "cifar100") for m in ("pgd_at", "pgd_at_opl", "mart", "mart_opl")},
    **{f"cifar10_{m}_r18_ref{o}": MART_R18 for m in ("pgd_at", "mart") for o in ("", "_opl")},
    "cifar10_mart_wrn_ref": MART_WRN,
    **{f"imagenet_{a}_{m}": IMAGENET for a in ("r18", "r50", "r50d") for m in ("ce", "opl")},
    **{f"fewshot_{d}_{m}": ref for d, ref in (("mini", RFS_MINI), ("tiered", RFS_TIERED), ("cifarfs", RFS_CIFARFS),
                                               ("fc100", RFS_FC100)) for m in ("rfs", "rfs_opl")},
    "fewshot_cifar10_cpu_ce": RFS_RULE_CPU, "fewshot_cifar10_cpu_opl": RFS_RULE_CPU,
    # PACS: the RSC code's HEAD (20 epochs) and September 2020 (30 epochs, LR 0.008) recipes; its loader
    # drops the last batch; iterations from the sketch target's 5,446 training images at batch 64
    # (128 with the mirrored copy, one optimiser step). The CPU check: its 1,024 images, 5 epochs.
    **{f"pacs_{m}": (lambda: rsc_step_lr(0.01, 20, 5_446 // 64)) for m in ("erm", "erm_opl", "rsc", "rsc_opl")},
    **{f"pacs_{m}": (lambda: rsc_step_lr(0.008, 30, 5_446 // 128)) for m in ("rsc_sep2020", "rsc_opl_sep2020")},
    **{f"pacs_cpu_{m}": (lambda: rsc_step_lr(0.01, 5, 1_024 // 64)) for m in ("erm", "erm_opl", "rsc", "rsc_opl")},
}
# Our own schedules (no reference to match): the CPU-sized checks and the digits demo use a cosine.
OURS = {name for name in EXPERIMENTS
        if name.startswith(("digits_", "cifar10_jpg_cpu_", "imagefolder_cpu_"))}


def ours(name: str) -> tuple[list[float], int]:
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={name}"])
    name = cfg.dataset.get("name") or cfg.dataset._target_.rsplit(".", 1)[-1]
    n_train = {"imagenet": IMAGENET_TRAIN, "pacs": cfg.dataset.get("limit_train") or 5_446,
               **FEWSHOT_TRAIN}.get(name, 50_000)
    n_train = round(n_train * (1 - (cfg.dataset.get("val_fraction") or 0.0)))
    batch, epochs, lr = cfg.trainer.batch_size, cfg.trainer.epochs, cfg.optim.lr
    iters = n_train // batch if cfg.trainer.drop_last else math.ceil(n_train / batch)
    factor = lr_factor(iters_per_epoch=iters, epochs=epochs, **OmegaConf.to_container(cfg.sched))
    return [lr * factor(it) for it in range(epochs * iters)], iters


def test_every_experiment_is_checked_against_a_reference_or_declared_ours():
    assert set(EXPERIMENTS) == set(REFERENCE) | OURS, sorted(set(EXPERIMENTS) ^ (set(REFERENCE) | OURS))
    for name in OURS:
        with initialize_config_dir(str(CONFIGS), version_base="1.3"):
            assert compose("train", overrides=[f"experiment={name}"]).sched.kind == "cosine", name


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_lr_at_every_iteration_equals_the_reference(name):
    reference = REFERENCE[name]()
    lrs, iters = ours(name)
    assert len(lrs) == len(reference), "epochs or iterations per epoch differ from the reference"
    differ = np.flatnonzero(~np.isclose(lrs, reference, rtol=1e-7, atol=1e-12))
    if differ.size:
        it = int(differ[0])
        pytest.fail(f"{differ.size} iterations differ; first: iteration {it} (epoch {it // iters + 1}): "
                    f"ours {lrs[it]}, reference {reference[it]}")


def test_authors_cifar_schedule_in_words():
    lrs = authors_cifar(AUTHORS_CIFAR_ITERS)
    per_epoch = lambda epoch: lrs[(epoch - 1) * AUTHORS_CIFAR_ITERS]  # noqa: E731
    assert lrs[0] == 0.0 and lrs[AUTHORS_CIFAR_ITERS - 1] == pytest.approx(0.1 * 351 / 352)
    assert [per_epoch(e) for e in (2, 59, 60, 119, 120, 159, 160, 200)] == pytest.approx(
        [0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008])


def test_the_scheduler_object_steps_the_factor():
    optimizer = sgd(0.1)
    scheduler = build_scheduler(optimizer, 5, 3, kind="multistep", warmup_epochs=1, milestones=[2, 3], gamma=0.5)
    seen = []
    for _ in range(15):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08] + [0.05] * 5 + [0.025] * 5)


def test_milestones_are_checked():
    with pytest.raises(ValueError, match="increasing"):
        lr_factor("multistep", 10, 5, milestones=[3, 2])
    with pytest.raises(ValueError, match=">= 1"):
        lr_factor("multistep", 10, 5, milestones=[0])
