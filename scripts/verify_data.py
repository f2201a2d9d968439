"""Check a few-shot dataset's files before training on them.

    python scripts/verify_data.py dataset=<mini_imagenet|tiered_imagenet|cifar_fs|fc100> [dataset.root=DIR]
                                  [dataset.<key>=<value> ...]

Reads configs/dataset/<name>.yaml with the given overrides (Hydra's `key=value` syntax) and checks
every file, key, shape, dtype, class count, images per class, base/novel disjointness and, for
CIFAR-FS / FC100, the class ids against the published split, exactly as training will read them.
Exit 0 with a summary when all is well; exit 2 with one line per problem otherwise.
"""

import sys
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from opl.data.fewshot import read_fewshot  # noqa: E402
from opl.errors import OPLError  # noqa: E402

DATASETS = ("mini_imagenet", "tiered_imagenet", "cifar_fs", "fc100")
USAGE = (f"usage: python scripts/verify_data.py dataset=<{'|'.join(DATASETS)}> [dataset.root=DIR] "
         f"[dataset.<key>=<value> ...]")


def load_config(argv: list[str]):
    """The dataset config with the command line's overrides, or a list of usage problems."""
    name, overrides, problems = None, [], []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key == "dataset" and sep:
            name = value
        elif key.startswith("dataset.") and sep:
            overrides.append(f"{key.removeprefix('dataset.')}={value}")
        else:
            problems.append(f"unrecognised argument {arg!r}; {USAGE}")
    if name not in DATASETS:
        problems.append(f"dataset={name} is not a few-shot dataset; choose from {', '.join(DATASETS)}")
    if problems:
        return None, problems
    try:
        cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs" / "dataset" / f"{name}.yaml"),
                              OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as exc:
        return None, [f"bad override in {overrides}: {exc}".replace("\n", " ")]
    return OmegaConf.to_container(cfg, resolve=True), []


def verify(cfg: dict) -> tuple[list[str], list[str]]:
    """(problems, summary lines)."""
    classes = {**cfg["classes"], "train": cfg["num_classes"]}
    try:
        splits, problems = read_fewshot(cfg["name"], cfg["source"], cfg["root"], cfg["files"], cfg["image_size"],
                                        classes, cfg.get("images_per_class"), cfg.get("download", False),
                                        cfg.get("check_pinned_split", True), keep_images=False)
    except OPLError as exc:
        return [str(exc)], []
    summary = [f"{cfg['name']} ({cfg['source']} source, root {Path(cfg['root']).expanduser().resolve()}): "
               f"every check passed"]
    for role, arrays in splits.items():
        size = cfg["image_size"]
        summary.append(f"  {role:<10} {cfg['files'][role]:<18} {len(arrays):>7} images "
                       f"{len(set(arrays.raw_labels.tolist())):>4} classes  {size}x{size}x3 uint8  "
                       f"{', '.join(path.name for path in arrays.files)}")
    return problems, summary


def main(argv: list[str] | None = None) -> int:
    cfg, problems = load_config(sys.argv[1:] if argv is None else argv)
    summary = []
    if cfg is not None:
        problems, summary = verify(cfg)
    for line in problems or summary:
        print(line)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
