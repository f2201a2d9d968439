"""trainer.capture (opl/engine/capture.py) against the reference path (step_only), on the CPU:
deferring the augmentation into the step region and running the whole update with a device-side
learning rate compute the same training steps, across epoch boundaries, smaller last batches, LR
warm-up and milestones, and a resume. (The CUDA-graph recording itself is tested in test_gpu.py.)"""

import functools

import pytest
import torch

from opl.data.augment import BatchAugment, DeferredAugment
from opl.data.base import AugmentSpec, DataSpec, ImageTensors
from opl.engine.capture import DeviceLR
from opl.engine.schedule import build_scheduler
from opl.engine.trainer import Trainer, TrainerConfig
from opl.errors import ConfigError
from opl.losses import ce_plus_opl
from opl.methods import AdversarialStep, StandardStep
from opl.models import CifarResNet
from test_trainer import Crash, crash_after

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
FULL = AugmentSpec(crop_padding=2, hflip=True, brightness=0.4, contrast=0.4, saturation=0.4)
SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
# Warm-up over epoch 1 then x0.5 from epoch 2: the LR changes at every step of the first epoch.
SCHEDULE = {"kind": "multistep", "warmup_epochs": 1, "milestones": [2], "gamma": 0.5}


def tiny_data(n_train=40, n_test=16, size=12, classes=4, seed=0, augment=FULL) -> DataSpec:
    """Random uint8 images with the full CIFAR augmentation: 40 images in batches of 16 give
    16, 16, 8 per epoch (the last, smaller batch is kept)."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        return ImageTensors(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                            torch.randint(0, classes, (n,), generator=g))

    return DataSpec("tiny", f"tiny/random@{seed}", classes, split(n_train), split(n_test), None, MEAN, STD, augment)


def tiny_resnet(classes=4) -> CifarResNet:
    return CifarResNet(1, classes, widths=(4, 8, 8))


def make_trainer(run_dir, capture="step_only", data=None, step=StandardStep, callbacks=(), init_seed=0,
                 model=tiny_resnet, criterion=ce_plus_opl, **overrides):
    """A trainer on `data` (default `tiny_data()`), on the CPU unless `device=` says otherwise; the
    model's initial weights depend on `init_seed` only."""
    torch.manual_seed(init_seed)
    data = data or tiny_data()
    cfg = TrainerConfig(**{"epochs": 2, "batch_size": 16, "eval_batch_size": 64, "device": "cpu", "num_workers": 0,
                           "progress": "line", "capture": capture, **overrides})
    return Trainer(cfg, step(model(data.num_classes), criterion(), data), data, SGD, SCHEDULE, run_dir,
                   seed=0, callbacks=callbacks, config_signature="sig")


def step_by_step(trainer: Trainer, steps: int) -> list[tuple[float, float]]:
    """(loss, learning rate the step ran with) of each of `steps` single training steps."""
    records = [trainer.train_steps(1) for _ in range(steps)]
    return [(r["train_loss"], r["lr"]) for r in records]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, rtol: float, atol: float) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("loader", ["device", "dataloader"])
@pytest.mark.parametrize("capture", ["with_augment", "whole_step"])
def test_capture_modes_train_like_the_reference(tmp_path, capture, loader):
    """Seven steps = two epoch boundaries and two smaller last batches, past the end of the LR table."""
    reference = make_trainer(tmp_path / "ref", loader=loader)
    expected = step_by_step(reference, 7)
    trainer = make_trainer(tmp_path / capture, capture, loader=loader)
    got = step_by_step(trainer, 7)
    # Warm-up over epoch 1 (3 iterations, from LR 0), halved from epoch 2 (opl/engine/schedule.py).
    assert [lr for _, lr in expected] == pytest.approx([0.0, 0.05 / 3, 0.05 * 2 / 3, 0.025, 0.025, 0.025, 0.025])
    assert [lr for _, lr in got] == pytest.approx([lr for _, lr in expected], rel=1e-6)
    # The LR for an 8th step, one iteration past the end of the table of the 6 the run has.
    assert float(trainer.optimizer.param_groups[0]["lr"]) == pytest.approx(reference.optimizer.param_groups[0]["lr"], rel=1e-6)
    assert [loss for loss, _ in got] == pytest.approx([loss for loss, _ in expected], rel=1e-5)
    assert_same_weights(reference.model, trainer.model, rtol=1e-5, atol=1e-6)
    assert trainer.scheduler.last_epoch == reference.scheduler.last_epoch == 7  # the host scheduler follows
    if capture == "whole_step":
        assert isinstance(trainer.optimizer.param_groups[0]["lr"], torch.Tensor)


