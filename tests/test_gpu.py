"""The CUDA path (`pytest -m gpu`; skipped without a CUDA device): compiled training with CUDA graphs
against eager training, trainer.capture's modes (the whole step as one CUDA graph) against the
reference path, the GPU-resident loader's augmentation against the CPU's, fp16 with GradScaler
through an overflow, a NaN stopping at its step, resume in deterministic mode, the adversarial steps
under torch.compile (whether their refusal can be lifted) and the RSC step on CUDA.

Each test is sized for well under a minute on one H100; scripts/gpu_check.sh runs them all. The
comparisons run on data a network learns within tens of steps (one blocky template per class plus
noise), so a wrong step shows as a different falling loss, not as noise around a flat one."""

import copy
import functools
import math
import os

# Deterministic cuBLAS needs this before its first use in the process (opl.seed sets it too, but
# possibly after another test has initialised cuBLAS).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from opl.data.augment import BatchAugment, DeferredAugment  # noqa: E402
from opl.data.base import AugmentSpec, DataSpec, ImageTensors  # noqa: E402
from opl.data.loaders import DeviceTensorLoader  # noqa: E402
from opl.errors import ConfigError, NonFiniteLossError  # noqa: E402
from opl.losses import ce_plus_opl, truncated_lq  # noqa: E402
from opl.methods import AdversarialStep, RSCStep  # noqa: E402
from opl.models import CifarResNet, resnet20  # noqa: E402
from test_capture import make_trainer, step_by_step  # noqa: E402
from test_rsc import RSC_KNOBS, TinyConvNet  # noqa: E402
from test_trainer import Crash, crash_after  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CIFAR_AUGMENT = AugmentSpec(crop_padding=4, hflip=True, brightness=0.4, contrast=0.4, saturation=0.4)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def learnable_data(n_train: int, n_test: int = 256, classes: int = 10, size: int = 32, seed: int = 0,
                   augment: AugmentSpec = CIFAR_AUGMENT) -> DataSpec:
    """uint8 images = 0.7 x a blocky random template of the class + 0.3 x uniform noise."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(classes, 3, 4, 4, generator=g), size=(size, size), mode="nearest") * 255.0

    def split(n):
        labels = torch.randint(0, classes, (n,), generator=g)
        noise = torch.rand(n, 3, size, size, generator=g) * 255.0
        return ImageTensors((0.7 * templates[labels] + 0.3 * noise).round().to(torch.uint8), labels)

    return DataSpec("learnable", f"learnable/blocks@{seed}", classes, split(n_train), split(n_test), None, MEAN, STD,
                    augment)


def small_resnet(classes: int) -> CifarResNet:
    """ResNet-8 (one block per stage): quick to compile."""
    return CifarResNet(1, classes)


def cuda_trainer(run_dir, capture="step_only", **overrides):
    return make_trainer(run_dir, capture, **{"device": "cuda", "batch_size": 128, "epochs": 4, **overrides})


def losses(trainer, steps: int) -> list[float]:
    return [loss for loss, _ in step_by_step(trainer, steps)]


def assert_same_training(got: list[float], expected: list[float], first_rel: float, rel: float, falls_to: float) -> None:
    """Same first loss (same weights, same batch) within `first_rel`; every later loss within `rel`
    of the reference's (of 1 below 1: two bf16 trajectories drift apart a little); and both fall:
    the mean of the last 5 below `falls_to` x the first 3's."""
    assert got[0] == pytest.approx(expected[0], rel=first_rel)
    worst = max(abs(a - b) / max(b, 1.0) for a, b in zip(got, expected))
    assert worst <= rel, f"largest loss difference {worst:.4f} (relative, or absolute below 1) over {len(got)} steps"
    for curve in (got, expected):
        assert sum(curve[-5:]) / 5 < falls_to * sum(curve[:3]) / 3, curve


def graph_counts() -> tuple[int, int]:
    return counters["stats"]["unique_graphs"], counters["frames"]["total"]


