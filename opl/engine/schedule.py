"""Per-iteration learning-rate factors: linear warm-up, then multistep or cosine decay."""

import math

import torch


def lr_factor(kind: str, iters_per_epoch: int, epochs: int, warmup_epochs: float = 0.0,
              milestones: tuple[int, ...] = (), gamma: float = 0.1, final_factor: float = 0.0):
    """A function iteration -> multiplier of the base learning rate.

    Warm-up ramps linearly from 1/warmup_iters to 1 over the first `warmup_epochs` epochs, per
    iteration. "multistep": multiply by `gamma` at each epoch in `milestones`. "cosine": half a
    cosine from 1 to `final_factor` over the whole run.
    """
    if kind not in ("multistep", "cosine", "constant"):
        raise ValueError(f"unknown schedule {kind!r}; choose multistep, cosine or constant")
    if sorted(milestones) != list(milestones):
        raise ValueError(f"milestones must be increasing, got {list(milestones)}")
    warmup_iters = int(round(warmup_epochs * iters_per_epoch))
    total_iters = max(1, epochs * iters_per_epoch)

    def factor(it: int) -> float:
        warm = min(1.0, (it + 1) / warmup_iters) if warmup_iters else 1.0
        if kind == "multistep":
            epoch = it // iters_per_epoch
            return warm * gamma ** sum(epoch >= m for m in milestones)
        if kind == "cosine":
            progress = min(1.0, it / total_iters)
            return warm * (final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * progress)))
        return warm

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, iters_per_epoch: int, epochs: int, **spec):
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
