"""Batches for the trainer: a GPU-resident path for in-memory data and a DataLoader path.

Both yield `(images, labels, index)` on the target device: images normalised float (channels_last
when asked), and each sample's position in its split (for per-sample state such as the truncated
loss's weights). Both own a seeded generator whose state is checkpointed, so a resumed run sees the
same batches as an uninterrupted one.
"""

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from opl.data.augment import BatchAugment, pil_transforms
from opl.data.base import AugmentSpec, DataSpec, ImageTensors, Split


class DeviceTensorLoader:
    """The whole split lives on `device` as uint8; shuffling and augmentation run there per batch."""

    def __init__(self, data: ImageTensors, batch_size: int, device: torch.device, augment: BatchAugment,
                 train: bool, seed: int = 0, channels_last: bool = False):
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.batch_size = batch_size
        self.train = train
        self.augment = augment.to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        order = (torch.randperm(n, device=self.images.device, generator=self.generator) if self.train
                 else torch.arange(n, device=self.images.device))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.augment(self.images[idx], self.train, self.generator)
            yield x.contiguous(memory_format=self.memory_format), self.labels[idx], idx

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class TensorImageDataset(Dataset):
    """In-memory uint8 images served as PIL images through torchvision transforms."""

    def __init__(self, data: ImageTensors, transform):
        self.images = data.images.permute(0, 2, 3, 1).numpy()  # NHWC for PIL
        self.labels = data.labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        array = self.images[i]
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        return self.transform(image), self.labels[i]


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
    """A DataLoader whose batches are moved to `device` (non-blocking from pinned memory)."""

    def __init__(self, dataset: Dataset, batch_size: int, device: torch.device, train: bool,
                 num_workers: int = 0, seed: int = 0, channels_last: bool = False):
        self.device = device
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.loader = DataLoader(
            IndexedDataset(dataset), batch_size=batch_size, shuffle=train, drop_last=train, num_workers=num_workers,
            pin_memory=device.type == "cuda", generator=self.generator, persistent_workers=False,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y, idx in self.loader:
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield x, y.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def build_loader(data: DataSpec, split: Split, train: bool, batch_size: int, device: torch.device, kind: str,
                 num_workers: int = 0, seed: int = 0, channels_last: bool = False):
    """kind: "device" (in-memory data resident on `device`), "dataloader", or "auto" (device on CUDA)."""
    if kind not in ("auto", "device", "dataloader"):
        raise ValueError(f"loader must be auto, device or dataloader, got {kind!r}")
    in_memory = isinstance(split, ImageTensors)
    if kind == "auto":
        kind = "device" if in_memory and device.type == "cuda" else "dataloader"
    if kind == "device":
        if not in_memory:
            raise ValueError(f"{data.name} is not held in memory; use trainer.loader=dataloader")
        augment = BatchAugment(data.augment, data.mean, data.std)
        return DeviceTensorLoader(split, batch_size, device, augment, train, seed, channels_last)
    dataset = split
    if in_memory:
        spec = data.augment if train else AugmentSpec()
        dataset = TensorImageDataset(split, pil_transforms(spec, data.mean, data.std, train, split.images.shape[-1]))
    return DeviceDataLoader(dataset, batch_size, device, train, num_workers, seed, channels_last)
