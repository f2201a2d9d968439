"""Throughput of the folder data path alone: images/s per worker of decode + crop to uint8.

What is measured
----------------
The work one DataLoader worker does per image for dataset=imagenet / dataset=imagefolder, i.e.
`FolderImages.__getitem__` (opl/data/folders.py): read the file, decode it with PIL, convert to
RGB, then RandomResizedCrop(S) ("train") or Resize(round(S / 0.875)) + CenterCrop(S) ("eval"),
bilinear, to a uint8 (3, S, S) tensor. The flip and the normalisation run on the device and are
not part of it. A seeded random subset of `--images` files of one split folder is read
`--warmup` images first (untimed: file cache, worker start-up), then timed.

  --workers 0   in this process: the rate of one worker
  --workers W   a DataLoader with W worker processes (batch 64): total rate, and per worker = total / W

The training step of a model is bounded by the data path when `workers x per-worker rate` is
below the model's images/s; `scripts/benchmark.py` measures the latter.

Example, the CIFAR-10 JPEG test split (extract ../shared/data/cifar10-jpg.tar.gz first):

    python scripts/bench_data.py --root data/cifar10-jpg --split test --image-size 224 --images 2000

JSON goes to stdout (and atomically to `--out`); the file-index line goes to stderr.
"""

import argparse
import contextlib
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from opl.data.folder_index import list_split  # noqa: E402
from opl.data.folders import FolderImages, folder_transform  # noqa: E402
from opl.errors import OPLError  # noqa: E402
from opl.io import atomic_write_text  # noqa: E402
from opl.runinfo import code_version, cpu_name  # noqa: E402

SCHEMA_VERSION = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_data.py", description="Images/s per worker of the folder data path "
                                "(decode + crop to uint8). See the module docstring.")
    p.add_argument("--root", required=True, help="dataset root holding <split>/<class>/<image>")
    p.add_argument("--split", default="train", help="split folder under --root (default train)")
    p.add_argument("--image-size", type=int, default=224, help="crop size S (default 224)")
    p.add_argument("--modes", default="train,eval", help="comma-separated: train, eval (default both)")
    p.add_argument("--images", type=int, default=1000, help="timed images per mode (default 1000)")
    p.add_argument("--warmup", type=int, default=100, help="untimed images before each mode (default 100)")
    p.add_argument("--workers", type=int, default=0, help="0: in this process; W: DataLoader with W workers")
    p.add_argument("--seed", type=int, default=0, help="seed of the file subset and of the crops")
    p.add_argument("--out", default=None, help="also write the JSON result to this path (atomically)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - {"train", "eval"}:
        parser.error(f"--modes must name train and/or eval, got {args.modes}")
    if args.image_size < 1 or args.images < 1 or args.warmup < 0 or args.workers < 0:
        parser.error("--image-size and --images must be >= 1, --warmup and --workers >= 0")
    return args


def measure(dataset, workers: int, warmup: int, images: int) -> dict:
    """Seconds and images/s for `images` items after `warmup` untimed ones (items in dataset order)."""
    if workers == 0:
        for i in range(warmup):
            dataset[i]
        start = time.perf_counter()
        for i in range(warmup, warmup + images):
            dataset[i]
        seconds = time.perf_counter() - start
    else:
        loader = DataLoader(dataset, batch_size=64, num_workers=workers, prefetch_factor=4)
        done, start = 0, None
        for x, _ in loader:  # the clock starts once `warmup` images have arrived
            done += len(x)
            if start is None and done >= warmup:
                start, done = time.perf_counter(), 0
        seconds = time.perf_counter() - start
        images = done
    rate = images / seconds
    return {"images": images, "seconds": seconds, "images_per_s": rate, "workers": workers,
            "per_worker_images_per_s": rate / max(workers, 1)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = datetime.now(timezone.utc)
    torch.manual_seed(args.seed)
    with contextlib.redirect_stdout(sys.stderr):
        try:
            index = list_split(Path(args.root).expanduser() / args.split)
        except OPLError as exc:
            build_parser().exit(2, f"bench_data.py: error: {exc}\n")
    wanted = args.warmup + args.images + (64 if args.workers else 0)  # a partial first batch may straddle warm-up
    if len(index) < wanted:
        build_parser().exit(2, f"bench_data.py: error: {index.path} has {len(index)} images, fewer than "
                               f"--warmup + --images ({wanted})\n")
    subset = np.sort(np.random.default_rng(args.seed).choice(len(index), wanted, replace=False)).tolist()
    labels = index.class_positions()
    sizes = [Image.open(index.file_path(i)).size for i in subset[:200]]  # headers only
    results = {}
    for mode in args.modes:
        dataset = Subset(FolderImages(index, labels, folder_transform(mode == "train", args.image_size)), subset)
        print(f"[bench_data] {mode} ...", file=sys.stderr, flush=True)
        results[mode] = measure(dataset, args.workers, args.warmup, args.images)
        print(f"[bench_data] {mode}: {results[mode]['per_worker_images_per_s']:.1f} images/s per worker",
              file=sys.stderr, flush=True)
    result = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "data_path",
        "timestamp": started.isoformat(timespec="seconds"),
        "device": f"{cpu_name()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "code": code_version(),
        "args": vars(args),
        "data": {"split_dir": str(index.path), "files": len(index), "classes": len(index.classes),
                 "mean_file_bytes": float(index.sizes[subset].mean()),
                 "mean_source_size": [float(np.mean([s[0] for s in sizes])), float(np.mean([s[1] for s in sizes]))]},
        "modes": results,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
