"""Self-describing result records: one JSON line per finished run in `results/records.jsonl`.

A record carries what produced its numbers (the experiment configuration, seed, data variant and
fingerprint, code commit, device) and is identified by a run key hashed from the configuration, the
seed and the data variant, so the same run collected twice is one record and runs on different data
never share a key.

The key is stable under additions that change nothing: the configuration's `neutral` node lists
option values that mean "not used" (`label_noise: {kind: none}`, the standard training step, the
default evaluator). A field equal to its neutral entry is left out of the key, and so is a node left
empty, so a run keys the same before and after such a group exists. The node travels inside every
run's configuration, so each record can be re-keyed on its own.
"""

import hashlib
import json
import math
import re
from pathlib import Path

from opl.errors import OPLError
from opl.io import atomic_write_text

SCHEMA_VERSION = 1
PROTOCOLS = ("final_epoch_test", "best_val_selected_test", "authors_best_on_test")
PROTOCOL_NAMES = {
    "final_epoch_test": "final epoch",
    "best_val_selected_test": "best-validation epoch",
    "authors_best_on_test": "authors' best-on-test (selected on the test set)",
}
HISTORY_KEYS = ("epoch", "lr", "train_loss", "train_top1", "test_top1", "test_same_cos", "test_diff_cos",
                "test_diff_abs_cos", "val_top1")
PER_GROUP_HISTORY = re.compile(r"val_\w+_top1")  # e.g. PACS's validation top-1 per source domain


class RecordError(OPLError):
    """A malformed or inconsistent result record."""


def strip_keys(config: dict, dotted_keys) -> dict:
    """A copy of `config` without the given dotted keys (run-control settings such as `resume`)."""
    config = json.loads(json.dumps(config))
    for dotted in dotted_keys:
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return config