# ------------------------------------------------------------------------- compiled vs eager
def test_compiled_cudagraph_step_matches_eager_for_50_steps_without_recompiling(tmp_path):
    """ResNet-20 + CE+OPL, bf16: torch.compile "reduce-overhead" (CUDA graphs) against eager from
    the same weights and batches; no new graph after the first steps."""
    data = learnable_data(2048)  # 16 batches of 128 per epoch: one shape
    eager = cuda_trainer(tmp_path / "eager", data=data, model=resnet20, compile=False)
    expected = losses(eager, 50)
    torch._dynamo.reset()
    counters.clear()
    compiled = cuda_trainer(tmp_path / "compiled", data=data, model=resnet20)
    assert compiled.cudagraphs and compiled.amp == "bf16" and hasattr(compiled.step, "_orig_mod")
    got = losses(compiled, 3)
    after_warmup = graph_counts()
    got += losses(compiled, 47)
    assert graph_counts() == after_warmup, "recompiled after the first steps"
    assert after_warmup[0] >= 1 and counters["inductor"]["cudagraph_skips"] == 0
    assert_same_training(got, expected, first_rel=2e-2, rel=0.1, falls_to=0.5)  # eager fp32 on the CPU: 0.21


@pytest.mark.parametrize("capture", ["with_augment", "whole_step"])
def test_capture_modes_compiled_match_the_eager_reference(tmp_path, capture):
    """600 images in batches of 128: 4 full batches and one of 88 per epoch, so whole_step records
    (after its warm-up calls) and replays a graph for each shape over 4 epochs."""
    data = learnable_data(600)
    reference = cuda_trainer(tmp_path / "ref", data=data, model=small_resnet, compile=False)
    expected = step_by_step(reference, 20)
    trainer = cuda_trainer(tmp_path / capture, capture, data=data, model=small_resnet)
    got = step_by_step(trainer, 20)
    assert_same_training([x for x, _ in got], [x for x, _ in expected], first_rel=2e-2, rel=0.1,
                         falls_to=0.95)  # eager on the CPU: 0.88
    assert [lr for _, lr in got] == pytest.approx([lr for _, lr in expected], rel=1e-6)
    if capture == "whole_step":
        assert trainer.whole_step.captured == 2 and not trainer.cudagraphs
        assert trainer.scheduler.last_epoch == 20


def test_whole_step_graph_replays_the_eager_step(tmp_path):
    """Eager code recorded as one CUDA graph (compile off, fp32): the same numbers as running it."""
    data = learnable_data(600)
    options = dict(data=data, model=small_resnet, compile=False, amp="none")
    reference = cuda_trainer(tmp_path / "ref", **options)
    expected = step_by_step(reference, 20)
    trainer = cuda_trainer(tmp_path / "whole", "whole_step", **options)
    got = step_by_step(trainer, 20)
    assert trainer.whole_step.captured == 2
    assert [x for x, _ in got] == pytest.approx([x for x, _ in expected], rel=1e-4)
    for (key, value), other in zip(reference.model.state_dict().items(), trainer.model.state_dict().values()):
        torch.testing.assert_close(other, value, rtol=1e-3, atol=1e-5, msg=key)


# ------------------------------------------------------------------------- loader and augmentation
def drawn_parameters(device: torch.device, data: DataSpec, epoch: int = 1) -> tuple[dict, torch.Tensor]:
    """Every augmentation parameter a training epoch of the device-resident loader draws on `device`,
    concatenated, and the sample indices it visited."""
    augment = BatchAugment(data.augment, data.mean, data.std)
    loader = DeviceTensorLoader(data.train, 512, device, augment, train=True, seed=3)
    loader.augment = deferred = DeferredAugment(loader.augment)
    loader.set_epoch(epoch)
    params, seen = [], []
    for _, _, index in loader:
        params.append(deferred.take())
        seen.append(index)
    return {k: torch.cat([p[k] for p in params]).cpu() for k in params[0]}, torch.cat(seen).cpu()


