"""How much of a training step runs as one captured region (`trainer.capture`).

step_only     (the reference path) the loader augments and normalises each batch; the step module
              (model + loss) is the compiled region (CUDA graphs on CUDA); backward, optimizer step
              and LR schedule run eagerly after it.
with_augment  the loader only draws each batch's augmentation parameters (eagerly, from its own
              generator, so the random stream is the reference's: `DeferredAugment`); applying
              them and normalising run inside the compiled region with the model and loss
              (`AugmentedStep`).
whole_step    as with_augment, plus backward, optimizer step and LR update in the same region
              (`WholeStep`): the learning rate is a device tensor that the step itself advances
              (`DeviceLR`), and on CUDA the whole update is recorded once as a CUDA graph per batch
              shape and replayed for every batch, so a step is a few input copies and one replay.

Every mode computes the same step as step_only; the tests hold each against it.
"""

import collections

import torch
from torch import nn

from opl.data.augment import BatchAugment
from opl.engine.schedule import scheduled_lrs, set_iteration

CAPTURE_MODES = ("step_only", "with_augment", "whole_step")


class AugmentedStep(nn.Module):
    """The training step with the batch's augmentation in front of it:
    (uint8 images, labels, index, augmentation parameters) -> the step's parts."""

    def __init__(self, step: nn.Module, augment: BatchAugment, memory_format: torch.memory_format):
        super().__init__()
        self.step = step
        self.augment = augment
        self.memory_format = memory_format

    def forward(self, images: torch.Tensor, y: torch.Tensor, index: torch.Tensor, params: dict) -> dict:
        x = self.augment.normalize(self.augment.apply(images, params))
        return self.step(x.contiguous(memory_format=self.memory_format), y, index)


