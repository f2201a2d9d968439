"""Classification criteria: a base loss (cross-entropy or the truncated Lq loss), optionally plus
lambda * OPL on the penultimate features.

Every criterion takes `(logits, features, labels, index)` (index: each sample's position in the
training split, for losses with per-sample state) and returns a dict of scalar tensors whose
"loss" entry is optimised; the trainer logs the other entries without knowing the loss.
"""

import torch
import torch.nn.functional as F
from torch import nn

from opl.losses.opl import OrthogonalProjectionLoss
from opl.losses.truncated import TruncatedLq


class CrossEntropy(nn.Module):
    name = "ce"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)


class ClassificationLoss(nn.Module):
    def __init__(self, opl: OrthogonalProjectionLoss | None = None, weight: float = 1.0, base: nn.Module | None = None):
        super().__init__()
        if opl is not None and not weight >= 0:
            raise ValueError(f"OPL weight (lambda) must be >= 0, got {weight}")
        self.base = base if base is not None else CrossEntropy()
        self.opl = opl
        self.weight = float(weight)

    @property
    def needs_pairs(self) -> bool:
        """True when the loss is meaningless for a batch of one sample."""
        return self.opl is not None

    def opl_terms(self, features: torch.Tensor, labels: torch.Tensor) -> dict:
        """The OPL entries of the parts dict ({} without OPL); "opl" is unweighted."""
        if self.opl is None:
            return {}
        parts = self.opl.components(features, labels)
        return {"opl": parts.loss, "opl_s": parts.s, "opl_d": parts.d}

    def combine(self, base_name: str, base: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> dict:
        """`base + weight * OPL` with every part, for a base loss computed elsewhere (e.g. MART)."""
        terms = self.opl_terms(features, labels)
        loss = base + self.weight * terms["opl"] if terms else base
        return {"loss": loss, base_name: base, **terms}

    def forward(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                index: torch.Tensor | None = None) -> dict:
        return self.combine(self.base.name, self.base(logits, labels, index), features, labels)


def ce_plus_opl(weight: float = 1.0, gamma: float = 0.5, neg_abs: str = "elementwise", eps: float = 1e-6,
                scope: str = "local") -> ClassificationLoss:
    """`CE + weight * OPL(gamma, neg_abs, scope)`: the composition the configs instantiate."""
    return ClassificationLoss(OrthogonalProjectionLoss(gamma=gamma, neg_abs=neg_abs, eps=eps, scope=scope), weight=weight)


def truncated_lq(q: float = 0.7, k: float = 0.5, start_epoch: int = 40, refresh_every: int = 10,
                 weight: float | None = None, gamma: float = 0.5, neg_abs: str = "elementwise",
                 eps: float = 1e-6, scope: str = "local") -> ClassificationLoss:
    """The truncated Lq loss; plus `weight * OPL(gamma, neg_abs, scope)` when `weight` is given."""
    opl = None if weight is None else OrthogonalProjectionLoss(gamma=gamma, neg_abs=neg_abs, eps=eps, scope=scope)
    return ClassificationLoss(opl, weight=1.0 if weight is None else weight,
                              base=TruncatedLq(q=q, k=k, start_epoch=start_epoch, refresh_every=refresh_every))
