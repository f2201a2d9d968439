"""The results workflow across re-runs (docs/runs.md): run keys that stay put when a group that
changes nothing is added, the committed records' keys reproduced from their commands, one run
selection for tables and figures, and the results-workflow commands of docs/runs.md on a fresh copy of the repository."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train  # noqa: F401  (registers the run-folder resolver the configuration uses)
from opl.results.figures import history_band, sweep_points
from opl.results.records import RecordError, keyed_config, run_key, select_runs, strip_keys, write_records
from opl.results.tables import Selector
from run_harness import REPO, cli_env

VARIANT = "digits/sklearn|test=0.2@0"


def load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(f"workflow_{name}_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def experiment_config(config_dir: Path, *overrides: str) -> dict:
    """What train.py records as a run's experiment configuration for `python train.py <overrides>`."""
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    excluded = [k for k in cfg.hydra.job.config.override_dirname.exclude_keys if k != "seed"]
    container = OmegaConf.to_container(cfg, resolve=False)
    del container["hydra"]
    return strip_keys(OmegaConf.to_container(OmegaConf.create(container), resolve=True), excluded)


# ============================================================================ keys under additions
def test_groups_that_change_nothing_leave_the_key_alone(tmp_path):
    today = experiment_config(REPO / "configs", "experiment=digits_opl")
    key = run_key(today, 0, VARIANT)
    # A run made before label_noise, method and evaluators existed had none of these nodes.
    before = {k: v for k, v in today.items() if k not in ("label_noise", "method", "evaluators", "neutral")}
    assert run_key(before, 0, VARIANT) == key
    assert keyed_config(today) == before

    # Add a new group for real, with its neutral entry: the key of the same command stays.
    configs = shutil.copytree(REPO / "configs", tmp_path / "configs")
    (configs / "mixup").mkdir()
    (configs / "mixup" / "none.yaml").write_text("kind: none\nalpha: 0.0\n")
    (configs / "mixup" / "beta.yaml").write_text("kind: beta\nalpha: 0.2\n")
    entry = yaml.safe_load((configs / "train.yaml").read_text())
    entry["defaults"].insert(entry["defaults"].index({"method": "standard"}) + 1, {"mixup": "none"})
    entry["neutral"]["mixup"] = {"kind": "none", "alpha": 0.0}
    (configs / "train.yaml").write_text(yaml.safe_dump(entry, sort_keys=False))
    grown = experiment_config(configs, "experiment=digits_opl")
    assert grown["mixup"] == {"kind": "none", "alpha": 0.0} and run_key(grown, 0, VARIANT) == key
    assert run_key(experiment_config(configs, "experiment=digits_opl", "mixup=beta"), 0, VARIANT) != key


@pytest.mark.parametrize("override", ["label_noise=symmetric", "method=pgd_at", "evaluators.classification.geometry=false",
                                      "+evaluators.extra={_target_: opl.engine.evaluate.ClassificationEvaluator}"])
def test_choices_that_change_the_experiment_change_the_key(override):
    base = run_key(experiment_config(REPO / "configs", "experiment=digits_opl"), 0, VARIANT)
    assert run_key(experiment_config(REPO / "configs", "experiment=digits_opl", override), 0, VARIANT) != base


def test_neutral_entries_prune_fields_not_whole_nodes():
    """A node equal to its neutral entry goes; extra fields in it stay in the key (never merged away)."""
    neutral = {"label_noise": {"kind": "none"}, "method": {"_target_": "Std"}}
    assert keyed_config({"neutral": neutral, "label_noise": {"kind": "none"}, "a": 1}) == {"a": 1}
    assert keyed_config({"neutral": neutral, "label_noise": {"kind": "none", "rate": 0.4}, "a": 1}) == {
        "label_noise": {"rate": 0.4}, "a": 1}
    assert keyed_config({"neutral": neutral, "method": {"_target_": "Other"}}) == {"method": {"_target_": "Other"}}
    assert keyed_config({"a": 1, "label_noise": {"kind": "none"}}) == {"a": 1, "label_noise": {"kind": "none"}}


