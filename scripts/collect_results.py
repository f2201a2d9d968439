"""Gather every finished run's results.json into results/records.jsonl (one line per run key).

    python scripts/collect_results.py                     # scans runs/, adds to results/records.jsonl
    python scripts/collect_results.py /path/to/runs ...   # other run folders (e.g. copied from a GPU box)
    python scripts/collect_results.py --out my.jsonl      # your own file; the committed one is left alone

By default the records are ADDED TO THE COMMITTED FILE results/records.jsonl (what the tables and
figures of the repository are built from); `--out FILE` reads and writes FILE instead.

A run counts as finished when its folder has results.json and the DONE marker; folders moved aside
by force=true (superseded-*) are skipped. Each record stores the overrides of its configuration
against the experiment's current definition (so a table cell can ask for the experiment as
defined, or for one sweep point), the per-epoch evaluations of metrics.jsonl (for the figures),
and what produced it (config, commit, device). Records already in the file are kept; a run key
collected again keeps the later-finished run, and the same run collected again replaces its record
(refreshing its overrides against today's definition). Exit 2 with a message on a malformed input.
"""

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
for folder in (REPO_ROOT, REPO_ROOT / "scripts"):  # the library, and experiment_configs beside this script
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from experiment_configs import ExperimentDefaults  # noqa: E402
from opl.errors import OPLError  # noqa: E402
from opl.results.records import (RecordError, config_overrides, load_records, make_record, merge_records,  # noqa: E402
                                 read_history, write_records)

COMMITTED = REPO_ROOT / "results" / "records.jsonl"


def finished_runs(roots: list[Path]) -> list[Path]:
    found = set()
    for root in roots:
        if not root.is_dir():
            raise RecordError(f"{root} is not a folder of runs")
        for results in root.rglob("results.json"):
            inside = results.relative_to(root).parts  # a root that is itself named superseded-* still counts
            if (results.parent / "DONE").exists() and not any(p.startswith("superseded-") for p in inside):
                found.add(results.parent)
    return sorted(found)


def record_of(run_dir: Path, defaults: ExperimentDefaults) -> dict:
    results_path = run_dir / "results.json"
    try:
        results = json.loads(results_path.read_text())
    except json.JSONDecodeError as exc:
        raise RecordError(f"{results_path}: not valid JSON ({exc.msg})") from exc
    required = ("experiment_config", "seed", "data_variant", "name")
    if results.get("schema_version") != 1 or any(k not in results for k in required):
        raise RecordError(f"{results_path}: not a results.json of this version of train.py "
                          f"(schema 1 with {', '.join(required)})")
    overrides = config_overrides(results["experiment_config"], defaults(results["name"]))
    metrics = run_dir / "metrics.jsonl"
    history = read_history(metrics) if metrics.exists() else []
    return make_record(results, overrides, history)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("roots", nargs="*", default=["runs"], help="folders holding run directories (default runs/)")
    parser.add_argument("--out", "--records", dest="records", default=str(COMMITTED),
                        help="records file to add to (default: the committed results/records.jsonl)")
    args = parser.parse_args(argv)
    try:
        existing = load_records(args.records)
        defaults = ExperimentDefaults()
        new = [record_of(run_dir, defaults) for run_dir in finished_runs([Path(r) for r in args.roots])]
        records, counts = merge_records(existing, new)
        write_records(args.records, records)
    except (OPLError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    committed = Path(args.records).resolve() == COMMITTED.resolve()
    print(f"{args.records}: {len(records)} records ({counts['added']} added, {counts['replaced']} replaced, "
          f"{counts['unchanged']} unchanged) from {len(new)} finished runs"
          + (" [the committed file; --out FILE keeps a file of your own]" if committed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
