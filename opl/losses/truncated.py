"""Truncated Lq loss (Zhang & Sabuncu, NeurIPS 2018) with per-sample 0/1 weights, as used by the
paper's label-noise experiments (paper.md section 3).

    Lq(p) = (1 - p^q) / q,   p = softmax(logits)[label]
    loss  = mean_i  w_i * (Lq(p_i) - Lq(k))

Before `start_epoch` every weight is 1. At the start of (1-based) epoch `start_epoch` and every
`refresh_every` epochs after it, the weights are recomputed over the whole training set:
w_i = 1 if Lq(p_i) < Lq(k) (the model gives the label probability above k), else 0, so samples the
model confidently disagrees with are pruned until the next refresh.

Where the weights come from differs from the reference (docs/deviations.md, "Truncated loss"):
* Ours: the CURRENT model, in eval mode, on the UN-augmented training images; no test data.
* The authors' fork (kahnchana/opl label_noise/truncated_loss/main.py) and the code it borrows
  (AlanChou/Truncated-Loss main.py): the checkpoint with the best TEST accuracy so far (saved by
  `test()` whenever test accuracy improves), in eval mode, over the training loader, i.e. on
  randomly cropped and flipped images. The samples kept for training are thus chosen with a model
  selected on the test set: a test-set leak. The refresh epochs are the same as ours for the
  recipes' values (theirs: 1-based epochs e >= start_prune with e % 10 == 0; 40, 50, ... or 80, 90, ...).
  In a refresh epoch their training loop then runs on a reloaded copy of the network whose
  parameters the optimizer does not hold, so that epoch's gradients never reach the evaluated model;
  we train normally in every epoch.
"""

import torch
import torch.nn.functional as F
from torch import nn


class TruncatedLq(nn.Module):
    name = "tl"

    def __init__(self, q: float = 0.7, k: float = 0.5, start_epoch: int = 40, refresh_every: int = 10):
        super().__init__()
        if not 0.0 < q <= 1.0:
            raise ValueError(f"truncated loss q must be in (0, 1], got {q}")
        if not 0.0 < k < 1.0:
            raise ValueError(f"truncated loss k must be in (0, 1), got {k}")
        if start_epoch < 1 or refresh_every < 1:
            raise ValueError(f"start_epoch and refresh_every must be >= 1, got {start_epoch}, {refresh_every}")
        self.q, self.k = float(q), float(k)
        self.start_epoch, self.refresh_every = int(start_epoch), int(refresh_every)
        self.lq_k = self.lq(torch.tensor(self.k, dtype=torch.float64)).item()
        self.weights: torch.Tensor | None = None  # (N,) over the training set once pruning has started

    def lq(self, p: torch.Tensor) -> torch.Tensor:
        return (1.0 - p.pow(self.q)) / self.q

    def label_probability(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        per_sample = self.lq(self.label_probability(logits, labels)) - self.lq_k
        if self.weights is not None:
            per_sample = per_sample * self.weights[index]
        return per_sample.mean()

    def refresh_due(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and (epoch - self.start_epoch) % self.refresh_every == 0

    def refresh(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """New weights from the current model's logits over the whole training set (dataset order)."""
        keep = (self.lq(self.label_probability(logits, labels)) < self.lq_k).float()
        if self.weights is None or self.weights.shape != keep.shape:
            self.weights = keep
        else:
            self.weights.copy_(keep)  # in place: a compiled step keeps reading the same tensor

    def before_epoch(self, epoch: int, trainer) -> dict:
        """Called by the Trainer before each epoch: refresh the weights when due; values to log."""
        if self.refresh_due(epoch):
            _, logits, labels = trainer.predict("train")
            self.refresh(logits, labels)
        return {} if self.weights is None else {"tl_kept_fraction": self.weights.mean().item()}

    def get_extra_state(self):
        return {"weights": self.weights}

    def set_extra_state(self, state) -> None:
        weights = state["weights"]
        self.weights = None if weights is None else weights.float()

    def extra_repr(self) -> str:
        return f"q={self.q}, k={self.k}, start_epoch={self.start_epoch}, refresh_every={self.refresh_every}"
