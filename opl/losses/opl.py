"""Orthogonal Projection Loss (paper.md section 1).

For L2-normalised features f_i and labels y_i of one mini-batch:

    s = mean_{i != j, y_i == y_j} cos(f_i, f_j)
    d = mean_{y_i != y_k}         cos(f_i, f_k)      (|cos| or |mean| depending on `neg_abs`)
    L = (1 - s) + gamma * d

The computation is a handful of B x B tensor operations with no host synchronisation and no
Python branch on data, so it can live inside a compiled / CUDA-graph region.

Under data-parallel training `scope="local"` (the authors' choice) computes OPL on each process's
own batch; `scope="global"` computes it over the batches of all processes, gathered with gradients
flowing back to every process, so a W-process run optimises exactly the single-process loss.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

NEG_ABS_MODES = ("elementwise", "mean", "none")
SCOPES = ("local", "global")


def gather_batch(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's features (differentiable) and labels, concatenated in rank order."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, labels
    gathered = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, labels)
    return torch.cat(all_gather(features)), torch.cat(gathered)


class OPLComponents(NamedTuple):
    loss: torch.Tensor
    s: torch.Tensor  # mean same-class cosine (diagonal excluded)
    d: torch.Tensor  # different-class term as it enters the loss (after neg_abs)
    pos_pairs: torch.Tensor  # number of ordered same-class pairs, i != j
    neg_pairs: torch.Tensor  # number of ordered different-class pairs


class OrthogonalProjectionLoss(nn.Module):
    """OPL on the pooled penultimate features.

    neg_abs: where the absolute value of the different-class term goes.
      "elementwise": mean of |cos| (paper Algorithm 1, most of the authors' code; default)
      "mean":        |mean cos|    (the paper's equation)
      "none":        mean cos      (the authors' top-level loss.py)
    With non-negative (post-ReLU) features all three coincide.
    """

    def __init__(self, gamma: float = 0.5, neg_abs: str = "elementwise", eps: float = 1e-6, scope: str = "local"):
        super().__init__()
        if scope not in SCOPES:
            raise ValueError(f"OPL scope must be one of {SCOPES}, got {scope!r}")
        self.scope = scope
        if not gamma >= 0:  # also rejects NaN
            raise ValueError(f"OPL gamma must be >= 0, got {gamma}")
        if neg_abs not in NEG_ABS_MODES:
            raise ValueError(f"OPL neg_abs must be one of {NEG_ABS_MODES}, got {neg_abs!r}")
        if not eps > 0:
            raise ValueError(f"OPL eps must be > 0, got {eps}")
        self.gamma = float(gamma)
        self.neg_abs = neg_abs
        self.eps = float(eps)

    def components(self, features: torch.Tensor, labels: torch.Tensor) -> OPLComponents:
        if features.dim() != 2:
            raise ValueError(f"OPL expects features of shape (batch, dim), got {tuple(features.shape)}")
        if self.scope == "global":
            features, labels = gather_batch(features, labels)
        # float32 at least, even under autocast; float64 input stays float64 (gradcheck).
        dtype = torch.promote_types(features.dtype, torch.float32)
        with torch.autocast(device_type=features.device.type, enabled=False):
            f = F.normalize(features.to(dtype), p=2, dim=1)
            cos = f @ f.t()
            labels = labels.view(-1, 1)
            same = labels == labels.t()
            eye = torch.eye(same.shape[0], dtype=torch.bool, device=same.device)
            pos_mask = (same & ~eye).to(dtype)
            neg_mask = (~same).to(dtype)
            pos_pairs = pos_mask.sum()
            neg_pairs = neg_mask.sum()
            s = (pos_mask * cos).sum() / (pos_pairs + self.eps)
            if self.neg_abs == "elementwise":
                d = (neg_mask * cos.abs()).sum() / (neg_pairs + self.eps)
            else:
                d = (neg_mask * cos).sum() / (neg_pairs + self.eps)
                if self.neg_abs == "mean":
                    d = d.abs()
            loss = (1.0 - s) + self.gamma * d
        return OPLComponents(loss, s, d, pos_pairs, neg_pairs)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.components(features, labels).loss

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, neg_abs={self.neg_abs!r}, eps={self.eps}, scope={self.scope!r}"
