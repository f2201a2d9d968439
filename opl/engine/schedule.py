"""Per-iteration learning-rate factors: linear warm-up, then multistep or cosine decay.

Conventions (one for every recipe; each experiment's values are set so that its LR per epoch equals
its reference's, tests/test_schedule.py checks them against the references' own rules):

* Epochs are 1-based, as the Trainer counts them. Iteration `it` (0-based, over the whole run)
  belongs to epoch `it // iters_per_epoch + 1`.
* `milestones` are the 1-based epochs from which the LR is multiplied by `gamma`: with
  milestones [60] epoch 59 runs at the base LR and epoch 60 at base * gamma. This is how the
  authors' CIFAR code (`MultiStepLR.step(epoch)` at the start of each 1-based epoch) and the
  TRADES/MART `adjust_learning_rate(epoch)` (`epoch >= 75`) behave. A PyTorch `MultiStepLR`
  stepped once after each epoch (the label-noise code) decays one epoch later: its milestone m is
  our m + 1.
* Warm-up: iteration `it` < `warmup_epochs * iters_per_epoch` (= W iterations) runs at
  base * it / W, so the first step has LR 0 and the last warm-up step base * (W - 1) / W, as the
  authors' `WarmUpLR` (base * last_epoch / total_iters, stepped after each iteration).
"""

import math

import torch


def lr_factor(kind: str, iters_per_epoch: int, epochs: int, warmup_epochs: float = 0.0,
              milestones: tuple[int, ...] = (), gamma: float = 0.1, final_factor: float = 0.0):
    """A function iteration -> multiplier of the base learning rate (conventions: module docstring).

    "multistep": gamma ** (number of milestones <= the iteration's 1-based epoch). "cosine": half a
    cosine from 1 to `final_factor` over the whole run, per iteration. Both times the warm-up ramp.
    """
    if kind not in ("multistep", "cosine", "constant"):
        raise ValueError(f"unknown schedule {kind!r}; choose multistep, cosine or constant")
    if sorted(milestones) != list(milestones) or any(m < 1 for m in milestones):
        raise ValueError(f"milestones must be increasing 1-based epochs (>= 1), got {list(milestones)}")
    warmup_iters = int(round(warmup_epochs * iters_per_epoch))
    total_iters = max(1, epochs * iters_per_epoch)

    def factor(it: int) -> float:
        warm = it / warmup_iters if it < warmup_iters else 1.0
        if kind == "multistep":
            epoch = it // iters_per_epoch + 1
            return warm * gamma ** sum(epoch >= m for m in milestones)
        if kind == "cosine":
            progress = min(1.0, it / total_iters)
            return warm * (final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * progress)))
        return warm

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, iters_per_epoch: int, epochs: int, **spec):
    """A LambdaLR stepped once after every optimizer step: iteration `it` runs at base * factor(it)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(iters_per_epoch=iters_per_epoch, epochs=epochs, **spec))


def scheduled_lrs(scheduler: torch.optim.lr_scheduler.LambdaLR, iteration: int) -> list[float]:
    """The learning rate of each parameter group at `iteration` (what LambdaLR sets after that many steps)."""
    return [base * factor(iteration) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]


def set_iteration(scheduler: torch.optim.lr_scheduler.LambdaLR, iteration: int) -> None:
    """Put a restored scheduler at `iteration` (e.g. the first of an epoch after a resume with
    another number of iterations per epoch), setting the optimizer's learning rates to match. A
    learning rate held as a tensor is filled in place, as PyTorch's schedulers do (a captured
    training step reads it by address)."""
    scheduler.last_epoch = iteration
    lrs = scheduled_lrs(scheduler, iteration)
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    scheduler._last_lr = lrs
