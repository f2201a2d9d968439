"""The compiled regions have no graph breaks, checked on the CPU: whatever would split a CUDA graph
on a GPU (a host synchronisation, a data-dependent Python branch, an unsupported call) shows up
as a graph break in `torch._dynamo.explain` here. One region per experiment family (CIFAR ResNet
with CE, CE + OPL, the truncated loss before and after its weights exist, bf16 autocast, RFS's
ResNet-12, the augmentation-in-the-step region of trainer.capture), then the compiled step
(inductor, mode "default") against the eager one for a few training steps, on a small
conv net (CPU compilation of a whole step costs tens of seconds per graph).

The loss alone is compiled with fullgraph=True in test_opl_loss.py; it is not repeated here."""

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from opl.data.augment import BatchAugment
from opl.engine.capture import AugmentedStep
from opl.losses import ClassificationLoss, ce_plus_opl, truncated_lq
from opl.methods import StandardStep
from opl.models import CifarResNet, ResNet12
from test_capture import FULL, MEAN, STD, make_trainer, step_by_step, tiny_data, tiny_resnet
from test_opl_loss import _no_cxx_compiler

BATCH = 8
CHANNELS_LAST = torch.channels_last


def batch(size=12, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (BATCH, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(BATCH) % classes  # every class twice: OPL has same- and different-class pairs
    return images, labels, torch.arange(BATCH)


def normalised(images):
    return BatchAugment(FULL, MEAN, STD)(images, train=False).contiguous(memory_format=CHANNELS_LAST)


def standard(model, criterion, autocast=None):
    step = StandardStep(model, criterion)
    if autocast is not None:
        step.bind(autocast, torch.device("cpu"), seed=0)
    return step.to(memory_format=CHANNELS_LAST)


def truncated(weights: bool):
    criterion = truncated_lq(weight=1.0, start_epoch=1)
    if weights:  # after the first refresh: per-sample 0/1 weights indexed by the batch's sample ids
        criterion.base.refresh(torch.randn(16, 4), torch.arange(16) % 4)
    return criterion


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def region(name):
    """(module, inputs) of one compiled region, as the trainer calls it."""
    images, labels, index = batch(size=32 if name == "resnet12_fewshot" else 12)
    if name == "resnet12_fewshot":  # RFS's ResNet-12 with dropout and DropBlock (block 2, CIFAR-FS / FC100)
        model = ResNet12(4, widths=(8, 8, 8, 8), dropblock_size=2, dropblock_ramp_steps=10)
        return standard(model, ce_plus_opl()), (normalised(images), labels, index)
    if name == "augment_in_step":  # trainer.capture=with_augment / whole_step
        step = AugmentedStep(standard(tiny_resnet(), ce_plus_opl()), BatchAugment(FULL, MEAN, STD), CHANNELS_LAST)
        params = BatchAugment(FULL, MEAN, STD).sample_params(images, torch.Generator().manual_seed(1))
        return step, (images.contiguous(memory_format=CHANNELS_LAST), labels, index, params)
    criterion = {"cifar_resnet_ce": ClassificationLoss(), "cifar_resnet_ce_opl": ce_plus_opl(),
                 "cifar_resnet_ce_opl_bf16": ce_plus_opl(), "truncated_opl_before_pruning": truncated(False),
                 "truncated_opl_pruning": truncated(True)}[name]
    step = standard(CifarResNet(1, 4, widths=(4, 8, 8)), criterion, bf16 if name.endswith("bf16") else None)
    return step, (normalised(images), labels, index)


REGIONS = ["cifar_resnet_ce", "cifar_resnet_ce_opl", "cifar_resnet_ce_opl_bf16", "truncated_opl_before_pruning",
           "truncated_opl_pruning", "resnet12_fewshot", "augment_in_step"]


@pytest.mark.parametrize("name", REGIONS)
def test_compiled_region_has_no_graph_break(name):
    module, inputs = region(name)
    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(module)(*inputs)
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [str(r) for r in explanation.break_reasons]
    assert explanation.graph_count == 1


class SmallConvNet(nn.Module):
    """conv -> batch norm -> ReLU -> pool -> linear, returning (features, logits): the operations of
    the CIFAR ResNets at a size whose CPU compilation stays short (about 25 s on 2 cores)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        features = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return features, self.fc(features)


def test_compiled_step_trains_like_the_eager_step(tmp_path):
    """Inductor on the CPU (mode "default", static shapes) through the trainer: the same losses and
    weights (batch-norm statistics included) as the eager step for three steps, and one graph for
    them all (no recompilation)."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import CppCompileError, InductorError, InvalidCxxCompiler

    data = tiny_data(n_train=32)  # two batches of 16 per epoch: one shape, one graph
    reference = make_trainer(tmp_path / "eager", data=data, model=SmallConvNet)
    expected = step_by_step(reference, 3)
    torch._dynamo.reset()
    counters.clear()
    compiled = make_trainer(tmp_path / "compiled", data=data, model=SmallConvNet, compile=True)
    assert compiled.cudagraphs is False and hasattr(compiled.step, "_orig_mod")
    try:
        got = step_by_step(compiled, 3)
    except (BackendCompilerFailed, InductorError, CppCompileError, InvalidCxxCompiler) as err:
        if _no_cxx_compiler(err):
            pytest.skip(f"torch.compile needs a usable C++ compiler: {type(err).__name__}: {err}")
        raise
    finally:
        graphs = counters["stats"]["unique_graphs"]
        torch._dynamo.reset()
    assert graphs == 1
    assert [loss for loss, _ in got] == pytest.approx([loss for loss, _ in expected], rel=1e-5)
    for (key, value), other in zip(reference.model.state_dict().items(), compiled.model.state_dict().values()):
        torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-5, msg=key)
