"""CIFAR ResNets and the MLP: parameter counts, (features, logits) contract, shortcut placement."""

import math

import pytest
import torch
from torch import nn

from opl.models import MLP, CifarResNet, resnet18_cifar, resnet20, resnet32, resnet44, resnet56, resnet110

BUILDERS = {20: resnet20, 32: resnet32, 44: resnet44, 56: resnet56, 110: resnet110}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def expected_params(depth: int, num_classes: int, in_channels: int = 3) -> int:
    """Count by hand from the architecture description (3x3 convs without bias, BN = 2 per channel,
    1x1 conv + BN shortcut only where the shape changes, linear 64 -> classes)."""
    n = (depth - 2) // 6
    total = 9 * in_channels * 16 + 2 * 16  # stem conv + BN
    in_planes = 16
    for stage, planes in enumerate((16, 32, 64)):
        for block in range(n):
            total += 9 * in_planes * planes + 9 * planes * planes + 2 * (2 * planes)
            if in_planes != planes or (stage > 0 and block == 0):
                total += in_planes * planes + 2 * planes
            in_planes = planes
    return total + 64 * num_classes + num_classes


def test_resnet56_cifar100_param_count():
    """ResNet-56 for CIFAR-100 has exactly 861,620 parameters (the authors' number)."""
    assert n_params(resnet56(100)) == 861_620


def test_resnet110_cifar100_param_count():
    """ResNet-110 for CIFAR-100 has exactly 1,736,564 parameters (the authors' number)."""
    assert n_params(resnet110(100)) == 1_736_564


@pytest.mark.parametrize("depth", sorted(BUILDERS))
@pytest.mark.parametrize("num_classes", [10, 100])
def test_param_count_matches_hand_count(depth, num_classes):
    """Every depth builds and its parameter count equals the hand count (6n + 2 layers)."""
    assert n_params(BUILDERS[depth](num_classes)) == expected_params(depth, num_classes)


@pytest.mark.parametrize("depth", sorted(BUILDERS))
def test_forward_returns_features_and_logits(depth):
    """Forward on (2, 3, 32, 32) gives 64-d non-negative (post-ReLU) features and class logits."""
    torch.manual_seed(depth)
    model = BUILDERS[depth](7)
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, tuple) and len(out) == 2
    features, logits = out
    assert features.shape == (2, 64) and logits.shape == (2, 7)
    assert model.feature_dim == 64
    assert (features >= 0).all() and features.abs().sum() > 0
    # logits are the linear classifier applied to exactly these features
    torch.testing.assert_close(logits, features @ model.fc.weight.t() + model.fc.bias)


@pytest.mark.parametrize("depth", sorted(BUILDERS))
def test_exactly_two_projection_shortcuts(depth):
    """1x1 conv shortcuts exist only at the two stage transitions (16->32, 32->64, stride 2)."""
    model = BUILDERS[depth](10)
    ones = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(ones) == 2
    assert sorted((m.in_channels, m.out_channels, m.stride) for m in ones) == [(16, 32, (2, 2)), (32, 64, (2, 2))]
    n = (depth - 2) // 6
    blocks = list(model.layers)
    assert len(blocks) == 3 * n
    with_projection = [i for i, blk in enumerate(blocks) if len(blk.shortcut) > 0]
    assert with_projection == [n, 2 * n]
    three = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(three) == 1 + 6 * n  # stem + two per block = depth - 1


def test_spatial_path_downsamples_to_8x8():
    """32x32 input reaches the pool as 64 x 8 x 8 (two stride-2 stages); in_channels is configurable."""
    model = resnet20(10, in_channels=1).eval()
    x = torch.randn(2, 1, 32, 32)
    out = model.layers(model.relu(model.bn1(model.conv1(x))))
    assert out.shape == (2, 64, 8, 8)
    features, logits = model(x)
    torch.testing.assert_close(features, out.mean(dim=(2, 3)))
    assert logits.shape == (2, 10)


def uniform_bound(weights: torch.Tensor) -> float:
    """The half-width b of U(-b, b) that these samples come from, from their standard deviation (b / sqrt(3))."""
    return weights.double().std().item() * math.sqrt(3)


def fan_in(conv: nn.Module) -> int:
    return conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]


