"""Cross-entropy, optionally plus lambda * OPL on the penultimate features.

Every criterion takes `(logits, features, labels)` and returns a dict of scalar tensors whose
"loss" entry is optimised; the trainer logs the other entries without knowing the loss.
"""

import torch
import torch.nn.functional as F
from torch import nn

from opl.losses.opl import OrthogonalProjectionLoss


class ClassificationLoss(nn.Module):
    def __init__(self, opl: OrthogonalProjectionLoss | None = None, weight: float = 1.0):
        super().__init__()
        if opl is not None and not weight >= 0:
            raise ValueError(f"OPL weight (lambda) must be >= 0, got {weight}")
        self.opl = opl
        self.weight = float(weight)

    @property
    def needs_pairs(self) -> bool:
        """True when the loss is meaningless for a batch of one sample."""
        return self.opl is not None

    def forward(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> dict:
        ce = F.cross_entropy(logits.float(), labels)
        if self.opl is None:
            return {"loss": ce, "ce": ce}
        parts = self.opl.components(features, labels)
        return {
            "loss": ce + self.weight * parts.loss,
            "ce": ce,
            "opl": parts.loss,
            "opl_s": parts.s,
            "opl_d": parts.d,
        }


def ce_plus_opl(weight: float = 1.0, gamma: float = 0.5, neg_abs: str = "elementwise", eps: float = 1e-6) -> ClassificationLoss:
    """`CE + weight * OPL(gamma, neg_abs)`: the composition the configs instantiate."""
    return ClassificationLoss(OrthogonalProjectionLoss(gamma=gamma, neg_abs=neg_abs, eps=eps), weight=weight)
