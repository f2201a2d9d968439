"""Steady-state training throughput at the paper's CIFAR-100 (or ImageNet) recipe: this repository vs a
loop like the authors' (or torchvision's reference script).

What is measured
----------------
Images per second of the training step (data -> augmentation -> forward -> loss -> backward ->
optimizer -> LR schedule) at the CIFAR-100 recipe of `configs/experiment/cifar100_{ce,opl}.yaml`
(CIFAR ResNet-56, 100 classes, batch 128, SGD lr 0.1 / momentum 0.9 / weight decay 5e-4,
per-iteration warm-up + multistep schedule, random crop (pad 4) + flip + ColorJitter 0.4/0.4/0.4 +
CIFAR-100 mean/std), for three configurations run one after the other in this one process:

  a  "ours"       the repository's own trainer: `Trainer(...).train_steps`, the code
                  `train.py experiment=cifar100_opl` runs, with CE + OPL (lambda 1, gamma 0.5).
                  Trainer settings as a user gets them (amp/compile/loader "auto": bf16,
                  torch.compile "reduce-overhead" with CUDA graphs, GPU-resident uint8 data with
                  on-GPU augmentation, fused SGD on CUDA; channels_last), no evaluation.
  b  "ours_ce"    the same with plain cross-entropy (`experiment=cifar100_ce`).
  a@MODE          with `--capture step_only,with_augment,whole_step`: "ours" again under each further
                  trainer.capture mode (opl/engine/capture.py), after a, b and c in this process, so
                  the modes are compared side by side ("ours" runs the first mode listed). A further
                  mode that fails is reported with its error instead of ending the benchmark.
  c  "reference"  a loop like the authors' CIFAR code: fp32, eager, contiguous memory format,
                  torchvision PIL transforms in a `DataLoader` (4 workers, shuffle, pinned memory
                  on CUDA), `x.to(device)`, forward, CE + the repository's OPL module, zero_grad,
                  backward, SGD step (PyTorch's default implementation, not fused), per-iteration
                  LR scheduler step and one `loss.item()` per step (the authors log the loss
                  several times per iteration). cuDNN autotuning off, as in the authors'
                  train.py/utils.py (`--ref-cudnn-benchmark` turns it on). The authors' loader
                  does not pin memory; pinning here can only make the reference faster.

The data are a synthetic in-memory set of random uint8 32x32x3 images with 100 classes (pixel
content does not change the cost of any step), or the real CIFAR-100 training split (45,000 images,
the authors' split) with `--cifar-root DIR` (the folder holding `cifar-100-python/`).

Each configuration first runs `--warmup-steps` steps (compilation, CUDA-graph capture, cuDNN
autotuning, DataLoader worker start-up), timed and reported as `warmup_s` but excluded from the
throughput, then `--steps` timed steps with `torch.cuda.synchronize()` at both ends. The batch
stream continues from warm-up into the timed steps (workers already running), and runs over as
many epochs of the training set as needed; with the default 45,000 images, warm-up + timed steps
(250 x 128) stay inside one epoch. At a larger batch they would not (45,000 = 87 x 512 + 456: the
smaller last batch compiles new graphs among the steps, and the script warns); keep them in one
epoch with `--images`, e.g. `--batch-size 512 --images 65536 --steps 100 --warmup-steps 20`. Trainer
construction (model and data to the device) is reported separately as `setup_s`.

How to read the result
----------------------
  configs.<name>.images_per_s   steady-state training throughput of that configuration
  speedup_vs_reference          a / c: how many times faster the repository trains than the
                                authors' loop on the same machine (> 1: faster)
  opl_overhead                  1 - a / b: the relative slowdown that adding OPL to CE costs in
                                the repository's step (0.05 = 5 % fewer images/s; about 0 or
                                negative = within noise)
  capture_comparison            with several --capture modes: images/s of each, the fastest, and
                                each mode's throughput relative to the first one
  estimate_full_run             200 epochs x 45,000 images at the throughput of a, plus its
                                warm-up once. An ESTIMATE of training time only: per-epoch
                                evaluation (test + validation, feature geometry), checkpointing
                                and epoch-boundary costs are excluded.

ImageNet mode (`--recipe imagenet`)
---------------------------------
The same three configurations at the ImageNet recipe of `configs/experiment/imagenet_*_{ce,opl}.yaml`
(timm ResNet-18/50/50-D via `--model`, default resnet50; 1,000 classes; 224 px; CE + OPL lambda 0.1,
gamma 2; batch `--batch-size` per device, default 256 as the authors' 4 GPUs x 256), where c is a
loop like the torchvision reference script (references/classification/train.py: fp32, eager,
RandomResizedCrop(224) + flip + ToTensor + Normalize on PIL images in a DataLoader). The data are a
synthetic in-memory set of `--images` (default 2,048) random uint8 224x224 images: a and b then
measure the GPU step alone (flip and normalisation on the device, no decoding). With
`--data-root DIR` (a class-folder tree with a `train/` split, e.g. ImageNet) every configuration
reads JPEGs from disk through DataLoader workers (`--workers`, `--ref-workers`), and the data path
alone (decode + crop to uint8, the workers' job) is measured too as `data_path`, so the result says
which of the two bounds the step. `estimate_full_run` is then 90 epochs x 1,281,167 images.

The H100 measurement (all defaults: auto device, ResNet-56, batch 128, 50 warm-up + 200 timed
steps, 4 reference workers, 45,000 synthetic images), from the repository root:

    python scripts/benchmark.py --out runs/benchmark/h100.json

A CPU smoke run (about 10 s on 2 cores, most of it imports and first-step set-up; CPU figures
say nothing about GPU speed):

    python scripts/benchmark.py --device cpu --model resnet20 --batch-size 16 --steps 3 \
        --warmup-steps 1 --ref-workers 0 --workers 0 --images 128

JSON goes to stdout (and atomically to `--out`); everything else the libraries print goes to
stderr.
"""

