"""Adversarial training and evaluation on the shared trainer: Madry PGD-AT and MART, each
optionally with OPL on the adversarial features.

The loaders hand out normalised images; the attacks work in pixel space [0, 1] (epsilon in pixel
units), so a step maps the batch back to pixels, attacks the model through a normalising wrapper
under the training autocast, and trains on the normalised adversarial batch. Attack generation runs
with the model in eval mode (batch-norm statistics frozen), as in the MART and TRADES code.
"""

from dataclasses import dataclass

import torch
from torch import nn

from opl.errors import ConfigError
from opl.eval.adversarial import normalized_forward, pgd_linf
from opl.losses.mart import mart_loss

METHODS = ("pgd_at", "mart")


@dataclass(frozen=True)
class AdversarialConfig:
    """Epsilons and step sizes in units of 1/255 (8 means 8/255), as the CIFAR literature writes them."""

    method: str = "pgd_at"
    eps: float = 8.0
    step_size: float = 2.0
    steps: int = 10
    eval_eps: float = 8.0
    eval_step_size: float = 2.0
    eval_steps: int = 20
    eval_limit: int | None = None  # attack only the first N test images at each evaluation (cost)
    beta: float = 6.0  # MART's weight of the robust term

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"adversarial.method must be one of {METHODS} (or adversarial=none), got {self.method!r}")
        if self.eps < 0 or self.eval_eps < 0 or self.step_size <= 0 or self.eval_step_size <= 0:
            raise ConfigError("adversarial eps must be >= 0 and step sizes > 0")
        if self.steps < 1 or self.eval_steps < 1:
            raise ConfigError("adversarial steps and eval_steps must be >= 1")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"adversarial.eval_limit must be >= 1 or null, got {self.eval_limit}")
        if self.beta < 0:
            raise ConfigError(f"adversarial.beta must be >= 0, got {self.beta}")


def channel_views(mean, std, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std as (1, C, 1, 1) float32 tensors on `device`."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in (mean, std))


def to_pixels(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A normalised batch back to float32 pixels in [0, 1], where the attacks work."""
    return (x.float() * std + mean).clamp(0.0, 1.0)


class AdversarialTrainStep(nn.Module):
    """Same interface as `TrainStep`: `(x, y, index) -> parts`, trained on PGD examples of x."""

    def __init__(self, model: nn.Module, criterion: nn.Module, autocast, cfg: AdversarialConfig, mean, std,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.model, self.criterion, self.autocast, self.cfg = model, criterion, autocast, cfg
        self.generator = generator
        # Built once: no host-to-device copy of constants in the training step.
        mean_view, std_view = channel_views(mean, std, next(model.parameters()).device)
        self.register_buffer("mean", mean_view, persistent=False)
        self.register_buffer("std", std_view, persistent=False)
        self.attack = normalized_forward(model, tuple(mean), tuple(std), autocast)

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> dict:
        mean, std = self.mean, self.std
        pixels = to_pixels(x, mean, std)
        self.model.eval()
        adversarial = pgd_linf(self.attack, pixels, y, self.cfg.eps / 255, self.cfg.step_size / 255, self.cfg.steps,
                               random_start=True, generator=self.generator)
        self.model.train()
        x_adv = ((adversarial - mean) / std).contiguous(memory_format=torch.channels_last if x.is_contiguous(
            memory_format=torch.channels_last) else torch.contiguous_format)
        with self.autocast():
            features, logits = self.model(x_adv)
        if self.cfg.method == "mart":
            with self.autocast():
                _, clean_logits = self.model(x)
            mart = mart_loss(logits, clean_logits, y, beta=self.cfg.beta)
            parts = self.criterion.combine("mart", mart["loss"], features, y)
            parts.update(mart_adv=mart["mart_adv"], mart_robust=mart["mart_robust"])
        else:  # Madry: the criterion (CE, or CE + lambda * OPL) on the adversarial batch
            parts = self.criterion(logits, features, y, index)
        parts["top1"] = (logits.argmax(dim=1) == y).float().mean() * 100.0  # accuracy on the attacked batch
        return parts


def adversarial_accuracy(model: nn.Module, loader, autocast, mean, std, cfg: AdversarialConfig,
                         generator: torch.Generator | None = None) -> dict:
    """Top-1 (%) under the evaluation PGD attack, over the first `eval_limit` images of the loader."""
    was_training = model.training
    model.eval()
    forward = normalized_forward(model, mean, std, autocast)
    mean_view, std_view = channel_views(mean, std, next(model.parameters()).device)
    correct, seen = None, 0
    for x, y, _ in loader:
        if cfg.eval_limit is not None:
            if seen >= cfg.eval_limit:
                break
            x, y = x[:cfg.eval_limit - seen], y[:cfg.eval_limit - seen]
        adversarial = pgd_linf(forward, to_pixels(x, mean_view, std_view), y, cfg.eval_eps / 255, cfg.eval_step_size / 255, cfg.eval_steps,
                               random_start=True, generator=generator)
        with torch.no_grad():
            hits = (forward(adversarial).argmax(dim=1) == y).sum()
        correct = hits if correct is None else correct + hits
        seen += y.shape[0]
    model.train(was_training)
    return {"adv_top1": 100.0 * correct.item() / seen, "adv_images": seen}
