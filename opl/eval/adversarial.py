"""L-infinity white-box attacks in pixel space (images in [0, 1]) for the adversarial-robustness
experiments (paper.md section 3: PGD-trained CIFAR models, with and without OPL).

* `pgd_linf`: Madry et al. (ICLR 2018) projected gradient descent on the cross-entropy: a start
  point (`start`, below), then `steps` signed-gradient ascent steps of `step_size`, each followed by
  projection onto the eps-ball around the clean image and onto the valid pixel range [0, 1].
  Starts: "uniform": x + U(-eps, eps) clipped to [0, 1] (Madry's cifar10_challenge);
  "uniform_unclamped": x + U(-eps, eps), not clipped before the first step (the PGD-20 evaluation
  `_pgd_whitebox` of TRADES pgd_attack_cifar10.py and MART train_*.py); "normal": x + start_std *
  N(0, 1), not clipped (the training attack of TRADES `trades_loss` and MART `mart_loss`, 0.001);
  "none": x itself.

`RobustAccuracy` is the evaluator the adversarial experiments add: top-1 under PGD on the test set.
In a data-parallel run each process attacks its shard of the images and the counts are summed
over the processes, so every rank reports the accuracy over the whole set (or its first `limit`
images, in the split's order). The random start is drawn per process and batch: with a random
start, the figure depends (within seed noise) on the number of processes and the batch size.

The attacked `forward` maps PIXEL images to logits; `normalized_forward` builds it from a model that
expects normalised input, so the eps-ball is always measured in pixel units. Gradients are taken
with `torch.autograd.grad` w.r.t. the input only, so parameters' `.grad` are never touched; the loop
has no host synchronisation, so it can be captured in a CUDA graph. BatchNorm layers in train mode
update their running statistics during the attack: put the model in eval mode first if unwanted.
"""

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from opl.engine.distributed import world

Forward = Callable[[torch.Tensor], torch.Tensor]
STARTS = ("uniform", "uniform_unclamped", "normal", "none")