import argparse
import contextlib
import gc
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
for folder in (REPO_ROOT, REPO_ROOT / "scripts"):  # the library, and bench_data beside this script
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Subset  # noqa: E402

from bench_data import measure as measure_data_path  # noqa: E402
from opl.data.augment import pil_transforms  # noqa: E402
from opl.data.base import AugmentSpec, DataSpec, ImageTensors  # noqa: E402
from opl.data.folder_index import list_split  # noqa: E402
from opl.data.folders import FolderImages, folder_transform  # noqa: E402
from opl.engine.capture import CAPTURE_MODES  # noqa: E402
from opl.engine.schedule import build_scheduler  # noqa: E402
from opl.engine.trainer import Trainer, TrainerConfig  # noqa: E402
from opl.errors import ConfigError, OPLError  # noqa: E402
from opl.io import atomic_write_text  # noqa: E402
from opl.runinfo import code_version, environment, resolve_device  # noqa: E402
from train import instantiate_checked, instantiate_with  # noqa: E402

CONFIGS = {"a": "ours", "b": "ours_ce", "c": "reference"}
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    experiments: dict  # configuration id -> experiment (composed with model=<--model>)
    models: tuple
    model: str  # default --model
    batch_size: int  # default --batch-size
    image_size: int
    images: int  # default synthetic set size
    epoch_images: int  # training images of one epoch of the paper's run
    epochs: int


RECIPES = {
    # CIFAR-100 train minus the authors' 10% validation split; 200 epochs.
    "cifar100": Recipe({"a": "cifar100_opl", "b": "cifar100_ce", "c": "cifar100_opl"},
                       ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110"), "resnet56", 128, 32,
                       45_000, 45_000, 200),
    # ImageNet-1k train, 90 epochs; batch 256 per device as the authors' 4 GPUs x 256.
    "imagenet": Recipe({"a": "imagenet_r18_opl", "b": "imagenet_r18_ce", "c": "imagenet_r18_opl"},
                       ("resnet18", "resnet50", "resnet50d"), "resnet50", 256, 224, 2_048, 1_281_167, 90),
}


# ------------------------------------------------------------------------------------ arguments
def _device_arg(value: str) -> str:
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {value!r}")


def _configs_arg(value: str) -> list[str]:
    names = {v: k for k, v in CONFIGS.items()}
    chosen = []
    for item in (s.strip() for s in value.split(",")):
        key = names.get(item, item)
        if key not in CONFIGS:
            raise argparse.ArgumentTypeError(
                f"unknown configuration {item!r}; choose from a (ours), b (ours_ce), c (reference)")
        if key not in chosen:
            chosen.append(key)
    if not chosen:
        raise argparse.ArgumentTypeError("at least one configuration is needed")
    return sorted(chosen)