def test_pytorchcv_init_is_the_authors():
    """Authors' CIFAR ResNets: every conv U(-sqrt(6/fan_in), +) (kaiming_uniform_ defaults), BN 1/0,
    the Linear at PyTorch's default U(-1/sqrt(64), +) for weight and bias."""
    torch.manual_seed(0)
    model = resnet56(100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        bound = math.sqrt(6.0 / fan_in(conv))
        assert conv.weight.abs().max() <= bound and conv.bias is None
        if conv.weight.numel() >= 2000:  # enough samples for the spread to pin the distribution
            assert uniform_bound(conv.weight) == pytest.approx(bound, rel=0.05)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert model.fc.weight.abs().max() <= 1 / 8 and uniform_bound(model.fc.weight) == pytest.approx(1 / 8, rel=0.05)
    assert 0 < model.fc.bias.abs().max() <= 1 / 8


def test_resnet18_keeps_pytorch_default_init():
    """Label-noise fork / MART ResNet-18: no re-initialisation, so convs are U(-1/sqrt(fan_in), +)."""
    torch.manual_seed(0)
    model = resnet18_cifar(10)
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        bound = 1 / math.sqrt(fan_in(conv))
        assert conv.weight.abs().max() <= bound
        if conv.weight.numel() >= 2000:
            assert uniform_bound(conv.weight) == pytest.approx(bound, rel=0.05)
    assert n_params(model) == 11_173_962
    authors_style = resnet18_cifar(10, init="pytorchcv")
    assert uniform_bound(authors_style.layers[-1].conv2.weight) == pytest.approx(math.sqrt(6 / (512 * 9)), rel=0.05)


@pytest.mark.parametrize("builder", [resnet20, resnet18_cifar])
def test_pre_relu_feature_is_the_signed_residual_sum(builder):
    """feature=pre_relu: the last block's residual sum before its ReLU, pooled (signed: negative
    entries appear); the classifier reads that vector. Same parameters as post_relu, and the
    post-ReLU feature is the pooled ReLU of the same map."""
    torch.manual_seed(1)
    post = builder(10).eval()
    pre = builder(10, feature="pre_relu").eval()
    pre.load_state_dict(post.state_dict())
    assert n_params(pre) == n_params(post)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        f_post, logits_post = post(x)
        f_pre, logits_pre = pre(x)
        h = post.layers[:-1](post.relu(post.bn1(post.conv1(x))))  # input of the last block
        last = post.layers[-1]
        residual_sum = last.bn2(last.conv2(last.relu(last.bn1(last.conv1(h))))) + last.shortcut(h)
    assert (f_post >= 0).all() and (f_pre < 0).any()
    torch.testing.assert_close(f_pre, residual_sum.mean(dim=(2, 3)))
    torch.testing.assert_close(f_post, residual_sum.clamp(min=0).mean(dim=(2, 3)))
    torch.testing.assert_close(logits_pre, f_pre @ pre.fc.weight.t() + pre.fc.bias)
    torch.testing.assert_close(logits_post, f_post @ post.fc.weight.t() + post.fc.bias)
    assert [b.final_relu for b in pre.layers] == [True] * (len(pre.layers) - 1) + [False]


def test_invalid_resnet_arguments():
    """Zero blocks per stage or fewer than two classes are rejected."""
    with pytest.raises(ValueError):
        CifarResNet(0, 10)
    with pytest.raises(ValueError):
        CifarResNet(3, 1)
    with pytest.raises(ValueError, match="model.init"):
        CifarResNet(3, 10, init="kaiming")
    with pytest.raises(ValueError, match="model.feature"):
        CifarResNet(3, 10, feature="pre_bn")


def test_mlp_returns_last_hidden_features():
    """MLP returns (features of the last hidden size, logits); features are post-ReLU."""
    torch.manual_seed(0)
    model = MLP(num_classes=10, in_features=64, hidden=(32, 16))
    features, logits = model(torch.randn(5, 1, 8, 8))  # flattened to 64
    assert features.shape == (5, 16) and logits.shape == (5, 10)
    assert model.feature_dim == 16
    assert (features >= 0).all() and features.abs().sum() > 0
    torch.testing.assert_close(logits, model.fc(features))
    assert n_params(model) == (64 * 32 + 32 + 2 * 32) + (32 * 16 + 16 + 2 * 16) + (16 * 10 + 10)


def test_mlp_needs_a_hidden_layer():
    """An MLP without hidden layers has no feature for OPL and is rejected."""
    with pytest.raises(ValueError):
        MLP(num_classes=3, in_features=4, hidden=())