def test_device_loader_draws_the_same_parameter_statistics_as_the_cpu_path():
    data = learnable_data(8192, n_test=16)
    cuda, cuda_seen = drawn_parameters(torch.device("cuda"), data)
    cpu, cpu_seen = drawn_parameters(torch.device("cpu"), data)
    n = 8192
    assert torch.equal(cuda_seen.sort().values, torch.arange(n)) and torch.equal(cpu_seen.sort().values, torch.arange(n))
    for params in (cuda, cpu):  # against the distributions (tolerances of about 5 standard errors)
        offsets = params["offsets"].float()
        assert offsets.min() == 0 and offsets.max() == 8
        assert offsets.mean(dim=0) == pytest.approx([4.0, 4.0], abs=0.2)
        assert offsets.var(dim=0) == pytest.approx([20 / 3, 20 / 3], rel=0.08)  # uniform on 0..8
        assert params["flip"].float().mean().item() == pytest.approx(0.5, abs=0.03)
        factors = params["factors"]
        assert factors.min() >= 0.6 and factors.max() <= 1.4
        assert factors.mean(dim=0) == pytest.approx([1.0] * 3, abs=0.013)
        assert factors.std(dim=0) == pytest.approx([0.8 / math.sqrt(12)] * 3, rel=0.05)
        perms = (params["order"] * torch.tensor([9, 3, 1])).sum(dim=1)  # 6 orders -> 6 codes
        assert torch.bincount(perms, minlength=27).sum() == n and len(perms.unique()) == 6
        assert (torch.bincount(perms)[perms.unique()].float() / n) == pytest.approx([1 / 6] * 6, abs=0.025)
    for key in cuda:  # the two devices against each other
        tolerance = 0.2 if key == "offsets" else 0.03
        assert cuda[key].float().mean().item() == pytest.approx(cpu[key].float().mean().item(), abs=tolerance)
    # Same parameters, same images: the same augmented batch on either device.
    augment = BatchAugment(data.augment, data.mean, data.std)
    images = data.train.images[:256]
    params = {k: v[:256] for k, v in cuda.items()}
    on_cuda = augment.to("cuda").apply(images.cuda(), {k: v.cuda() for k, v in params.items()}).cpu()
    torch.testing.assert_close(on_cuda, augment.to("cpu").apply(images, params), rtol=0, atol=2e-6)
    # Seeded per (seed, epoch): the same epoch draws the same parameters again, another epoch not.
    again, _ = drawn_parameters(torch.device("cuda"), data)
    other, _ = drawn_parameters(torch.device("cuda"), data, epoch=2)
    assert torch.equal(again["offsets"], cuda["offsets"]) and not torch.equal(other["offsets"], cuda["offsets"])


# ------------------------------------------------------------------------- precision and failures
def parameters(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_fp16_grad_scaler_skips_an_overflowing_step_and_lowers_the_scale(tmp_path):
    trainer = cuda_trainer(tmp_path, data=learnable_data(512), model=small_resnet, amp="fp16", compile=False,
                           batch_size=64)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 2.0 ** 16
    before = parameters(trainer.model)
    trainer.train_steps(3)
    assert any(not torch.equal(a, b) for a, b in zip(before, parameters(trainer.model)))
    trainer.scaler.update(new_scale=2.0 ** 40)  # gradients of loss x 2^40 overflow fp16
    before = parameters(trainer.model)
    record = trainer.train_steps(1)
    assert math.isfinite(record["train_loss"])  # the loss itself is fine: no NaN stop
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(trainer.model))), "the overflowing step was applied"
    assert trainer.scaler.get_scale() == 2.0 ** 39
    with pytest.raises(ConfigError, match="fp16"):
        cuda_trainer(tmp_path / "whole", "whole_step", data=learnable_data(512), model=small_resnet, amp="fp16")


class PoisonableLoss(nn.Module):
    """CE + OPL times a buffer the test sets to NaN between steps (an in-place change the compiled,
    CUDA-graphed step sees)."""

    needs_pairs = True

    def __init__(self):
        super().__init__()
        self.inner = ce_plus_opl()
        self.register_buffer("factor", torch.ones(()))

    def forward(self, logits, features, labels, index=None):
        parts = self.inner(logits, features, labels, index)
        parts["loss"] = parts["loss"] * self.factor
        return parts


def test_nan_injected_at_step_k_stops_with_step_k(tmp_path):
    trainer = cuda_trainer(tmp_path, data=learnable_data(1024), model=small_resnet, criterion=PoisonableLoss,
                           log_every=4)
    assert trainer.cudagraphs
    trainer.train_steps(6)
    trainer.criterion.factor.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train_steps(10)
    assert err.value.step == 7