def _capture_arg(value: str) -> list[str]:
    modes = []
    for item in (s.strip() for s in value.split(",")):
        if item not in CAPTURE_MODES:
            raise argparse.ArgumentTypeError(f"unknown capture mode {item!r}; choose from {', '.join(CAPTURE_MODES)}")
        if item not in modes:
            modes.append(item)
    if not modes:
        raise argparse.ArgumentTypeError("at least one capture mode is needed")
    return modes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmark.py", description="Steady-state training throughput: ours (a), ours with CE only (b), "
        "the authors' loop (c). See the module docstring for how to read the ratios.")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="cifar100",
                   help="cifar100 (default) or imagenet (see the module docstring)")
    p.add_argument("--device", type=_device_arg, default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--model", default=None,
                   help="cifar100: resnet20|32|44|56|110 (default resnet56); imagenet: resnet18|50|50d (default resnet50)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="training batch per device (default the recipe's: 128 cifar100, 256 imagenet)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per configuration (default 200)")
    p.add_argument("--warmup-steps", type=int, default=50,
                   help="untimed-for-throughput warm-up steps per configuration, reported as warmup_s (default 50)")
    p.add_argument("--images", type=int, default=None,
                   help="training images: synthetic set size (default 45,000 cifar100, 2,048 imagenet), or a seeded "
                        "subset of the real split with --cifar-root; the stream runs over more epochs if needed")
    p.add_argument("--configs", type=_configs_arg, default=["a", "b", "c"],
                   help="comma-separated subset of a,b,c (or ours,ours_ce,reference); default all")
    p.add_argument("--ref-workers", type=int, default=4, help="DataLoader workers of the reference loop (default 4)")
    p.add_argument("--ref-cudnn-benchmark", action="store_true",
                   help="turn cuDNN autotuning on in the reference loop (the authors' code leaves it off)")
    p.add_argument("--workers", type=int, default=4,
                   help="trainer.num_workers for a/b, used only where the trainer's loader is a DataLoader "
                        "(e.g. on CPU); default 4 as in configs/trainer/default.yaml")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="override trainer.compile for a/b (default auto: on for CUDA, off for CPU)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                   help="trainer.amp for a/b (default auto: bf16 on CUDA, none on CPU)")
    p.add_argument("--capture", type=_capture_arg, default=["step_only"],
                   help="comma-separated trainer.capture modes: a runs under each (the first is 'ours', the others "
                        "'ours@MODE'), b under the first; default step_only")
    p.add_argument("--loader", choices=("auto", "device", "dataloader"), default="auto",
                   help="trainer.loader for a/b (default auto: GPU-resident data on CUDA, DataLoader on CPU)")
    p.add_argument("--cifar-root", default=None,
                   help="cifar100: real CIFAR-100 from DIR/cifar-100-python/ (no download) instead of synthetic images")
    p.add_argument("--data-root", default=None,
                   help="imagenet: a class-folder tree DIR/train/<class>/<image> read from disk instead of synthetic images")
    p.add_argument("--seed", type=int, default=0, help="seed of model init, synthetic data and shuffling")
    p.add_argument("--out", default=None, help="also write the JSON result to this path (atomically)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    recipe = RECIPES[args.recipe]
    args.model = args.model or recipe.model
    if args.model not in recipe.models:
        parser.error(f"--model {args.model} is not a model of --recipe {args.recipe}: choose from {', '.join(recipe.models)}")
    args.batch_size = args.batch_size if args.batch_size is not None else recipe.batch_size
    if (args.cifar_root and args.recipe != "cifar100") or (args.data_root and args.recipe != "imagenet"):
        parser.error("--cifar-root goes with --recipe cifar100, --data-root with --recipe imagenet")
    if args.data_root is not None and not all(any((Path(args.data_root).expanduser() / name).is_dir() for name in names)
                                              for names in (("train",), ("val", "test"))):
        parser.error(f"--data-root {args.data_root} needs train/ and val/ (or test/) folders of class folders")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.batch_size < 2 and ("a" in args.configs or "c" in args.configs):
        parser.error(f"--batch-size must be >= 2 for configurations with OPL (a, c): OPL compares pairs of "
                     f"samples within a batch, got {args.batch_size}")
    if args.images is not None and args.images < args.batch_size:
        parser.error(f"--images ({args.images}) must hold at least one batch (--batch-size {args.batch_size})")
    if args.ref_workers < 0 or args.workers < 0:
        parser.error("--ref-workers and --workers must be >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} but no CUDA device is available; use --device cpu or auto")
    if args.cifar_root is not None and not Path(args.cifar_root).expanduser().is_dir():
        parser.error(f"--cifar-root {args.cifar_root} is not a folder")
    return args


# ------------------------------------------------------------------------------------ recipe and data
def folder_overrides(args) -> list[str]:
    """--data-root: the experiment's folder dataset on that tree (its own classes; train split only)."""
    if args.data_root is None:
        return []
    root = Path(args.data_root).expanduser()
    classes = sum(1 for p in (root / "train").iterdir() if p.is_dir())
    held_out = "val" if (root / "val").is_dir() else "test"  # listed for the dataset, never evaluated here
    return [f"dataset.root={root}", "dataset.classes=null", f"dataset.num_classes={classes}",
            f"dataset.test_split={held_out}"]


def recipe_config(experiment: str, args):
    """The configuration `python train.py experiment=<experiment> model=<--model> [data overrides]` composes."""
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=[f"experiment={experiment}", f"model={args.model}",
                                                       *folder_overrides(args)])


def synthetic_images(n_train: int, num_classes: int, size: int, seed: int) -> tuple[ImageTensors, ImageTensors]:
    g = torch.Generator().manual_seed(seed)
    def split(n):
        return ImageTensors(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                            torch.randint(0, num_classes, (n,), generator=g))
    return split(n_train), split(min(n_train, 256))  # the test split is never evaluated here


def build_data(cfg, args) -> DataSpec:
    ds, recipe = cfg.dataset, RECIPES[args.recipe]
    if args.cifar_root is not None:  # the experiment's own split: 45,000 train / 5,000 validation
        return instantiate_checked(ds, root=str(Path(args.cifar_root).expanduser()), download=False,
                                   limit_train=args.images, limit_test=256)
    if args.data_root is not None:
        return instantiate_checked(ds, limit_train=args.images, limit_test=256)
    train, test = synthetic_images(args.images or recipe.images, ds.num_classes, recipe.image_size, args.seed)
    return DataSpec(name=f"synthetic-{args.recipe}", variant=f"synthetic/uint8-uniform@{args.seed}",
                    num_classes=ds.num_classes, train=train, test=test, val=None,
                    mean=tuple(ds.mean), std=tuple(ds.std),
                    augment=AugmentSpec(**OmegaConf.to_container(ds.augment)))


def reference_dataset(args, data: DataSpec) -> Dataset:
    """c's training set: PIL images through the reference's torchvision transforms."""
    from torchvision import datasets
    from torchvision import transforms as T

    if args.recipe == "cifar100":
        train = data.train
        return PILImages(train, pil_transforms(data.augment, data.mean, data.std, True, train.images.shape[-1]))
    # torchvision references/classification/presets.py ClassificationPresetTrain (bilinear).
    transform = T.Compose([T.RandomResizedCrop(RECIPES["imagenet"].image_size), T.RandomHorizontalFlip(),
                           T.ToTensor(), T.Normalize(data.mean, data.std)])
    if args.data_root is None:
        return PILImages(data.train, transform)
    folder = datasets.ImageFolder(str(Path(args.data_root).expanduser() / "train"), transform)
    return Subset(folder, data.train.indices if isinstance(data.train, Subset) else range(len(folder)))


def data_path(args) -> dict | None:
    """--data-root: images/s of the workers' job alone (decode + RandomResizedCrop to uint8)."""
    if args.data_root is None:
        return None
    index = list_split(Path(args.data_root).expanduser() / "train")
    wanted = min(len(index), 64 * 20)
    subset = np.sort(np.random.default_rng(args.seed).choice(len(index), wanted, replace=False)).tolist()
    images = FolderImages(index, index.class_positions(), folder_transform(True, RECIPES["imagenet"].image_size))
    warmup = min(128, wanted // 4)
    return measure_data_path(Subset(images, subset), args.workers, warmup, wanted - warmup - (64 if args.workers else 0))


def batch_stream(loader):
    """The loader's batches, epoch after epoch, as one uninterrupted stream."""
    if len(loader) == 0:
        raise ConfigError("the training loader yields no full batch; use more --images or a smaller --batch-size")
    while True:
        yield from loader


class PILImages(Dataset):
    """In-memory uint8 images served as PIL images through torchvision transforms (the authors' loader)."""

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()  # each configuration compiles from scratch, as in a fresh process
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ configurations
def run_ours(key: str, name: str, capture: str, args, data: DataSpec, run_dir: Path) -> dict:
    """a / b: the repository's Trainer under trainer.capture=`capture`, timed through its public
    `train_steps`."""
    experiment = RECIPES[args.recipe].experiments[key]
    cfg = recipe_config(experiment, args)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    trainer_cfg = replace(
        TrainerConfig(**OmegaConf.to_container(cfg.trainer, resolve=True)),
        batch_size=args.batch_size, device=args.device, amp=args.amp, loader=args.loader,
        compile="auto" if args.compile is None else args.compile, channels_last=True,
        num_workers=args.workers, progress="line", capture=capture)
    model, criterion = instantiate_checked(cfg.model), instantiate_checked(cfg.loss)
    step = instantiate_with(cfg.method, model=model, criterion=criterion, data=data)
    trainer = Trainer(trainer_cfg, step, data, instantiate_checked(cfg.optim),
                      OmegaConf.to_container(cfg.sched, resolve=True), run_dir / name, seed=args.seed)
    device = trainer.device
    _sync(device)
    setup_s = time.perf_counter() - t0
    try:
        warmup_s = 0.0
        if args.warmup_steps:
            _sync(device)
            t0 = time.perf_counter()
            trainer.train_steps(args.warmup_steps)
            _sync(device)
            warmup_s = time.perf_counter() - t0
        _sync(device)
        t0 = time.perf_counter()
        record = trainer.train_steps(args.steps)
        _sync(device)
        seconds = time.perf_counter() - t0
    finally:
        trainer.close()
    images = args.steps * args.batch_size
    step = trainer.step
    settings = {
        "experiment": experiment,
        "criterion": repr(trainer.criterion),
        "amp": trainer.amp,
        "compiled": hasattr(step, "_orig_mod"),
        "cudagraphs": trainer.cudagraphs,
        "capture": capture,
        "whole_step_graphs": trainer.whole_step.captured if trainer.whole_step is not None else None,
        "channels_last": trainer_cfg.channels_last,
        "loader": type(trainer.train_loader).__name__,
        "num_workers": trainer_cfg.num_workers if type(trainer.train_loader).__name__ == "DeviceDataLoader" else None,
        "optimizer": type(trainer.optimizer).__name__,
        "fused": bool(trainer.optimizer.defaults.get("fused")),
        "log_every": trainer_cfg.log_every,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "trainer_config": asdict(trainer_cfg),
    }
    result = {
        "id": key, "name": name,
        "images_per_s": images / seconds,
        "steps": args.steps, "images": images, "seconds": seconds,
        "warmup_steps": args.warmup_steps, "warmup_s": warmup_s, "setup_s": setup_s,
        "trainer_images_per_s": record["images_per_s"],  # the trainer's own clock, a cross-check
        "final_train_loss": record["train_loss"],
        "settings": settings,
    }
    return result


def run_reference(args, data: DataSpec, device: torch.device) -> dict:
    """c: a plain fp32 eager loop like the authors' CIFAR training code (or torchvision's reference)."""
    experiment = RECIPES[args.recipe].experiments["c"]
    cfg = recipe_config(experiment, args)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    torch.backends.cudnn.benchmark = args.ref_cudnn_benchmark
    torch.backends.cudnn.deterministic = False
    torch.use_deterministic_algorithms(False)
    model = instantiate_checked(cfg.model).to(device)
    criterion = instantiate_checked(cfg.loss)  # CE + lambda * OPL: its OPL module and lambda are used below
    opl_module, weight = criterion.opl.to(device), criterion.weight
    ce = torch.nn.CrossEntropyLoss()
    optimizer = instantiate_checked(cfg.optim)(model.parameters())  # PyTorch's default (non-fused) SGD
    dataset = reference_dataset(args, data)
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.ref_workers, pin_memory=device.type == "cuda", generator=generator)
    scheduler = build_scheduler(optimizer, len(loader), cfg.trainer.epochs,
                                **OmegaConf.to_container(cfg.sched, resolve=True))
    model.train()
    stream = batch_stream(loader)
    losses = []

    def steps(n: int) -> int:
        seen = 0
        for _ in range(n):
            images, labels = next(stream)
            images, labels = images.to(device), labels.to(device)
            features, logits = model(images)
            loss = ce(logits, labels) + weight * opl_module(features, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())  # the authors log the loss at every iteration
            seen += labels.shape[0]
        return seen

    setup_s = time.perf_counter() - t0
    try:
        warmup_s = 0.0
        if args.warmup_steps:
            _sync(device)
            t0 = time.perf_counter()
            steps(args.warmup_steps)  # includes DataLoader worker start-up
            _sync(device)
            warmup_s = time.perf_counter() - t0
        _sync(device)
        t0 = time.perf_counter()
        images = steps(args.steps)
        _sync(device)
        seconds = time.perf_counter() - t0
    finally:
        stream.close()
    result = {
        "id": "c", "name": CONFIGS["c"],
        "images_per_s": images / seconds,
        "steps": args.steps, "images": images, "seconds": seconds,
        "warmup_steps": args.warmup_steps, "warmup_s": warmup_s, "setup_s": setup_s,
        "final_train_loss": losses[-1],
        "settings": {
            "experiment": experiment, "criterion": f"CrossEntropyLoss + {weight} * {opl_module!r}",
            "amp": "none", "compiled": False, "cudagraphs": False, "channels_last": False,
            "loader": f"DataLoader({type(dataset).__name__}, torchvision PIL transforms)",
            "num_workers": args.ref_workers, "pin_memory": device.type == "cuda",
            "optimizer": type(optimizer).__name__, "fused": bool(optimizer.defaults.get("fused")),
            "foreach": optimizer.defaults.get("foreach"), "loss_item_every_step": True,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        },
    }
    return result


# ------------------------------------------------------------------------------------ main
def _ratio(num, den):
    return num / den if num is not None and den else None


def partial_batch_warning(images: int, batch: int, steps: int, drop_last: bool) -> str | None:
    """Why a/b's figures would be off when their `steps` (warm-up + timed) reach the end of an epoch
    whose last batch is smaller: that batch compiles and captures graphs of its own among the steps."""
    full, rest = divmod(images, batch)
    if drop_last or rest == 0 or steps <= full:
        return None
    return (f"warning: {steps} steps of {batch} reach the end of an epoch of {images} images, whose last batch of "
            f"{rest} compiles new graphs among the measured steps; pass --images {steps * batch} (or another "
            "multiple of the batch that holds every step) to keep them inside one epoch")


def planned_runs(args) -> list[tuple[str, str, str | None]]:
    """(configuration id, result name, capture mode) in the order they run: a, b, c, then "ours"
    under the further capture modes (last, so that a failing mode cannot disturb a, b or c)."""
    runs = [(key, CONFIGS[key], args.capture[0] if key in "ab" else None) for key in args.configs]
    if "a" in args.configs:
        runs += [("a", f"{CONFIGS['a']}@{mode}", mode) for mode in args.capture[1:]]
    return runs


def capture_comparison(configs: dict, args) -> dict | None:
    """images/s of "ours" under each capture mode, the fastest, and each relative to the first."""
    names = {mode: CONFIGS["a"] if i == 0 else f"{CONFIGS['a']}@{mode}" for i, mode in enumerate(args.capture)}
    ips = {mode: configs[name]["images_per_s"] for mode, name in names.items() if "images_per_s" in configs.get(name, {})}
    if len(ips) < 2:
        return None
    first = ips[args.capture[0]]
    return {"images_per_s": ips, "fastest": max(ips, key=ips.get),
            "relative_to_first": {mode: value / first for mode, value in ips.items()}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = datetime.now(timezone.utc)
    device = resolve_device(args.device)  # as the trainer resolves it
    # Whatever the libraries print goes to stderr; stdout carries only the JSON result.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            recipe = recipe_config(RECIPES[args.recipe].experiments["a"], args)
            data = build_data(recipe, args)
            if len(data.train) < args.batch_size:
                raise OPLError(f"the training split has {len(data.train)} images, fewer than one batch")
            warning = partial_batch_warning(len(data.train), args.batch_size, args.warmup_steps + args.steps,
                                            bool(recipe.trainer.drop_last))
            if warning and ("a" in args.configs or "b" in args.configs):
                print(warning, flush=True)  # stdout is stderr here
            configs = {}
            with tempfile.TemporaryDirectory(prefix="opl-benchmark-") as run_dir:
                for key, name, capture in planned_runs(args):
                    print(f"[benchmark] {key} ({name}) ...", flush=True)
                    try:
                        configs[name] = (run_reference(args, data, device) if key == "c"
                                         else run_ours(key, name, capture, args, data, Path(run_dir)))
                    except Exception as exc:
                        if "@" not in name:  # a, b and c are what the benchmark is for
                            raise
                        # A further capture mode under trial: its failure is a result, not the end.
                        configs[name] = {"id": key, "name": name, "error": f"{type(exc).__name__}: {exc}"}
                        print(f"[benchmark] {key} ({name}) failed: {configs[name]['error']}", flush=True)
                        _release(device)
                        continue
                    _release(device)  # the configuration's model, optimizer and loader are unreachable now
                    c = configs[name]
                    print(f"[benchmark] {key} ({name}): {c['images_per_s']:.1f} images/s over "
                          f"{c['steps']} steps, warm-up {c['warmup_s']:.2f} s", flush=True)
            print("[benchmark] data path ...", flush=True)
            data_path_result = data_path(args)
        except OPLError as exc:
            build_parser().exit(2, f"benchmark.py: error: {exc}\n")

    ips = {name: c["images_per_s"] for name, c in configs.items() if "images_per_s" in c}
    a, b, c = ips.get("ours"), ips.get("ours_ce"), ips.get("reference")
    epochs, epoch_images = RECIPES[args.recipe].epochs, RECIPES[args.recipe].epoch_images
    estimate = None
    if a is not None:
        seconds = epochs * epoch_images / a + configs["ours"]["warmup_s"]
        estimate = {
            "seconds": seconds, "hours": seconds / 3600.0, "epochs": epochs, "images_per_epoch": epoch_images,
            "basis": "ours",
            "note": (f"ESTIMATE of training time only: {epochs} epochs x {epoch_images} images "
                     "(one epoch of the paper's run) at the steady-state throughput of 'ours', plus its warm-up once; excludes per-epoch evaluation "
                     "(test + validation, feature geometry), checkpointing and epoch-boundary costs."),
        }
    env = environment(device)
    if device.type != "cuda":
        env["device_name"] += f", {torch.get_num_threads()} torch threads"
    result = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "train_throughput",
        "timestamp": started.isoformat(timespec="seconds"),
        "device": env["device_name"],
        "torch": torch.__version__,
        "environment": env,
        "code": code_version(),
        "args": vars(args),
        "data": {"name": data.name, "variant": data.variant, "train_images": len(data.train),
                 "num_classes": data.num_classes},
        "recipe": {
            "model": args.model, "batch_size": args.batch_size,
            "optimizer": OmegaConf.to_container(recipe.optim), "schedule": OmegaConf.to_container(recipe.sched),
            "epochs": recipe.trainer.epochs,
            "augment": asdict(data.augment), "mean": list(data.mean), "std": list(data.std),
        },
        "configs": configs,
        "speedup_vs_reference": _ratio(a, c),
        "opl_overhead": (1.0 - a / b) if a is not None and b else None,
        "capture_comparison": capture_comparison(configs, args),
        "estimate_full_run": estimate,
        "data_path": data_path_result,
    }
    for value in (result["speedup_vs_reference"], result["opl_overhead"]):
        assert value is None or math.isfinite(value)
    payload = json.dumps(result, indent=2, sort_keys=False, default=str) + "\n"
    if args.out:
        atomic_write_text(Path(args.out), payload)
    sys.stdout.write(payload)
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