def _canonical(value):
    """Integral floats as ints: `loss.gamma=2` and `loss.gamma=2.0` are the same configuration."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


NEUTRAL_NODE = "neutral"


def _prune(node: dict, neutral: dict) -> dict:
    out = dict(node)
    for key, default in neutral.items():
        if key not in out:
            continue
        if isinstance(default, dict) and isinstance(out[key], dict):
            rest = _prune(out[key], default)
            if rest:
                out[key] = rest
            else:
                del out[key]
        elif _canonical(out[key]) == _canonical(default):
            del out[key]
    return out


def keyed_config(experiment_config: dict) -> dict:
    """The configuration a run is identified by: without the `neutral` node, every field equal to
    its neutral entry, and every node that leaves empty."""
    config = dict(experiment_config)
    neutral = config.pop(NEUTRAL_NODE, None)
    return _prune(config, neutral) if isinstance(neutral, dict) else config


def _key_text(value) -> str:
    """A value as the run key sees it (so 2 == 2.0 but True != 1)."""
    return json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"))


def run_key(experiment_config: dict, seed: int, data_variant: str) -> str:
    """16 hex digits identifying what determined a run's numbers."""
    canonical = json.dumps(_canonical({"config": keyed_config(experiment_config), "seed": seed,
                                       "data_variant": data_variant}), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# An override's value where the run's configuration lacks a key its experiment defines (e.g. a run
# made before an option existed): such a run never passes for the experiment as defined.
ABSENT = "<absent>"


def config_overrides(run_config: dict, experiment_default: dict) -> dict:
    """Dotted keys where a run's keyed configuration differs from its experiment's, both ways: a key
    only the run has, a value that differs, and a key only the experiment has (the run's own value
    where its configuration holds the neutral one, else ABSENT)."""
    run, default = flatten(keyed_config(run_config)), flatten(keyed_config(experiment_default))
    whole = flatten(run_config)
    differs = {k: v for k, v in run.items() if k not in default or _key_text(default[k]) != _key_text(v)}
    differs.update({k: whole.get(k, ABSENT) for k in default if k not in run})
    differs.pop("seed", None)
    return dict(sorted(differs.items()))


def apply_overrides(config: dict, overrides: dict) -> dict:
    """A copy of `config` with a record's overrides applied (ABSENT removes the key): the inverse
    of `config_overrides` as far as the run key goes."""
    config = json.loads(json.dumps(config))
    removed = [k for k, v in overrides.items() if v == ABSENT]
    for dotted in removed:  # first, so that setting "a.b" after removing "a" keeps "a.b"
        config = strip_keys(config, [dotted])
    for dotted, value in overrides.items():
        if dotted in removed:
            continue
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[leaf] = json.loads(json.dumps(value))
    return config


def todays_run_key(record: dict, experiment_default: dict) -> str:
    """The key `python train.py experiment=<e> seed=<s> <the record's overrides>` gives today, where
    `experiment_default` is what `experiment=<e>` composes today."""
    config = apply_overrides(experiment_default, record["overrides"])
    config["seed"] = record["seed"]
    return run_key(config, record["seed"], record["data_variant"])


def require_current(records: list[dict], experiment_default) -> None:
    """Raise RecordError naming the first record whose experiment, as defined today, with its
    recorded overrides, no longer gives its run key (a stale record would fill a cell it no longer
    belongs to). `experiment_default(name)` returns what `experiment=<name>` composes today."""
    stale = []
    for record in records:
        today = todays_run_key(record, experiment_default(record["experiment"]))
        if today != record["run_key"]:
            stale.append((record, today))
    if stale:
        (r, today), more = stale[0], len(stale) - 1
        raise RecordError(f"record {r['run_key']} ({r['experiment']}, seed {r['seed']}) is stale: experiment="
                          f"{r['experiment']} with its recorded overrides gives run key {today} today"
                          + (f" ({more} more stale records)" if more else "")
                          + "; re-collect its run folder (python scripts/collect_results.py RUNS) or re-run it")


def read_history(metrics_jsonl: Path) -> list[dict]:
    """The evaluated epochs of a run's metrics.jsonl, reduced to the keys the figures use."""
    history = []
    for number, line in enumerate(metrics_jsonl.read_text().splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecordError(f"{metrics_jsonl}:{number}: not valid JSON ({exc.msg}); resume the run "
                                  "(python train.py with its command) to repair it, or delete that line") from exc
            if "test_top1" in row:
                history.append({k: v for k, v in row.items() if k in HISTORY_KEYS or PER_GROUP_HISTORY.fullmatch(k)})
    return history


def make_record(results: dict, overrides: dict, history: list[dict]) -> dict:
    """The record of one finished run from its results.json (schema 1 of train.py)."""
    env = results.get("environment", {})
    record = {
        "schema_version": SCHEMA_VERSION,
        # Recomputed rather than copied, so records of older runs get today's canonical key.
        "run_key": run_key(results["experiment_config"], results["seed"], results["data_variant"]),
        "experiment": results.get("name"),
        "seed": results.get("seed"),
        "data_variant": results.get("data_variant"),
        "data_fingerprint": results.get("data_fingerprint"),
        "data_notes": results.get("data_notes", {}),
        # Where the initial weights came from ({"source": None, "sha256": None}: trained from
        # scratch); None for a results.json of a train.py that did not record them.
        "model_weights": results.get("model_weights"),
        "overrides": overrides,
        "metrics": {p: results.get("metrics", {}).get(p) for p in PROTOCOLS},
        "epochs": results.get("metrics", {}).get("epochs"),
        "train_images_per_s": results.get("metrics", {}).get("train_images_per_s"),
        "wall_time_s": results.get("wall_time_s"),
        "finished_at": results.get("finished_at"),
        "device": env.get("device_name"),
        "torch": env.get("torch"),
        "code": results.get("code"),
        "history": history,
        "config": results.get("experiment_config"),
    }
    validate_record(record, f"results.json of {results.get('run_dir', '?')}")
    return record


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_record(record, where: str) -> None:
    """Raise RecordError naming the first problem found in `record`."""
    def fail(message):
        raise RecordError(f"{where}: {message}")

    if not isinstance(record, dict):
        fail(f"a record must be a JSON object, got {type(record).__name__}")
    if record.get("schema_version") != SCHEMA_VERSION:
        fail(f"schema_version must be {SCHEMA_VERSION}, got {record.get('schema_version')!r}")
    expected = {"run_key": str, "experiment": str, "seed": int, "data_variant": str, "overrides": dict,
                "metrics": dict, "epochs": int, "finished_at": str, "device": str, "code": dict,
                "history": list, "config": dict}
    for field, kind in expected.items():
        if field not in record:
            fail(f"missing field {field!r}")
        if not isinstance(record[field], kind) or (kind is int and isinstance(record[field], bool)):
            fail(f"field {field!r} must be {kind.__name__}, got {type(record[field]).__name__}")
    if not isinstance(record.get("data_fingerprint"), (str, type(None))):
        fail(f"field 'data_fingerprint' must be str or null, got {type(record['data_fingerprint']).__name__}")
    weights = record.get("model_weights")
    if weights is not None and (not isinstance(weights, dict) or set(weights) != {"source", "sha256"}
                                or not all(isinstance(v, (str, type(None))) for v in weights.values())):
        fail(f"field 'model_weights' must be null or {{source: str|null, sha256: str|null}}, got {weights!r}")
    final = record["metrics"].get("final_epoch_test")
    if not isinstance(final, dict):
        fail("metrics.final_epoch_test is missing: the run never evaluated on the test set")
    for protocol in PROTOCOLS:
        metrics = record["metrics"].get(protocol)
        if metrics is None:
            continue
        if not isinstance(metrics, dict) or not _is_number(metrics.get("top1")):
            fail(f"metrics.{protocol}.top1 must be a finite number")
        if not 0.0 <= metrics["top1"] <= 100.0:
            fail(f"metrics.{protocol}.top1 = {metrics['top1']} is not a percentage")
    key = run_key(record["config"], record["seed"], record["data_variant"])
    if record["run_key"] != key:
        fail(f"run_key {record['run_key']!r} does not match its config, seed and data_variant ({key!r})")


def load_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        validate_record(record, f"{path}:{number}")
        records.append(record)
    keys = [r["run_key"] for r in records]
    if len(set(keys)) != len(keys):
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        raise RecordError(f"{path}: run keys appear more than once: {', '.join(duplicated)}")
    return records


def describe_run(record: dict) -> str:
    overrides = ", ".join(f"{k}={v}" for k, v in record.get("overrides", {}).items()) or "no overrides"
    commit = ((record.get("code") or {}).get("commit") or "unknown")[:10]
    return (f"run {record['run_key']} ({record['experiment']}, seed {record['seed']}, {overrides}, "
            f"finished {record['finished_at']}, commit {commit})")


def select_runs(records, where: str) -> list[dict]:
    """The runs behind one table cell or figure point, from the records that match it, sorted by
    seed. Two records with the same seed (one seed would count twice; one run key always has one
    seed) or runs on different data (fingerprints) are an error naming both runs."""
    chosen = sorted(records, key=lambda r: (r["seed"], r["run_key"]))
    for a, b in zip(chosen, chosen[1:]):
        if a["seed"] == b["seed"]:
            raise RecordError(f"{where}: two runs with the same seed {a['seed']}, {describe_run(a)} and "
                              f"{describe_run(b)}: one seed would count twice. Remove the stale one from the "
                              "records file (collect_results.py keeps one record per run key)")
    with_data = [r for r in chosen if r.get("data_fingerprint")]
    for r in with_data[1:]:
        if r["data_fingerprint"] != with_data[0]["data_fingerprint"]:
            raise RecordError(f"{where}: {describe_run(with_data[0])} and {describe_run(r)} read different data "
                              f"(fingerprints {with_data[0]['data_fingerprint']} and {r['data_fingerprint']}) under "
                              "one data variant; they cannot be averaged")
    return chosen


def merge_records(existing: list[dict], new: list[dict]) -> tuple[list[dict], dict]:
    """One record per run key, sorted by key; counts of what changed. Among the new records the
    later-finished run of a key wins; it replaces the existing record of its key unless that one
    finished later, so the same run collected again refreshes its record (e.g. its overrides
    against today's experiment definition)."""
    merged = {r["run_key"]: r for r in existing}
    latest = {}
    for record in new:
        kept = latest.get(record["run_key"])
        if kept is None or record["finished_at"] > kept["finished_at"]:
            latest[record["run_key"]] = record
    counts = {"added": 0, "replaced": 0, "unchanged": len(new) - len(latest)}
    for key, record in latest.items():
        old = merged.get(key)
        if old is None:
            counts["added"] += 1
        elif old == record or old["finished_at"] > record["finished_at"]:
            counts["unchanged"] += 1
            continue
        else:
            counts["replaced"] += 1
        merged[key] = record
    return [merged[k] for k in sorted(merged)], counts


def dumps_records(records: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in records)


def write_records(path: str | Path, records: list[dict]) -> None:
    atomic_write_text(path, dumps_records(records))