# ============================================================================ the committed records
def hydra_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) and not value.replace("_", "").replace(".", "").isalnum() else str(value)


COMMITTED = [json.loads(line) for line in (REPO / "results" / "records.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def composed():
    cache = {}

    def config_of(record) -> dict:
        key = (record["experiment"], json.dumps(record["overrides"], sort_keys=True))
        if key not in cache:
            overrides = [f"{k}={hydra_value(v)}" for k, v in record["overrides"].items()]
            cache[key] = experiment_config(REPO / "configs", f"experiment={record['experiment']}", *overrides)
        return {**cache[key], "seed": record["seed"]}  # nothing in the configs interpolates the seed
    return config_of


def test_the_documented_commands_reproduce_the_committed_keys(composed):
    """`python train.py experiment=<e> seed=<s> <overrides>` today gives each committed record's key."""
    assert len(COMMITTED) >= 50
    wrong = [r["run_key"] for r in COMMITTED if run_key(composed(r), r["seed"], r["data_variant"]) != r["run_key"]]
    assert not wrong, f"committed records whose command no longer gives their key: {wrong}"


# ============================================================================ one selection
def record(key: str, seed: int, finished: str, top1: float, fingerprint="f1", gamma=0.5, overrides=None) -> dict:
    return {"run_key": key, "experiment": "e", "seed": seed, "data_variant": "v", "data_fingerprint": fingerprint,
            "overrides": overrides or {}, "finished_at": finished, "code": {"commit": "abcdef1234567"},
            "config": {"loss": {"gamma": gamma}}, "metrics": {"final_epoch_test": {"top1": top1}},
            "history": [{"epoch": 1, "test_top1": top1, "train_loss": 1.0}]}


def test_a_seed_counts_once():
    """One rule: one record per seed (a records file holds one record per run key, load_records
    refuses more, so the same key twice is the same seed twice too)."""
    old, new = record("k0", 0, "2026-01-01T00:00:00+00:00", 70.0), record("k0", 0, "2026-02-01T00:00:00+00:00", 71.0)
    other = record("k1", 1, "2026-01-05T00:00:00+00:00", 72.0)
    assert select_runs([other, new], "cell") == [new, other]
    with pytest.raises(RecordError, match="cell: two runs with the same seed 0, run k0 .* and run k0 "):
        select_runs([new, other, old], "cell")
    twin = record("k2", 0, "2026-03-01T00:00:00+00:00", 90.0)
    with pytest.raises(RecordError) as err:
        select_runs([old, other, twin], "cell (CE, R56)")
    message = str(err.value)
    assert message.startswith("cell (CE, R56): two runs with the same seed 0, run k0 (e, seed 0, no overrides, "
                              "finished 2026-01-01T00:00:00+00:00, commit abcdef1234) and run k2 (")
    moved = record("k3", 2, "2026-01-06T00:00:00+00:00", 73.0, fingerprint="f2")
    with pytest.raises(RecordError, match="read different data .fingerprints f1 and f2. under one data variant"):
        select_runs([old, other, moved], "cell")
    assert len(select_runs([old, other, record("k4", 3, "2026", 1.0, fingerprint=None)], "cell")) == 3


def valid_record(seed: int, top1: float, tag: int = 0) -> dict:
    config = {"loss": {"gamma": 0.5}, "tag": tag}
    return {"schema_version": 1, "run_key": run_key(config, seed, "v"), "experiment": "e", "seed": seed,
            "data_variant": "v", "data_fingerprint": "f1", "overrides": {}, "epochs": 1, "device": "cpu",
            "metrics": {"final_epoch_test": {"top1": top1}}, "finished_at": f"2026-01-0{seed + 1}T00:00:00+00:00",
            "code": {"commit": "abc"}, "history": [{"epoch": 1, "test_top1": top1, "train_loss": 1.0}],
            "config": config}


def test_figures_refuse_a_seed_twice_as_tables_do(tmp_path, capsys):
    """The old failure: figures averaged duplicates silently (n=3-5 became n=3-7)."""
    records = [valid_record(s, 80.0 + s) for s in range(3)]
    twin = valid_record(1, 99.0, tag=1)  # another run key, same seed
    selector = Selector("e", "v", {})
    assert [p[3] for p in sweep_points(records, selector, "loss.gamma", "top1")] == [3]
    with pytest.raises(RecordError, match="e at loss.gamma=0.5: two runs with the same seed 1"):
        sweep_points(records + [twin], selector, "loss.gamma", "top1")
    with pytest.raises(RecordError, match="same seed 1"):
        history_band(records + [twin], selector, "test_top1")
    # The figure script, end to end, on real configurations: a second run of seed 1 can only claim the
    # experiment as defined with stale overrides (its own configuration differs), so the script
    # refuses it before any point is drawn: exit 2 naming it, no figure written.
    today = experiment_config(REPO / "configs", "experiment=digits_opl")
    real = [{**valid_record(s, 80.0 + s), "experiment": "digits_opl", "data_variant": VARIANT} for s in range(3)]
    for r in real:
        r["config"] = {**today, "seed": r["seed"]}
        r["run_key"] = run_key(r["config"], r["seed"], VARIANT)
    twin = json.loads(json.dumps(real[1]))
    twin["config"]["trainer"]["epochs"] = 3  # labelled "no overrides" all the same
    twin["run_key"] = run_key(twin["config"], 1, VARIANT)
    write_records(tmp_path / "records.jsonl", real + [twin])
    spec = [{"file": "c.png", "kind": "curves", "series": [{"label": "x", "experiment": "digits_opl",
                                                            "data_variant": VARIANT}]}]
    (tmp_path / "figures.yaml").write_text(json.dumps(spec))
    make_figures = load_script(REPO / "scripts" / "make_figures.py", "make_figures")
    assert make_figures.main(["--records", str(tmp_path / "records.jsonl"), "--spec", str(tmp_path / "figures.yaml"),
                              "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"record {twin['run_key']} (digits_opl, seed 1) is stale" in err
    assert not (tmp_path / "out").exists()


# ============================================================================ the workflow commands (docs/runs.md)
def fresh_copy(target: Path) -> Path:
    """The repository as a clone would have it (tracked and new, non-ignored files): no runs/."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    return target


def test_readme_results_workflow_on_a_fresh_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts add their checkout to it
    repo = fresh_copy(tmp_path / "repo")
    command = [sys.executable, "train.py", "logger=none", "trainer.epochs=1"]  # the demo, one epoch
    first = subprocess.run(command, cwd=repo, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    run = repo / "runs" / "digits_opl" / "seed0" / "trainer.epochs-1"
    key = json.loads((run / "results.json").read_text())["run_key"]

    monkeypatch.chdir(repo)  # the scripts run from the copy, as `python scripts/...` there would
    scripts = {name: load_script(repo / "scripts" / f"{name}.py", name)
               for name in ("collect_results", "make_tables", "make_figures")}
    committed = repo / "results" / "records.jsonl"
    before = len(committed.read_text().splitlines())
    assert scripts["collect_results"].main([]) == 0
    assert "(1 added, 0 replaced" in capsys.readouterr().out
    # A personal file leaves the committed one alone.
    snapshot = committed.read_bytes()
    assert scripts["collect_results"].main(["--out", str(tmp_path / "mine.jsonl")]) == 0
    assert committed.read_bytes() == snapshot and len((tmp_path / "mine.jsonl").read_text().splitlines()) == 1
    assert scripts["make_tables"].main(["--records", str(tmp_path / "mine.jsonl"), "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "digits.md").exists() and committed.read_bytes() == snapshot

    # The same command again, forced: a new run with the same key, which replaces the record.
    again = subprocess.run(command + ["force=true"], cwd=repo, env=cli_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "results.json").read_text())["run_key"] == key
    capsys.readouterr()
    assert scripts["collect_results"].main([]) == 0
    assert "(0 added, 1 replaced, " in capsys.readouterr().out
    assert len(committed.read_text().splitlines()) == before + 1
    assert scripts["make_tables"].main([]) == 0
    assert scripts["make_figures"].main([]) == 0, capsys.readouterr().err
    assert scripts["make_tables"].main(["--check"]) == 0
