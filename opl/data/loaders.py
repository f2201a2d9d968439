"""Batches for the trainer: in-memory data resident on the device, or a DataLoader for datasets
whose items are decoded by workers.

Both paths yield `(images, labels, index)` on the target device: images normalised float
(channels_last when asked), and each sample's position in its split (for per-sample state such as
the truncated loss's weights). Both finish the batch with the same `BatchAugment` on the device
(crop / flip / jitter as `DataSpec.augment` asks, then normalisation), on a GPU or on the CPU. Both
own seeded generators whose states are checkpointed, so a resumed run sees the same batches as an
uninterrupted one.
"""

import torch
from torch.utils.data import DataLoader, Dataset

from opl.data.augment import BatchAugment, append_mirrored
from opl.data.base import DataSpec, ImageTensors, Split


def finish(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, augment: BatchAugment, train: bool,
           generator: torch.Generator, memory_format: torch.memory_format) -> tuple:
    """uint8 batch on the device -> (normalised float batch, labels, indices), augmented when training."""
    x = augment(x, train, generator)
    if train and augment.spec.mirror_batch:
        x, y, index = append_mirrored(x, y, index)
    return x.contiguous(memory_format=memory_format), y, index


def batch_count(n: int, batch_size: int, drop_last: bool, min_batch: int) -> int:
    """Full batches, plus the last partial one when it is kept and holds at least `min_batch` samples."""
    full, rest = divmod(n, batch_size)
    return full + (0 if drop_last or rest < max(1, min_batch) else 1)


class DeviceTensorLoader:
    """The whole split lives on `device` as uint8; shuffling and augmentation run there per batch."""

    def __init__(self, data: ImageTensors, batch_size: int, device: torch.device, augment: BatchAugment,
                 train: bool, seed: int = 0, channels_last: bool = False, drop_last: bool = False,
                 min_batch: int = 1):
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.batch_size = batch_size
        self.train = train
        self.steps = batch_count(len(self.labels), batch_size, drop_last and train, min_batch if train else 1)
        self.augment = augment.to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        n = len(self.labels)
        order = (torch.randperm(n, device=self.images.device, generator=self.generator) if self.train
                 else torch.arange(n, device=self.images.device))
        for i in range(self.steps):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield finish(self.images[idx], self.labels[idx], idx, self.augment, self.train, self.generator, self.memory_format)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


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


class DeviceDataLoader:
    """A DataLoader of uint8 items whose batches go to `device` (non-blocking from pinned memory)
    and are augmented and normalised there."""

    def __init__(self, dataset: Dataset, batch_size: int, device: torch.device, augment: BatchAugment, train: bool,
                 num_workers: int = 0, seed: int = 0, channels_last: bool = False, drop_last: bool = False,
                 min_batch: int = 1):
        self.device = device
        self.train = train
        self.augment = augment.to(device)
        self.generator = torch.Generator()  # shuffling and the workers' base seeds
        self.generator.manual_seed(seed)
        self.device_generator = torch.Generator(device=device)  # the on-device augmentation
        self.device_generator.manual_seed(seed)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.steps = batch_count(len(dataset), batch_size, drop_last and train, min_batch if train else 1)
        self.loader = DataLoader(
            IndexedDataset(dataset), batch_size=batch_size, shuffle=train, drop_last=train and drop_last,
            num_workers=num_workers, pin_memory=device.type == "cuda", generator=self.generator,
            persistent_workers=False,
        )

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for step, (x, y, idx) in enumerate(self.loader):
            if step == self.steps:  # a last partial batch too small to keep (see batch_count)
                break
            if x.dtype != torch.uint8:
                raise TypeError(f"dataset items must be uint8 image tensors, got {x.dtype}")
            yield finish(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                         idx.to(self.device, non_blocking=True), self.augment, self.train, self.device_generator,
                         self.memory_format)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "device_generator": self.device_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.device_generator.set_state(state["device_generator"])


def build_loader(data: DataSpec, split: Split, train: bool, batch_size: int, device: torch.device, kind: str = "auto",
                 num_workers: int = 0, seed: int = 0, channels_last: bool = False, drop_last: bool = False,
                 min_batch: int = 1):
    """kind: "device" (in-memory data resident on `device`), "dataloader" (worker processes feed the
    device, e.g. data too large for device memory), or "auto" (device for in-memory data)."""
    if kind not in ("auto", "device", "dataloader"):
        raise ValueError(f"loader must be auto, device or dataloader, got {kind!r}")
    in_memory = isinstance(split, ImageTensors)
    if kind == "auto":
        kind = "device" if in_memory else "dataloader"
    augment = BatchAugment(data.augment, data.mean, data.std)
    options = dict(seed=seed, channels_last=channels_last, drop_last=drop_last, min_batch=min_batch)
    if kind == "device":
        if not in_memory:
            raise ValueError(f"{data.name} is not held in memory; use trainer.loader=dataloader")
        return DeviceTensorLoader(split, batch_size, device, augment, train, **options)
    dataset = TensorItems(split) if in_memory else split
    return DeviceDataLoader(dataset, batch_size, device, augment, train, num_workers, **options)
