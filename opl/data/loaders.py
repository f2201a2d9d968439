"""Batches for the trainer: in-memory data resident on the device, or a DataLoader for datasets
whose items are decoded by workers.

Both paths yield `(images, labels, index)` on the target device: images normalised float
(channels_last when asked), and each sample's position in its split (for per-sample state such as
the truncated loss's weights). Both finish the batch with the same `BatchAugment` on the device
(crop / flip / jitter as `DataSpec.augment` asks, then normalisation), on a GPU or on the CPU.

Randomness is a function of (seed, epoch, rank): `set_epoch(e)` before each epoch re-seeds the
shuffle (shared by all ranks) and the augmentation (per rank), so a resumed run sees the same
batches as an uninterrupted one without any loader state in the checkpoint, whatever the world
size. Under data-parallel training each rank takes every world-th sample of the epoch's order:
training pads the order to a multiple of the world size (as DistributedSampler does, so every rank
runs the same number of steps), evaluation does not (every sample is seen exactly once).
"""

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from opl.data.augment import BatchAugment, append_mirrored
from opl.data.base import DataSpec, ImageTensors, Split


def finish(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, augment: BatchAugment, train: bool,
           generator: torch.Generator, memory_format: torch.memory_format) -> tuple:
    """uint8 batch on the device -> (normalised float batch, labels, indices), augmented when training."""
    x = augment(x, train, generator)
    if train and augment.spec.mirror_batch:
        x, y, index = append_mirrored(x, y, index)
    return x.contiguous(memory_format=memory_format), y, index