def test_deferred_loader_hands_out_uint8_and_the_step_applies_the_draws(tmp_path):
    trainer = make_trainer(tmp_path, "with_augment")
    x, y, index = next(iter(trainer.train_loader))
    params = trainer.deferred.take()
    assert x.dtype == torch.uint8 and x.shape == (16, 3, 12, 12) and set(params) == {"offsets", "flip", "factors", "order"}
    reference = make_trainer(tmp_path / "ref")
    x_ref, y_ref, _ = next(iter(reference.train_loader))
    parts = trainer.step(x, y, index, params)  # AugmentedStep: augment + normalise + the step
    torch.testing.assert_close(parts["loss"], reference.step(x_ref, y_ref, index)["loss"], rtol=1e-6, atol=1e-6)
    assert torch.equal(y, y_ref)


def test_whole_step_resume_matches_uninterrupted_and_the_reference(tmp_path):
    uninterrupted = make_trainer(tmp_path / "a", "whole_step", epochs=3)
    uninterrupted.fit()
    interrupted = make_trainer(tmp_path / "b", "whole_step", epochs=3, callbacks=(crash_after(1),))
    with pytest.raises(Crash):
        interrupted.fit()
    resumed = make_trainer(tmp_path / "b", "whole_step", epochs=3, init_seed=5)
    resumed.resume(tmp_path / "b" / "last.pt")
    resumed.fit()
    assert_same_weights(uninterrupted.model, resumed.model, rtol=0, atol=0)
    reference = make_trainer(tmp_path / "c", epochs=3)
    reference.fit()
    assert_same_weights(reference.model, resumed.model, rtol=1e-4, atol=1e-5)
    assert resumed.scheduler.last_epoch == reference.scheduler.last_epoch == 9


def test_device_lr_follows_the_scheduler_past_the_end_of_its_table():
    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)

    spec = dict(kind="multistep", warmup_epochs=1, milestones=[1], gamma=0.2)
    reference = build_scheduler(optimizer(), iters_per_epoch=3, epochs=2, **spec)
    scheduler = build_scheduler(optimizer(), iters_per_epoch=3, epochs=2, **spec)
    device_lr = DeviceLR(scheduler, torch.device("cpu"), iterations=6)
    for it in range(9):
        assert float(scheduler.optimizer.param_groups[0]["lr"]) == pytest.approx(
            reference.optimizer.param_groups[0]["lr"], rel=1e-7), it
        reference.optimizer.step()
        reference.step()
        device_lr.advance()
    device_lr.sync(scheduler)
    assert scheduler.last_epoch == 9 and scheduler.get_last_lr() == pytest.approx([0.1 * 0.2])
    assert scheduler.optimizer.param_groups[0]["lr"] is device_lr.lrs[0]  # filled in place, not replaced


def test_deferred_augment_draws_what_the_batch_augment_draws():
    images = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    augment = BatchAugment(FULL, MEAN, STD)
    deferred = DeferredAugment(augment)
    assert deferred(images, True, torch.Generator().manual_seed(3)) is images
    with pytest.raises(RuntimeError, match="never taken"):
        deferred(images, True, torch.Generator())
    params, expected = deferred.take(), augment.sample_params(images, torch.Generator().manual_seed(3))
    assert params.keys() == expected.keys() and all(torch.equal(params[k], expected[k]) for k in params)
    with pytest.raises(RuntimeError, match="no training batch"):
        deferred.take()
    torch.testing.assert_close(deferred(images, False), augment(images, False), rtol=0, atol=0)  # evaluation: unchanged
    with pytest.raises(ValueError, match="mirror"):
        DeferredAugment(BatchAugment(AugmentSpec(hflip=True, mirror_batch=True), MEAN, STD))


def test_impossible_capture_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="trainer.capture must be one of"):
        make_trainer(tmp_path, "everything")
    with pytest.raises(ConfigError, match="mirror_batch"):
        make_trainer(tmp_path, "with_augment", data=tiny_data(augment=AugmentSpec(hflip=True, mirror_batch=True)))
    adversarial = functools.partial(AdversarialStep, kind="pgd_at", eps=8.0, step_size=2.0, steps=1, beta=6.0,
                                    start="uniform", start_std=0.001)
    with pytest.raises(ConfigError, match="whole_step needs a step that can be captured"):
        make_trainer(tmp_path, "whole_step", step=adversarial)
    with pytest.raises(ConfigError, match="nest torch.compile's CUDA graphs"):
        make_trainer(tmp_path, "whole_step", compile=True, compile_mode="reduce-overhead")
    make_trainer(tmp_path / "eager", "with_augment", step=adversarial)  # a step refusing compile may still defer
