"""Adversarial training steps: Madry PGD-AT and MART, each optionally with OPL on the adversarial
features.

The loaders hand out normalised images; the attacks work in pixel space [0, 1] (epsilon in pixel
units), so a step maps the batch back to pixels, attacks the model through a normalising wrapper
under the training autocast, and trains on the normalised adversarial batch. Attack generation runs
with the model in eval mode (batch-norm statistics frozen), as in the MART and TRADES code. The
attack's start point is `start` (opl.eval.adversarial.pgd_linf): "uniform" for ours, "normal"
(x + 0.001 N(0, 1)) in the presets that follow MART's scripts (configs/method/*_ref.yaml). MART
runs the clean batch through the model before the adversarial one, as `mart_loss`, so batch-norm
running statistics are updated in the reference's order.
"""

import torch
from torch import nn

from opl.errors import ConfigError
from opl.eval.adversarial import STARTS, channel_views, normalized_forward, pgd_linf, to_pixels
from opl.losses.mart import mart_loss
from opl.methods.base import TrainingStep

KINDS = ("pgd_at", "mart")


class AdversarialStep(TrainingStep):
    """Trains on L-inf PGD examples of each batch. Epsilon and step size in units of 1/255."""

    compile_refusal = ("the attack loop differentiates w.r.t. the input and has not been validated under "
                       "torch.compile; use trainer.compile=false")

    # Every attack setting is required: the values (and where they come from) live in
    # configs/method/pgd_at*.yaml and mart*.yaml.
    def __init__(self, model: nn.Module, criterion: nn.Module, data, kind: str, eps: float, step_size: float,
                 steps: int, beta: float, start: str, start_std: float):
        super().__init__(model, criterion)
        if kind not in KINDS:
            raise ConfigError(f"method.kind must be one of {KINDS}, got {kind!r}")
        if not eps >= 0 or not step_size > 0:
            raise ConfigError(f"method.eps must be >= 0 and method.step_size > 0, got {eps}, {step_size}")
        if steps < 1:
            raise ConfigError(f"method.steps must be >= 1, got {steps}")
        if not beta >= 0:
            raise ConfigError(f"method.beta must be >= 0, got {beta}")
        if start not in STARTS or not start_std >= 0:
            raise ConfigError(f"method.start must be one of {STARTS} and method.start_std >= 0, got {start!r}, {start_std}")
        self.start, self.start_std = start, float(start_std)
        self.kind, self.eps, self.step_size, self.steps, self.beta = kind, float(eps), float(step_size), int(steps), float(beta)
        self.data_mean, self.data_std = tuple(data.mean), tuple(data.std)
        self.generator: torch.Generator | None = None

    def bind(self, autocast, device: torch.device, seed: int, epochs: int | None = None) -> None:
        super().bind(autocast, device, seed, epochs)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # Built once: no host-to-device copy of constants in the training step.
        mean, std = channel_views(self.data_mean, self.data_std, device)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.attack = normalized_forward(self.model, self.data_mean, self.data_std, autocast)

    def rng_state(self) -> dict:
        return {"attack": self.generator.get_state()}

    def load_rng_state(self, state: dict) -> None:
        self.generator.set_state(state["attack"])

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> dict:
        pixels = to_pixels(x, self.mean, self.std)
        self.model.eval()
        adversarial = pgd_linf(self.attack, pixels, y, self.eps / 255, self.step_size / 255, self.steps,
                               start=self.start, generator=self.generator, start_std=self.start_std)
        self.model.train()
        memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        x_adv = ((adversarial - self.mean) / self.std).contiguous(memory_format=memory_format)
        if self.kind == "mart":
            with self.autocast():
                _, clean_logits = self.model(x)  # clean first, as `mart_loss` (batch-norm statistics order)
                features, logits = self.model(x_adv)
            mart = mart_loss(logits, clean_logits, y, beta=self.beta)
            parts = self.criterion.combine("mart", mart["loss"], features, y)
            parts.update(mart_adv=mart["mart_adv"], mart_robust=mart["mart_robust"])
        else:  # Madry: the criterion (CE, or CE + lambda * OPL) on the adversarial batch
            with self.autocast():
                features, logits = self.model(x_adv)
            parts = self.criterion(logits, features, y, index)
        parts["top1"] = self.accuracy(logits, y)  # accuracy on the attacked batch
        return parts