@pytest.mark.parametrize("criterion", [ce_plus_opl, functools.partial(truncated_lq, start_epoch=1, refresh_every=1)],
                         ids=["ce_opl", "truncated"])
def test_resume_on_cuda_equals_uninterrupted_in_deterministic_mode(tmp_path, criterion):
    """Also with the truncated loss, whose per-sample weights (criterion state) the checkpoint holds."""
    options = dict(data=learnable_data(600), model=small_resnet, compile=False, deterministic=True, epochs=3,
                   batch_size=64, criterion=criterion)
    try:
        uninterrupted = cuda_trainer(tmp_path / "a", **options)
        uninterrupted.fit()
        interrupted = cuda_trainer(tmp_path / "b", callbacks=(crash_after(1),), **options)
        with pytest.raises(Crash):
            interrupted.fit()
        resumed = cuda_trainer(tmp_path / "b", init_seed=7, **options)
        resumed.resume(tmp_path / "b" / "last.pt")
        resumed.fit()
    finally:
        torch.use_deterministic_algorithms(False)
    for (key, value), other in zip(uninterrupted.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(value, other), key


# ------------------------------------------------------------------------- other training steps
@pytest.mark.parametrize("kind", ["pgd_at", "mart"])
def test_adversarial_step_under_compile_on_cuda(tmp_path, kind):
    """AdversarialStep refuses trainer.compile=true. With the refusal lifted (a subclass), the compiled
    step must train as the eager one does (fp32, where only kernel choice differs) without
    recompiling after its first steps: if this passes on a GPU, the refusal can go; if it fails, its
    message is the measured reason to keep it."""
    step = functools.partial(AdversarialStep, kind=kind, eps=8.0, step_size=2.0, steps=2, beta=6.0, start="uniform",
                             start_std=0.001)
    options = dict(data=learnable_data(512), model=small_resnet, amp="none", batch_size=64)
    with pytest.raises(ConfigError, match="compile"):
        cuda_trainer(tmp_path / "refused", step=step, compile=True, **options)

    class Unrefused(AdversarialStep):
        compile_refusal = None

    eager = cuda_trainer(tmp_path / "eager", step=step, compile=False, **options)
    expected = losses(eager, 8)
    torch._dynamo.reset()
    counters.clear()
    compiled = cuda_trainer(tmp_path / "compiled", step=functools.partial(Unrefused, **step.keywords), compile=True,
                            **options)
    got = losses(compiled, 2)
    after_warmup = graph_counts()
    got += losses(compiled, 6)
    assert graph_counts() == after_warmup, "recompiled after the first steps"
    assert got == pytest.approx(expected, rel=1e-3)


def test_rsc_step_on_cuda(tmp_path):
    """One RSC step on CUDA computes what it computes on the CPU (fp32, same weights, same draw),
    and the step trains in the trainer (bf16, mirrored batches)."""
    torch.manual_seed(0)
    model = TinyConvNet(7)
    x, y = torch.randn(12, 3, 32, 32), torch.arange(12) % 7
    parts = {}
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        for device in ("cpu", "cuda"):
            step = RSCStep(copy.deepcopy(model), ce_plus_opl(), **RSC_KNOBS).to(device)
            step.bind(step.autocast, torch.device(device), seed=5)
            out = step(x.to(device), y.to(device), torch.arange(12, device=device))
            parts[device] = {k: v.item() for k, v in out.items()}
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert parts["cuda"] == pytest.approx(parts["cpu"], rel=1e-3, abs=1e-5)

    mirrored = AugmentSpec(crop_padding=4, hflip=True, mirror_batch=True)
    trainer = cuda_trainer(tmp_path, data=learnable_data(256, classes=7, augment=mirrored), model=TinyConvNet,
                           step=functools.partial(RSCStep, **RSC_KNOBS), batch_size=32, epochs=2)
    assert not trainer.cudagraphs and not hasattr(trainer.step, "_orig_mod")  # RSC runs eagerly
    record = trainer.train_steps(16)
    assert math.isfinite(record["train_loss"]) and 0.0 <= record["train_rsc_muted"] <= 0.5
