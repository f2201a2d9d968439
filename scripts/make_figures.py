"""Draw results/figures/*.png from results/records.jsonl as results/figures.yaml describes.

    python scripts/make_figures.py [--records R] [--spec S] [--out DIR]

A figure with no records behind it yet is skipped and named on the output. Runs are selected as
for the tables (opl.results.records.select_runs: one run per seed, one dataset). Exit 2 on a
malformed record or specification, a stale record (as for make_tables.py), or a figure point with
two runs of one seed.
"""

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
for folder in (REPO_ROOT, REPO_ROOT / "scripts"):  # the library, and experiment_configs beside this script
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from experiment_configs import require_current_records  # noqa: E402
from opl.errors import OPLError  # noqa: E402
from opl.results.figures import draw, load_figure_specs, save  # noqa: E402
from opl.results.records import load_records  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", default=str(REPO_ROOT / "results" / "records.jsonl"))
    parser.add_argument("--spec", default=str(REPO_ROOT / "results" / "figures.yaml"))
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "figures"))
    args = parser.parse_args(argv)
    try:
        records = load_records(args.records)
        require_current_records(records)
        specs = load_figure_specs(args.spec)
    except OPLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:  # every figure is drawn (and its runs selected) before any file is written
        figures = [(Path(args.out) / spec["file"], draw(spec, records)) for spec in specs]
    except OPLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path, fig in figures:
        if fig is None:
            print(f"skipped {path}: no records for it yet")
            continue
        save(fig, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
