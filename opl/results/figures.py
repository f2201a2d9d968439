"""Figures from result records: accuracy vs a swept parameter, feature geometry and training curves.

Specifications live in `results/figures.yaml` (a list; each item names its `file`, `kind`, `title`
and the records it plots through the same selectors as the tables). The runs behind each point are
chosen as for a table cell (`select_runs`: one run per seed, one dataset).
Every point is a mean over seeds with a +-1 standard deviation bar or band, and the legend gives the
number of seeds.
"""

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from opl.io import atomic_write  # noqa: E402
from opl.results.records import flatten, select_runs  # noqa: E402
from opl.results.stats import summarize  # noqa: E402
from opl.results.tables import Selector, SpecError, metric_value  # noqa: E402

KINDS = ("sweep", "geometry", "curves")
PNG_METADATA = {"Software": None}  # no library version in the file: identical inputs give identical bytes


def parse_selector(raw, where: str) -> tuple[str, Selector]:
    if not isinstance(raw, dict) or not {"label", "experiment", "data_variant"} <= set(raw):
        raise SpecError(f"{where}: a series needs label, experiment and data_variant, got {raw!r}")
    return str(raw["label"]), Selector(raw["experiment"], raw["data_variant"], dict(raw.get("overrides") or {}))


def load_figure_specs(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"no figure specification file at {path}")
    specs = yaml.safe_load(path.read_text())
    if not isinstance(specs, list):
        raise SpecError(f"{path}: must hold a list of figures")
    for i, spec in enumerate(specs):
        where = f"{path}, figure {i + 1}"
        if not isinstance(spec, dict) or spec.get("kind") not in KINDS or not spec.get("file"):
            raise SpecError(f"{where}: needs file and kind (one of {list(KINDS)})")
        if not spec.get("series"):
            raise SpecError(f"{where}: needs a non-empty series list")
        spec["series"] = [parse_selector(s, where) for s in spec["series"]]
        if spec["kind"] == "sweep" and not spec.get("parameter"):
            raise SpecError(f"{where}: a sweep figure needs the swept parameter (e.g. loss.gamma)")
        if spec.get("baseline") is not None:
            spec["baseline"] = parse_selector(spec["baseline"], where)
    return specs


def _final(record: dict, metric: str):
    return metric_value(record, "final_epoch_test", metric)


def sweep_points(records: list[dict], selector: Selector, parameter: str, metric: str) -> list[tuple]:
    """(value, mean, std, n) per parameter value, over runs differing from the selector only in `parameter`."""
    by_value = defaultdict(list)
    for r in records:
        other = {k: v for k, v in r["overrides"].items() if k != parameter}
        if r["experiment"] == selector.experiment and r["data_variant"] == selector.data_variant and other == selector.overrides:
            value = flatten(r["config"]).get(parameter)
            if value is not None:
                by_value[value].append(r)
    points = []
    for value in sorted(by_value):
        runs = select_runs(by_value[value], f"{selector.experiment} at {parameter}={value}")
        values = [_final(r, metric) for r in runs if _final(r, metric) is not None]
        if values:
            s = summarize(values)
            points.append((value, s.mean, s.std or 0.0, s.n))
    return points


def history_band(records: list[dict], selector: Selector, key: str) -> tuple[list, list, list, int]:
    """Epochs, mean and std over seeds of a per-epoch history value (epochs every run evaluated)."""
    runs = selector.select(records, f"{selector.experiment} ({key} curve)")
    per_epoch = defaultdict(list)
    for r in runs:
        for row in r["history"]:
            if row.get(key) is not None:
                per_epoch[row["epoch"]].append(row[key])
    epochs = [e for e in sorted(per_epoch) if len(per_epoch[e]) == len(runs)]
    stats = [summarize(per_epoch[e]) for e in epochs]
    return epochs, [s.mean for s in stats], [s.std or 0.0 for s in stats], len(runs)


def _band(ax, selector: Selector, label: str, records, key: str):
    epochs, mean, std, n = history_band(records, selector, key)
    if not epochs:
        return False
    line, = ax.plot(epochs, mean, marker="o", markersize=3, label=f"{label} (n={n})")
    ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    color=line.get_color(), alpha=0.2)
    return True


def draw(spec: dict, records: list[dict]):
    """The figure of one spec, or None when no record feeds it."""
    kind, drawn = spec["kind"], False
    if kind == "sweep":
        fig, ax = plt.subplots(figsize=(6.4, 4))
        metric = spec.get("metric", "top1")
        for label, selector in spec["series"]:
            points = sweep_points(records, selector, spec["parameter"], metric)
            if points:
                n = sorted({p[3] for p in points})
                ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                            capsize=3, label=f"{label} (n={'-'.join(map(str, (n[0], n[-1]))) if len(n) > 1 else n[0]})")
                drawn = True
        if spec.get("baseline"):
            label, selector = spec["baseline"]
            values = [_final(r, metric) for r in selector.select(records, f"{label} baseline")
                      if _final(r, metric) is not None]
            if values:
                s = summarize(values)
                ax.axhline(s.mean, color="grey", linestyle="--", label=f"{label} (n={s.n})")
                if s.std:
                    ax.axhspan(s.mean - s.std, s.mean + s.std, color="grey", alpha=0.15)
        ax.set_xscale(spec.get("xscale", "log"))
        ax.set_xlabel(spec["parameter"])
        ax.set_ylabel(spec.get("ylabel", f"final-epoch test {metric}"))
        axes = [ax]
    elif kind == "geometry":
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for ax, key, name in ((axes[0], "test_same_cos", "same-class cosine"),
                              (axes[1], "test_diff_cos", "different-class cosine")):
            for label, selector in spec["series"]:
                drawn |= _band(ax, selector, label, records, key)
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"mean {name} (test set)")
    else:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for ax, key, name in ((axes[0], "train_loss", "training loss"), (axes[1], "test_top1", "test top-1 (%)")):
            for label, selector in spec["series"]:
                drawn |= _band(ax, selector, label, records, key)
            ax.set_xlabel("epoch")
            ax.set_ylabel(name)
    if not drawn:
        plt.close(fig)
        return None
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(spec.get("title", ""), fontsize=10)
    fig.tight_layout()
    return fig


def save(fig, path: Path) -> None:
    """The PNG, written atomically (a crash leaves the old figure or the new one)."""
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, metadata=PNG_METADATA))
    finally:
        plt.close(fig)