def epoch_seed(seed: int, epoch: int, stream: int, workers: bool = False) -> int:
    """A well-mixed 63-bit seed for one epoch of one random stream (-1: shared by all ranks; r >= 0:
    rank r's on-device augmentation, or with `workers` its DataLoader workers' base seeds)."""
    entropy = [seed, epoch, stream + 1] + ([1] if workers else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def shard(order: torch.Tensor, rank: int, world: int, pad: bool) -> torch.Tensor:
    """This rank's share of an epoch's sample order: every world-th entry from `rank`."""
    if world == 1:
        return order
    if pad and len(order) % world:
        order = torch.cat([order, order[:world - len(order) % world]])
    return order[rank::world]


def batch_count(n: int, batch_size: int, drop_last: bool, min_batch: int) -> int:
    """Full batches, plus the last partial one when it is kept and holds at least `min_batch` samples."""
    full, rest = divmod(n, batch_size)
    return full + (0 if drop_last or rest < max(1, min_batch) else 1)


class DeviceTensorLoader:
    """The whole split lives on `device` as uint8; shuffling and augmentation run there per batch."""

    def __init__(self, data: ImageTensors, batch_size: int, device: torch.device, augment: BatchAugment,
                 train: bool, seed: int = 0, channels_last: bool = False, drop_last: bool = False,
                 min_batch: int = 1, rank: int = 0, world: int = 1):
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.batch_size = batch_size
        self.train = train
        self.seed, self.rank, self.world, self.epoch = seed, rank, world, 0
        n = len(self.labels)
        per_rank = -(-n // world) if train else len(range(rank, n, world))
        self.steps = batch_count(per_rank, batch_size, drop_last and train, min_batch if train else 1)
        self.augment = augment.to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = torch.Generator(device=device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        n, device = len(self.labels), self.images.device
        if self.train:
            self.generator.manual_seed(epoch_seed(self.seed, self.epoch, -1))
            order = torch.randperm(n, device=device, generator=self.generator)
            self.generator.manual_seed(epoch_seed(self.seed, self.epoch, self.rank))
        else:
            order = torch.arange(n, device=device)
        order = shard(order, self.rank, self.world, pad=self.train)
        for i in range(self.steps):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield finish(self.images[idx], self.labels[idx], idx, self.augment, self.train, self.generator, self.memory_format)


class TensorItems(Dataset):
    """An in-memory split served item by item (uint8 (C, H, W), label), for the DataLoader path."""

    def __init__(self, data: ImageTensors):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data.images[i], self.data.labels[i]


class IndexedDataset(Dataset):
    """`(x, label)` samples of any map-style dataset, with their index appended."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, y, i


class ShardSampler(Sampler):
    """Every world-th index from `rank`, in order, no padding: an evaluation split seen once."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = range(rank, n, world)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


class DeviceDataLoader:
    """A DataLoader of uint8 items whose batches go to `device` (non-blocking from pinned memory)
    and are augmented and normalised there."""

    def __init__(self, dataset: Dataset, batch_size: int, device: torch.device, augment: BatchAugment, train: bool,
                 num_workers: int = 0, seed: int = 0, channels_last: bool = False, drop_last: bool = False,
                 min_batch: int = 1, rank: int = 0, world: int = 1):
        self.device = device
        self.train = train
        self.seed, self.rank, self.world, self.epoch = seed, rank, world, 0
        self.augment = augment.to(device)
        self.generator = torch.Generator()  # the workers' base seeds (per rank: their crops and jitter differ)
        self.device_generator = torch.Generator(device=device)  # the on-device augmentation
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        items = IndexedDataset(dataset)
        # Shuffled with DistributedSampler's own scheme (seed + epoch; padded to equal shares).
        self.sampler = (DistributedSampler(items, num_replicas=world, rank=rank, shuffle=True, seed=seed)
                        if train else ShardSampler(len(items), rank, world))
        self.steps = batch_count(len(self.sampler), batch_size, drop_last and train, min_batch if train else 1)
        self.loader = DataLoader(items, batch_size=batch_size, sampler=self.sampler, drop_last=train and drop_last,
                                 num_workers=num_workers, pin_memory=device.type == "cuda", generator=self.generator,
                                 persistent_workers=False)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.train:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch, self.rank, workers=True))
        self.device_generator.manual_seed(epoch_seed(self.seed, self.epoch, self.rank))
        if self.loader.num_workers == 0 and self.world > 1:
            # No workers: the dataset's random transforms draw from this process's generator, seeded
            # alike on every rank; seed it as a worker's would be, so the ranks' crops differ too.
            torch.manual_seed(epoch_seed(self.seed, self.epoch, self.rank, workers=True))
        for step, (x, y, idx) in enumerate(self.loader):
            if step == self.steps:  # a last partial batch too small to keep (see batch_count)
                break
            if x.dtype != torch.uint8:
                raise TypeError(f"dataset items must be uint8 image tensors, got {x.dtype}")
            yield finish(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                         idx.to(self.device, non_blocking=True), self.augment, self.train, self.device_generator,
                         self.memory_format)


def build_loader(data: DataSpec, split: Split, train: bool, batch_size: int, device: torch.device, kind: str = "auto",
                 num_workers: int = 0, seed: int = 0, channels_last: bool = False, drop_last: bool = False,
                 min_batch: int = 1, rank: int = 0, world: int = 1):
    """kind: "device" (in-memory data resident on `device`), "dataloader" (worker processes feed the
    device, e.g. data too large for device memory), or "auto" (device for in-memory data)."""
    if kind not in ("auto", "device", "dataloader"):
        raise ValueError(f"loader must be auto, device or dataloader, got {kind!r}")
    in_memory = isinstance(split, ImageTensors)
    if kind == "auto":
        kind = "device" if in_memory else "dataloader"
    augment = BatchAugment(data.augment, data.mean, data.std)
    options = dict(seed=seed, channels_last=channels_last, drop_last=drop_last, min_batch=min_batch, rank=rank, world=world)
    if kind == "device":
        if not in_memory:
            raise ValueError(f"{data.name} is not held in memory; use trainer.loader=dataloader")
        return DeviceTensorLoader(split, batch_size, device, augment, train, **options)
    dataset = TensorItems(split) if in_memory else split
    return DeviceDataLoader(dataset, batch_size, device, augment, train, num_workers, **options)
