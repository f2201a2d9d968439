"""timm backbones for ImageNet/PACS: exact architectures, (features, logits), the RSC split of the
forward pass, local pretrained weights, and the offline refusal of timm's download."""

import hashlib

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file
from torch import nn

from conftest import REPO
from opl.errors import CheckpointError, ConfigError
from opl.models import CifarResNet, TimmBackbone
from train import instantiate_checked


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch, expected, dim", [("resnet18", 11_689_512, 512), ("resnet50", 25_557_032, 2048),
                                                 ("resnet50d", 25_576_264, 2048)])
def test_exact_architectures_and_features(arch, expected, dim):
    """Parameter counts at 1,000 classes (torchvision's resnet18/50 have the same), and at 7."""
    model = TimmBackbone(arch, num_classes=1000)
    assert n_params(model) == expected and model.feature_dim == dim
    assert n_params(TimmBackbone(arch, num_classes=7)) == expected - 1000 * (dim + 1) + 7 * (dim + 1)
    if arch != "resnet50d":
        assert n_params(getattr(torchvision.models, arch)()) == expected


def test_features_are_the_pooled_map_and_forward_splits_for_rsc():
    torch.manual_seed(0)
    model = TimmBackbone("resnet18", num_classes=5).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        fmap = model.feature_map(x)
        features, logits = model(x)
        assert fmap.shape == (3, 512, 2, 2) and features.shape == (3, 512) and logits.shape == (3, 5)
        torch.testing.assert_close(features, fmap.double().mean(dim=(2, 3)).float())  # global average pool
        fc = model.net.fc
        torch.testing.assert_close(logits, (features.double() @ fc.weight.double().t() + fc.bias.double()).float())
        split_features, split_logits = model.head(model.feature_map(x))
        assert torch.equal(split_features, features) and torch.equal(split_logits, logits)
        # RSC mutes feature-map channels: those channels of the pooled feature become 0.
        muted = fmap.clone()
        muted[:, :100] = 0
        muted_features, _ = model.head(muted)
        assert torch.all(muted_features[:, :100] == 0) and torch.equal(muted_features[:, 100:], features[:, 100:])


def test_pretrained_path_round_trip_with_another_class_count(tmp_path):
    """A torchvision-style state dict (.pth) and a timm one (.safetensors) load with weights_only;
    the classifier is dropped when the class count differs; the file's sha256 is exposed."""
    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=1000).eval()
    for m in source.modules():  # non-trivial BN statistics, so that they must be carried over
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    pth = tmp_path / "resnet18_tv.pth"
    torch.save(source.state_dict(), pth)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.flatten(source.avgpool(nn.Sequential(*list(source.children())[:-2])(x)), 1)
        expected_logits = source(x)

    seven = TimmBackbone("resnet18", num_classes=7, pretrained_path=str(pth)).eval()
    assert seven.weights_sha256 == hashlib.sha256(pth.read_bytes()).hexdigest()
    assert seven.weights_source == f"file:{pth}"
    same = TimmBackbone("resnet18", num_classes=1000, pretrained_path=str(pth)).eval()
    with torch.no_grad():
        torch.testing.assert_close(seven(x)[0], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(same(x)[1], expected_logits, rtol=1e-5, atol=1e-5)  # classifier kept

    # timm-style keys from one of our own models, as .safetensors, into another class count.
    st = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in seven.net.state_dict().items()}, str(st))
    other = TimmBackbone("resnet18", num_classes=3, pretrained_path=str(st)).eval()
    with torch.no_grad():
        torch.testing.assert_close(other(x)[0], seven(x)[0], rtol=0, atol=0)
    assert other.weights_sha256 == hashlib.sha256(st.read_bytes()).hexdigest()
    # ... and a TimmBackbone's own state dict (keys under "net.").
    own = tmp_path / "own.pth"
    torch.save(other.state_dict(), own)
    with torch.no_grad():
        torch.testing.assert_close(TimmBackbone("resnet18", 3, pretrained_path=str(own)).eval()(x)[1], other(x)[1])
    assert TimmBackbone("resnet18", 3).weights_sha256 is None


def test_unfit_or_unsafe_weights_files_are_one_line_errors(tmp_path):
    r50 = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), r50)
    with pytest.raises(CheckpointError, match=r"r50.pth does not fit timm's resnet18: shape differs: .*; unexpected: .*") as err:
        TimmBackbone("resnet18", 10, pretrained_path=str(r50))
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="no weights file at"):
        TimmBackbone("resnet18", 10, pretrained_path=str(tmp_path / "absent.pth"))
    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "extra": object()}, pickled)  # not weights only
    with pytest.raises(CheckpointError, match="pickled.pth is not a weights file"):
        TimmBackbone("resnet18", 10, pretrained_path=str(pickled))
    with pytest.raises(ConfigError, match="not both"):
        TimmBackbone("resnet18", 10, pretrained=True, pretrained_path=str(r50))
    with pytest.raises(ConfigError, match="not a timm model"):
        TimmBackbone("resnet18_cifar", 10)
    with pytest.raises(ConfigError, match=r"^model.zero_init_last applies to timm's ResNets, not to efficientnet_b0: "
                                          r"set model.zero_init_last=null$"):
        TimmBackbone("efficientnet_b0", 10, zero_init_last=False)
    assert TimmBackbone("efficientnet_b0", 10).feature_dim == 1280  # the architecture's own initialisation


def test_pretrained_download_offline_names_the_offline_route(monkeypatch, tmp_path):
    """What a machine without network sees (simulated with the hub's offline mode and an empty
    cache, so the test does not wait through the download retries)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError) as err:
        TimmBackbone("resnet18", 10, pretrained=True)
    message = str(err.value)
    assert "model.pretrained=true" in message and "model.pretrained_path=FILE" in message and "\n" not in message


def batchnorm_weights(model: nn.Module) -> dict:
    return {name: m.weight.detach() for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@pytest.mark.parametrize("name, arch, zero_last", [("resnet18", "resnet18", False), ("resnet50", "resnet50", False),
                                                   ("resnet50d", "resnet50d", True)])
def test_model_configs(name, arch, zero_last):
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}", "dataset=imagefolder", "dataset.num_classes=7"])
        cifar = compose("train", overrides=["model=resnet18_cifar"])
    assert (cfg.model.arch, cfg.model.pretrained, cfg.model.pretrained_path) == (arch, False, None)
    model = instantiate_checked(cfg.model)
    assert isinstance(model, TimmBackbone) and model.net.fc.out_features == 7
    # From scratch: torchvision's initialisation for ResNet-18/50 (every BatchNorm weight 1, as in
    # torchvision's own models), "Bag of Tricks"' zero gamma for ResNet-50-D (each block's last one 0).
    ours = batchnorm_weights(model.net)
    last = {n for n in ours if n.startswith("layer") and n.endswith(("bn2" if name == "resnet18" else "bn3"))}
    assert len(last) == (8 if name == "resnet18" else 16)
    assert all(bool((w == 0).all()) == (zero_last and n in last) for n, w in ours.items())
    assert all(bool((w == 1).all()) == (not zero_last or n not in last) for n, w in ours.items())
    if not zero_last:
        reference = batchnorm_weights(getattr(torchvision.models, arch)())
        assert ours.keys() == reference.keys()
        assert all(torch.equal(ours[n], reference[n]) for n in ours)
    assert isinstance(instantiate_checked(cifar.model), CifarResNet)  # model=resnet18_cifar is untouched
