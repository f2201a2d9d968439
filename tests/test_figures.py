"""The figure script draws real PNGs from records built out of fixture metrics.jsonl files, on the
configurations today's digits experiments compose (the script refuses records they no longer give)."""

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from opl.results.figures import history_band, load_figure_specs, save, sweep_points
from opl.results.records import config_overrides, make_record, read_history, run_key, write_records
from opl.results.tables import Selector, SpecError

REPO = Path(__file__).resolve().parent.parent
VARIANT = "digits/sklearn|test=0.2@0"
_spec = importlib.util.spec_from_file_location("opl_experiment_configs_for_figures", REPO / "scripts" / "experiment_configs.py")
experiment_configs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(experiment_configs)


def fixture_run(tmp_path: Path, experiment: str, seed: int, gamma: float, same: list, diff: list, top1: float,
                overrides: dict) -> dict:
    """A run folder's metrics.jsonl written as the trainer writes it, then the record collected from
    it (`train.py experiment=<experiment> seed=<seed> <overrides>` as composed today)."""
    run = tmp_path / f"{experiment}-{seed}-{gamma}"
    run.mkdir()
    lines = []
    for epoch, (s, d) in enumerate(zip(same, diff), start=1):
        lines.append({"epoch": epoch, "train_loss": 2.0 / epoch, "lr": 0.1, "train_top1": 50.0 + epoch,
                      "test_top1": top1 - (len(same) - epoch), "test_same_cos": s, "test_diff_cos": d,
                      "test_diff_abs_cos": d})
        lines.append({"epoch": epoch + 0.5, "train_loss": 1.0})  # a line without evaluation is not history
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = experiment_configs.command_config(f"experiment={experiment}", f"seed={seed}",
                                               *(f"{k}={v}" for k, v in overrides.items()))
    assert config_overrides(config, experiment_configs.ExperimentDefaults()(experiment)) == overrides
    results = {"run_key": run_key(config, seed, VARIANT), "name": experiment, "seed": seed, "data_variant": VARIANT,
               "metrics": {"final_epoch_test": {"epoch": len(same), "top1": top1, "same_cos": same[-1],
                                                "diff_cos": diff[-1]}, "epochs": len(same)},
               "finished_at": f"2026-01-0{seed + 1}T00:00:00+00:00", "environment": {"device_name": "cpu"},
               "code": {"commit": "abc", "dirty": False}, "experiment_config": config}
    return make_record(results, overrides, read_history(run / "metrics.jsonl"))


@pytest.fixture
def records(tmp_path):
    out = []
    for seed in (0, 1):
        out.append(fixture_run(tmp_path, "digits_ce", seed, 0.5, [0.5, 0.6], [0.5, 0.4], 80.0 + seed, {}))
        for gamma, acc in ((0.5, 82.0), (2.0, 84.0)):  # digits_opl's gamma is 0.5
            overrides = {} if gamma == 0.5 else {"loss.gamma": gamma}
            out.append(fixture_run(tmp_path, "digits_opl", seed, gamma, [0.7, 0.9], [0.3, 0.1 + 0.1 * seed],
                                   acc + 2 * seed, overrides))
    return out


