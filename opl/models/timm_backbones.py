"""ImageNet backbones from timm (ResNet-18/50/50-D and any other timm classifier), as OPL models.

`TimmBackbone(x)` returns `(features, logits)`: features = the globally pooled vector that feeds the
classifier (OPL's input). For methods that act on the last convolutional feature map (e.g. RSC,
which mutes its most predictive channels), `feature_map(x)` and `head(feature_map)` split the
forward pass: `forward(x) == head(feature_map(x))`.

Weights: `pretrained=True` is timm's own download (Hugging Face hub) of the architecture's default
weights, or of a tag such as `resnet18.tv_in1k` (torchvision's weights); `pretrained_path` loads a
local state dict (timm- or torchvision-style keys, `.pth` or `.safetensors`, weights only) and
drops its classifier when the class count differs. `weights_source` and `weights_sha256` say what
was loaded, for the run's records.
"""

import hashlib
from pathlib import Path

import torch
from torch import nn

from opl.errors import CheckpointError, ConfigError


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


class TimmBackbone(nn.Module):
    """A timm classifier `arch` (e.g. "resnet50", "resnet18.tv_in1k") returning `(features, logits)`."""

    def __init__(self, arch: str, num_classes: int, pretrained: bool = False, pretrained_path: str | None = None,
                 zero_init_last: bool | None = None):
        super().__init__()
        # timm is imported on first use: importing it costs about a second at every start.
        import timm

        if not timm.is_model(arch):
            close = timm.list_models(f"*{arch.split('.')[0]}*")[:6]
            raise ConfigError(f"model.arch={arch!r} is not a timm model (similar: {', '.join(close) or 'none'})")
        if num_classes < 2:
            raise ConfigError(f"model.num_classes must be >= 2, got {num_classes}")
        if pretrained and pretrained_path:
            raise ConfigError("set model.pretrained=true (timm download) or model.pretrained_path=FILE, not both")
        self.arch = arch
        self.weights_source, self.weights_sha256 = None, None
        # zero_init_last (timm's ResNets: each block's last BatchNorm weight starts at 0) matters from
        # scratch only; None keeps the architecture's own default (and works for timm models without it).
        options = {"num_classes": num_classes} | ({} if zero_init_last is None else {"zero_init_last": zero_init_last})
        if pretrained:
            try:
                self.net = timm.create_model(arch, pretrained=True, **options)
            except TypeError as exc:
                raise self._option_refused(exc) from None
            except Exception as exc:  # network, hub, cache or tag failures all end here, as one line
                raise CheckpointError(
                    f"model.pretrained=true: timm could not fetch the {arch} weights ({_one_line(exc)}); "
                    f"without network, download them elsewhere and pass model.pretrained_path=FILE") from None
            self.weights_source = f"timm:{arch.split('.')[0]}.{self.net.pretrained_cfg.get('tag')}"
        else:
            try:
                self.net = timm.create_model(arch, pretrained=False, **options)
            except TypeError as exc:
                raise self._option_refused(exc) from None
        if pretrained_path:
            self.load_weights(Path(pretrained_path).expanduser())
        self.feature_dim = self.net.num_features

    def _option_refused(self, exc: TypeError) -> Exception:
        if "zero_init_last" in str(exc):
            return ConfigError(f"model.zero_init_last applies to timm's ResNets, not to {self.arch}: "
                               "set model.zero_init_last=null")
        return exc

    def load_weights(self, path: Path) -> None:
        """Load a local state dict; its classifier is kept only when it has our shape (else, or when
        absent, ours stays freshly initialised)."""
        from timm.models import load_state_dict

        if not path.is_file():
            raise CheckpointError(f"model.pretrained_path: no weights file at {path}")
        try:
            state = load_state_dict(str(path), weights_only=True)
        except Exception as exc:  # not a torch/safetensors file, or pickled objects beyond tensors
            raise CheckpointError(f"model.pretrained_path: {path} is not a weights file ({_one_line(exc)})") from None
        if state and all(k.startswith("net.") for k in state):  # saved from a TimmBackbone itself
            state = {k[len("net."):]: v for k, v in state.items()}
        own = self.net.state_dict()
        head_keys = [k for k in own if k.startswith(f"{self.net.get_classifier(name_only=True)}.")]
        for key in head_keys:
            if key in state and state[key].shape != own[key].shape:
                del state[key]
        wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
        missing = [k for k in own if k not in state and k not in head_keys]
        unexpected = [k for k in state if k not in own]
        if wrong or missing or unexpected:
            detail = "; ".join(f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                               for what, keys in (("shape differs:", wrong), ("missing:", missing),
                                                  ("unexpected:", unexpected)) if keys)
            raise CheckpointError(f"model.pretrained_path: {path} does not fit timm's {self.arch}: {detail}")
        self.net.load_state_dict(state, strict=False)  # checked above, classifier aside
        self.weights_source, self.weights_sha256 = f"file:{path}", file_sha256(path)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional stage's output (B, feature_dim, h, w), before pooling."""
        return self.net.forward_features(x)

    def head(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net.forward_head(feature_map, pre_logits=True)
        return features, self.net.get_classifier()(features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.feature_map(x))