class DeviceLR:
    """The optimizer's learning rates as device tensors, advanced by the step on the device.

    A table holds the scheduler's value of every iteration up to `iterations` (the run's length);
    `advance()` moves a device counter one iteration on and copies that row into the learning-rate
    tensors the optimizer reads, so the LR update needs no host value and can be captured with the
    step. Beyond the table the last value holds (the schedules of `lr_factor` are constant there).
    """

    def __init__(self, scheduler: torch.optim.lr_scheduler.LambdaLR, device: torch.device, iterations: int):
        rows = [scheduled_lrs(scheduler, i) for i in range(max(iterations, scheduler.last_epoch) + 1)]
        self.table = torch.tensor(rows, dtype=torch.float32, device=device)  # (iterations + 1, groups)
        self.last = len(rows) - 1
        self.iteration = torch.tensor(scheduler.last_epoch, dtype=torch.int64, device=device)
        self.lrs = [self.table[scheduler.last_epoch, g].clone() for g in range(self.table.shape[1])]
        for group, lr in zip(scheduler.optimizer.param_groups, self.lrs):
            group["lr"] = lr

    def advance(self) -> None:
        self.iteration += 1
        row = self.table.index_select(0, self.iteration.clamp(max=self.last).view(1))[0]
        for g, lr in enumerate(self.lrs):
            lr.copy_(row[g])

    def sync(self, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
        """Bring the host scheduler (checkpoints, logs) to the device's iteration."""
        set_iteration(scheduler, int(self.iteration))


def _flatten(inputs: tuple) -> list[torch.Tensor]:
    """(images, y, index, params) -> a flat list of tensors, the parameters in sorted key order."""
    *tensors, params = inputs
    return [*tensors, *(params[k] for k in sorted(params))]


def _unflatten(flat: list[torch.Tensor], keys: list[str]) -> tuple:
    head = len(flat) - len(keys)
    return (*flat[:head], dict(zip(keys, flat[head:])))


def _signature(inputs: tuple) -> tuple:
    return tuple((t.shape, t.dtype, t.stride()) for t in _flatten(inputs)) + (tuple(sorted(inputs[-1])),)


class _Graph:
    """The update recorded as one CUDA graph for one input signature; a call copies its inputs
    into the graph's static input tensors and replays it, returning the graph's static outputs."""

    def __init__(self, update, inputs: tuple, stream: torch.cuda.Stream):
        self.keys = sorted(inputs[-1])
        self.static = [t.clone() for t in _flatten(inputs)]  # clone keeps the layout (channels_last)
        self.graph = torch.cuda.CUDAGraph()
        stream.wait_stream(torch.cuda.current_stream())
        # thread_local: a DataLoader's pin-memory thread may call into CUDA during the capture.
        with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
            self.parts = update(*_unflatten(self.static, self.keys))
        torch.cuda.current_stream().wait_stream(stream)

    def __call__(self, inputs: tuple) -> dict:
        for static, tensor in zip(self.static, _flatten(inputs)):
            static.copy_(tensor)
        self.graph.replay()
        return self.parts


class WholeStep:
    """forward -> backward -> optimizer step -> LR update as one callable on (images, y, index, params).

    On CUDA, the first `WARMUP_CALLS` calls of each input signature (shape, dtype, layout) run
    eagerly on a side stream (compilation, cuDNN autotuning, momentum buffers: whatever is set up
    lazily), the next one records the update as a CUDA graph (`_Graph`, the PyTorch recipe for
    whole-network capture), and every later call replays it. Warm-up calls are real training steps
    with the same numerics. Elsewhere every call runs eagerly. The optimizer must not synchronise
    with the host in its step (no GradScaler) and its learning rates become `DeviceLR` tensors at
    the first call.

    A recorded graph freezes which tensors the step reads: after anything may have replaced one (a
    loss's per-epoch weights assigned anew) `drop_graphs()`, after a resumed optimizer state `reset()`.
    """

    WARMUP_CALLS = 2

    def __init__(self, forward, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                 device: torch.device, iterations: int):
        self.forward = forward
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.iterations = iterations
        self.lr: DeviceLR | None = None
        self.graphs: dict[tuple, _Graph] = {}
        self.eager_calls: collections.Counter = collections.Counter()
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def captured(self) -> int:
        """How many CUDA graphs are recorded (one per batch shape seen after its warm-up)."""
        return len(self.graphs)

    def update(self, images: torch.Tensor, y: torch.Tensor, index: torch.Tensor, params: dict) -> dict:
        """One step, uncaptured: what a replay does."""
        self.optimizer.zero_grad(set_to_none=True)  # inside a capture: the gradients come from the graph's pool
        parts = self.forward(images, y, index, params)
        parts["loss"].backward()
        self.optimizer.step()
        self.lr.advance()
        return parts

    def __call__(self, images: torch.Tensor, y: torch.Tensor, index: torch.Tensor, params: dict) -> dict:
        inputs = (images, y, index, params)
        if self.lr is None:
            self.lr = DeviceLR(self.scheduler, self.device, self.iterations)
        if self.stream is None:
            return self.update(*inputs)
        key = _signature(inputs)
        graph = self.graphs.get(key)
        if graph is None:
            if self.eager_calls[key] < self.WARMUP_CALLS:
                self.eager_calls[key] += 1
                return self._on_side_stream(inputs)
            graph = self.graphs[key] = _Graph(self.update, inputs, self.stream)
        return graph(inputs)

    def _on_side_stream(self, inputs: tuple) -> dict:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            parts = self.update(*inputs)
        torch.cuda.current_stream().wait_stream(self.stream)
        return parts

    def sync(self) -> None:
        """Bring the host scheduler to the device's iteration (before checkpoints and logs)."""
        if self.lr is not None:
            self.lr.sync(self.scheduler)

    def drop_graphs(self) -> None:
        """Forget the recorded graphs (a tensor the step reads was replaced); the next calls of each
        signature warm up and record again."""
        self.graphs.clear()
        self.eager_calls.clear()

    def reset(self) -> None:
        """Also rebuild the device learning rates from the scheduler at the next call (after the
        optimizer and scheduler state were loaded anew)."""
        self.drop_graphs()
        self.lr = None
