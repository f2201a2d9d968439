"""The training-step interface: how one batch becomes the loss parts the Trainer optimises.

A step is chosen by config (`method=`), built outside the Trainer from the model, the criterion and
the data, and handed to it, as DomainBed hands over its algorithms. The Trainer moves it to the
device, calls `bind` once (where a step also checks its settings against the run), then
`step(x, y, index) -> parts` per batch, and back-propagates `parts["loss"]`; it never asks which
method it runs.
"""

import contextlib
from typing import Callable

import torch
from torch import nn


class TrainingStep(nn.Module):
    """`(x, y, index) -> parts`: a dict of scalar tensors whose "loss" entry is optimised.

    x: the normalised, augmented batch on the device; y: labels; index: each sample's position in
    the training split (per-sample state such as the truncated loss's weights). The other entries
    of `parts` are logged as `train_<name>`.
    """

    # May run inside `torch.compile` (and CUDA graphs). A step that cannot says so here, and the
    # Trainer then refuses trainer.compile=true with this reason.
    compile_refusal: str | None = None

    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.autocast: Callable = contextlib.nullcontext

    @property
    def needs_pairs(self) -> bool:
        """True when a batch of one sample is meaningless for the loss (OPL compares pairs)."""
        return bool(getattr(self.criterion, "needs_pairs", False))

    def bind(self, autocast: Callable, device: torch.device, seed: int, epochs: int | None = None) -> None:
        """Called once by the Trainer after the step is on `device`, before anything is trained or
        written: the precision context, the seed of any random state the step owns (its generators
        are checkpointed via `rng_state`) and the run's number of epochs (None when unknown), so a
        step whose settings cannot work for this run refuses it here."""
        self.autocast = autocast

    def rng_state(self) -> dict:
        return {}

    def load_rng_state(self, state: dict) -> None:
        pass

    def accuracy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(dim=1) == y).float().mean() * 100.0


class StandardStep(TrainingStep):
    """Forward under autocast, then the criterion (CE, truncated Lq, ... plus lambda * OPL): ERM."""

    def __init__(self, model: nn.Module, criterion: nn.Module, data=None):
        super().__init__(model, criterion)

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> dict:
        with self.autocast():
            features, logits = self.model(x)
        parts = self.criterion(logits, features, y, index)
        parts["top1"] = self.accuracy(logits, y)
        return parts
