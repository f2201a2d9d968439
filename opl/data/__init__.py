from opl.data.augment import BatchAugment, pil_transforms
from opl.data.base import AugmentSpec, DataSpec, ImageTensors
from opl.data.loaders import DeviceDataLoader, DeviceTensorLoader, build_loader

__all__ = ["AugmentSpec", "BatchAugment", "DataSpec", "DeviceDataLoader", "DeviceTensorLoader", "ImageTensors",
           "build_loader", "pil_transforms"]