def test_history_and_sweep_statistics(records):
    epochs, mean, std, n = history_band(records, Selector("digits_opl", VARIANT, {}), "test_diff_cos")
    assert epochs == [1, 2] and n == 2
    assert mean == pytest.approx([0.3, 0.15]) and std == pytest.approx([0.0, 0.0707107], abs=1e-6)
    points = sweep_points(records, Selector("digits_opl", VARIANT, {}), "loss.gamma", "top1")
    # gamma 0.5: seeds give 82, 84; gamma 2: 84, 86 (sample std sqrt(2)).
    assert [(p[0], p[1], p[3]) for p in points] == [(0.5, 83.0, 2), (2.0, 85.0, 2)]
    assert points[0][2] == pytest.approx(2 ** 0.5)


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_make_figures_writes_pngs_and_skips_figures_without_records(records, tmp_path):
    write_records(tmp_path / "records.jsonl", records)
    series = [{"label": "CE", "experiment": "digits_ce", "data_variant": VARIANT},
              {"label": "CE + OPL", "experiment": "digits_opl", "data_variant": VARIANT}]
    spec = [
        {"file": "gamma.png", "kind": "sweep", "parameter": "loss.gamma", "title": "t", "series": series[1:],
         "baseline": series[0]},
        {"file": "geometry.png", "kind": "geometry", "series": series},
        {"file": "curves.png", "kind": "curves", "series": series},
        {"file": "none.png", "kind": "geometry", "series": [{"label": "x", "experiment": "absent", "data_variant": VARIANT}]},
    ]
    (tmp_path / "figures.yaml").write_text(json.dumps(spec))  # JSON is YAML
    out = tmp_path / "figures"
    proc = subprocess.run([sys.executable, "scripts/make_figures.py", "--records", str(tmp_path / "records.jsonl"),
                           "--spec", str(tmp_path / "figures.yaml"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "gamma.png", "geometry.png"]
    assert "skipped" in proc.stdout and "none.png" in proc.stdout
    width, height = png_size(out / "geometry.png")
    assert width > height > 200
    first = (out / "gamma.png").read_bytes()
    subprocess.run([sys.executable, "scripts/make_figures.py", "--records", str(tmp_path / "records.jsonl"),
                    "--spec", str(tmp_path / "figures.yaml"), "--out", str(out)], cwd=REPO, check=True,
                   capture_output=True, timeout=120)
    assert (out / "gamma.png").read_bytes() == first  # no timestamps or versions in the file


def test_bad_figure_spec_is_rejected(tmp_path):
    path = tmp_path / "figures.yaml"
    path.write_text(json.dumps([{"file": "a.png", "kind": "histogram", "series": []}]))
    with pytest.raises(SpecError, match="kind"):
        load_figure_specs(path)
    path.write_text(json.dumps([{"file": "a.png", "kind": "sweep", "series": [
        {"label": "x", "experiment": "e", "data_variant": "v"}]}]))
    with pytest.raises(SpecError, match="parameter"):
        load_figure_specs(path)
    proc = subprocess.run([sys.executable, "scripts/make_figures.py", "--spec", str(path), "--records",
                           str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "parameter" in proc.stderr and not (tmp_path / "o").exists()


def test_committed_figure_spec_parses():
    specs = load_figure_specs(REPO / "results" / "figures.yaml")
    assert {s["kind"] for s in specs} == {"sweep", "geometry", "curves"}


def test_make_figures_refuses_a_stale_record(records, tmp_path):
    """A record whose experiment, as defined today, with its overrides no longer gives its key (here
    the default digits_opl run's overrides emptied of a key it lacks) stops the script, naming it."""
    stale = json.loads(json.dumps(records[1]))
    del stale["config"]["trainer"]["sync_bn"]  # a run made before the option existed, labelled "as defined"
    stale["run_key"] = run_key(stale["config"], stale["seed"], VARIANT)
    write_records(tmp_path / "records.jsonl", [records[0], stale])
    spec = [{"file": "c.png", "kind": "curves", "series": [{"label": "x", "experiment": "digits_opl",
                                                            "data_variant": VARIANT}]}]
    (tmp_path / "figures.yaml").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "scripts/make_figures.py", "--records", str(tmp_path / "records.jsonl"),
                           "--spec", str(tmp_path / "figures.yaml"), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"record {stale['run_key']} (digits_opl, seed 0) is stale" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_save_replaces_a_figure_atomically(tmp_path):
    path = tmp_path / "figs" / "a.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save(fig, path)
    first = path.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and sorted(p.name for p in path.parent.iterdir()) == ["a.png"]

    def broken(f, **kwargs):  # drawing that fails half-way through the file
        f.write(b"\x89PNG partial")
        raise RuntimeError("renderer failed")

    fig, _ = plt.subplots()
    fig.savefig = broken
    with pytest.raises(RuntimeError, match="renderer failed"):
        save(fig, path)
    assert path.read_bytes() == first and sorted(p.name for p in path.parent.iterdir()) == ["a.png"]