def _input_gradient_sign(forward: Forward, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    # Summed (not averaged) loss: the sign is the same, and per-sample gradients are not shrunk by
    # 1/B, which under low-precision autocast could underflow to zero (a zero sign = no step).
    loss = F.cross_entropy(forward(x).float(), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad.sign()


def _check(eps: float, step_size: float | None = None, steps: int | None = None) -> None:
    if not eps >= 0:
        raise ValueError(f"attack eps must be >= 0, got {eps}")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"attack step_size must be > 0, got {step_size}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"attack steps must be an int >= 0, got {steps!r}")


def pgd_linf(
    forward: Forward,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    start: str = "uniform",
    generator: torch.Generator | None = None,
    start_std: float = 0.001,
) -> torch.Tensor:
    """PGD-`steps` within the L-inf ball of radius `eps` around `images` (pixels in [0, 1]), from
    the start point `start` (module docstring); the random start draws from `generator`."""
    _check(eps, step_size, steps)
    if start not in STARTS:
        raise ValueError(f"attack start must be one of {STARTS}, got {start!r}")
    images = images.detach()
    # Intersection of the eps-ball and [0, 1] as one per-pixel box (non-empty since images in [0, 1]).
    lower, upper = (images - eps).clamp(min=0.0), (images + eps).clamp(max=1.0)
    like = dict(generator=generator, device=images.device, dtype=images.dtype)
    if start in ("uniform", "uniform_unclamped"):
        x = images + (2.0 * torch.rand(images.shape, **like) - 1.0) * eps
        if start == "uniform":
            x = torch.clamp(x, lower, upper)
    elif start == "normal":
        x = images + start_std * torch.randn(images.shape, **like)
    else:
        x = images.clone()
    with torch.enable_grad():  # the caller may be under no_grad (evaluation)
        for _ in range(steps):
            x = torch.clamp(x + step_size * _input_gradient_sign(forward, x, labels), lower, upper)
    return x.detach()


def normalized_forward(
    model: nn.Module,
    mean: Sequence[float],
    std: Sequence[float],
    autocast: Callable[[], AbstractContextManager],
) -> Forward:
    """x_pixels -> logits of `model((x - mean) / std)` (the model returns `(features, logits)`),
    with the model call run under `autocast()`. Normalisation stays in the input's dtype."""
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise ValueError(f"need one positive std per mean, got mean={list(mean)}, std={list(std)}")
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in cache:  # built once per device/dtype: no host-to-device copy inside a captured loop
            shape = (1, len(mean), 1, 1)
            cache[key] = (torch.tensor(list(mean), device=x.device, dtype=x.dtype).view(shape),
                          torch.tensor(list(std), device=x.device, dtype=x.dtype).view(shape))
        m, s = cache[key]
        with autocast():
            return model((x - m) / s)[1]

    return forward


def channel_views(mean, std, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std as (1, C, 1, 1) float32 tensors on `device`."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in (mean, std))


def to_pixels(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A normalised batch back to float32 pixels in [0, 1], where the attacks work."""
    return (x.float() * std + mean).clamp(0.0, 1.0)


def robust_accuracy(model: nn.Module, loader, autocast, mean, std, eps: float, step_size: float, steps: int,
                    limit: int | None = None, generator: torch.Generator | None = None, start: str = "uniform") -> dict:
    """Top-1 (%) under PGD-`steps` (eps, step size in pixel units) over the images of the split
    whose position (the loader's index) is below `limit`, or all. The loader may hold one
    process's shard (positions increasing within it): the counts are summed over the processes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    forward = normalized_forward(model, mean, std, autocast)
    mean_view, std_view = channel_views(mean, std, device)
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # correct, attacked
    for x, y, index in loader:
        if limit is not None:
            keep = index < limit
            if not keep.any():
                break
            x, y = x[keep], y[keep]
        adversarial = pgd_linf(forward, to_pixels(x, mean_view, std_view), y, eps, step_size, steps,
                               start=start, generator=generator)
        with torch.no_grad():
            counts[0] += (forward(adversarial).argmax(dim=1) == y).sum()
        counts[1] += y.shape[0]
    model.train(was_training)
    if world()[1] > 1:
        torch.distributed.all_reduce(counts)
    correct, seen = counts.tolist()
    return {"adv_top1": 100.0 * correct / seen, "adv_images": seen}


class RobustAccuracy:
    """Evaluator: test top-1 under L-inf PGD (eps and step size in units of 1/255) as `test_adv_top1`.

    The attack's random start is drawn from the run's seed at every evaluation, so epochs differ
    only by the model.
    """

    def __init__(self, eps: float = 8.0, step_size: float = 2.0, steps: int = 20, limit: int | None = None,
                 start: str = "uniform"):
        if not eps >= 0 or not step_size > 0 or steps < 1:
            raise ValueError(f"robust evaluation needs eps >= 0, step_size > 0, steps >= 1; got {eps}, {step_size}, {steps}")
        if limit is not None and limit < 1:
            raise ValueError(f"robust evaluation limit must be >= 1 or null, got {limit}")
        if start not in STARTS:
            raise ValueError(f"robust evaluation start must be one of {STARTS}, got {start!r}")
        self.eps, self.step_size, self.steps, self.limit, self.start = float(eps), float(step_size), int(steps), limit, start

    def __call__(self, trainer) -> dict:
        generator = torch.Generator(device=trainer.device).manual_seed(trainer.seed)
        metrics = robust_accuracy(trainer.model, trainer.eval_loader("test"), trainer.autocast, trainer.data.mean,
                                  trainer.data.std, self.eps / 255, self.step_size / 255, self.steps, self.limit,
                                  generator, self.start)
        return {f"test_{k}": v for k, v in metrics.items()}
