"""Run folders under faults (docs/runs.md): the lock, ownership and data identity, crash windows,
damaged files, one-line errors, Ctrl-C, wandb without credentials or network, read-only folders
and a full disk.

Each test first creates the fault (a second process, a kill inside a given window, a truncated
file, ...) and then checks what the user sees and what is left on disk. Runs go through
`train.run_job` in this process (tests/run_harness.py: the command's own code path) except where
real processes are the point (two processes on one folder, SIGINT, mounts)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from torch.utils.data import DataLoader, Dataset

import train
from opl.config_types import check_keywords, matches
from opl.data.digits import digits
from opl.engine.run_dir import RunDir, folder_name, remove_unused_folder
from opl.engine.trainer import Trainer
from opl.errors import ConfigError, DatasetNotFoundError, NonFiniteLossError
from opl.io import atomic_write_text
from opl.logging import JsonlWriter, WandbLogger, choose_wandb_mode, reachable
from conftest import SHARED_DATA, require
from run_harness import FAST, REPO, cli_env, fast, run_here, start_cli

HOST = socket.gethostname()


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def epochs_in(run: Path) -> list[int]:
    return [r["epoch"] for r in rows(run / "metrics.jsonl")]


def only_line(err: str) -> str:
    """The one line a failure prints; no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


class Killed(BaseException):
    """A simulated SIGKILL: nothing of the process runs after it (not even `except Exception`)."""


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished FAST digits run, copied by the tests that start from a finished folder."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert run_here(run, *FAST) == 0
    return run


def copy_of(run: Path, target: Path) -> Path:
    shutil.copytree(run, target)
    return target


# ============================================================================ one-line errors
BAD_VALUES = [
    (["trainer.batch_size=abc"], "error: trainer.batch_size='abc': expected an integer"),
    (["seed=abc"], "error: seed='abc': expected an integer"),
    (["trainer.epochs=1.5"], "error: trainer.epochs=1.5: expected an integer"),
    (["dataset.limit_train=x"], "error: dataset.limit_train='x': expected an integer or null"),
    (["force=yes"], "error: force='yes': expected true or false"),
    (["model.hidden=[a]"], "error: model.hidden=['a']: expected a list of integers"),
    (["optim.lr=-0.1"], "error: optim.lr=-0.1: expected a learning rate > 0"),
    (["optim.lr=0"], "error: optim.lr=0: expected a learning rate > 0"),
    (["optim.momentum=-1"], "error: optim: Invalid momentum value: -1"),
    (["loss.gamma=inf"], "error: loss.gamma=inf: expected a finite number"),
    (["loss.weight=nan"], "error: loss.weight=nan: expected a finite number"),
    (["resume=maybe"], "error: resume='maybe': expected auto or never"),
    (["trainer.compile=maybe"], "error: trainer.compile must be true, false or auto"),
    (["trainer.batch_size=1"], "error: OPL compares pairs of samples in a batch: trainer.batch_size must be >= 2"),
    (["eval_only=true", "ckpt_path=absent.pt"], "error: ckpt_path=absent.pt: no such checkpoint file"),
    (["dist_timeout_s=0"], "error: dist_timeout_s=0: expected a number of seconds > 0"),
    (["dist_timeout_s=abc"], "error: dist_timeout_s='abc': expected a finite number"),
    (["trainer.device=gpu"], "error: trainer.device='gpu': expected auto, cpu, cuda or cuda:<index>"),
    # RSC's knobs are checked by name and type (before the data is read).
    (["experiment=pacs_cpu_rsc", "dataset.root=data/pacs", "+method.spatial_fractio=0.3"],
     "error: method.spatial_fractio is not an option of RSCStep (options: model, criterion, data, spatial_fraction"),
    (["experiment=pacs_cpu_rsc", "dataset.root=data/pacs", "method.spatial_fraction=abc"],
     "error: method.spatial_fraction='abc': expected a finite number"),
    # PACS leaves the target domain and the choice of pretrained weights to the command line.
    (["experiment=pacs_rsc", "dataset.root=data/pacs"], "error: dataset.target, model.pretrained: no value; this "
                                                        "experiment needs it on the command line"),
]


@pytest.mark.parametrize("overrides, message", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_values_stop_with_one_line_before_any_folder_is_used(overrides, message, tmp_path, capsys):
    run = tmp_path / "runs" / "x"
    assert run_here(run, *fast(*overrides)) == 2
    assert only_line(capsys.readouterr().err).startswith(message)
    assert not run.exists()  # the folder Hydra created for the run is gone again
    assert (tmp_path / "runs").exists()  # outside the working directory only the run folder itself goes


def test_rsc_images_too_small_for_the_feature_map_stop_before_any_folder_is_used(tmp_path, capsys):
    """ResNet-18 turns 32x32 images into a 1x1 map: RSC cannot mute a third of one position."""
    run = tmp_path / "runs" / "x"
    root = require(SHARED_DATA / "pacs")
    assert run_here(run, *fast("experiment=pacs_cpu_rsc", f"dataset.root={root}", "dataset.image_size=32")) == 2
    line = only_line(capsys.readouterr().err)
    assert line.startswith("error: method=rsc: 32x32 training images give the model a 1x1 last feature map (512 "
                           "channels)") and line.endswith("use a larger dataset.image_size (PACS: 222, a 7x7 map on ResNet)")
    assert not run.exists()


def test_a_failed_start_leaves_an_existing_folder_alone(finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    assert run_here(run, *fast("trainer.batch_size=abc")) == 2
    capsys.readouterr()
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.parametrize("env, overrides, message", [
    ({"WANDB_MODE": "bogus"}, [], "error: WANDB_MODE='bogus' is not a wandb mode: expected online, offline or disabled"),
    ({}, ["logger.mode=bogus"], "error: logger.mode='bogus' is not a wandb mode"),
    ({}, ["logger.mode=online"], "error: logger.mode=online but no wandb API key"),
    ({"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": "http://127.0.0.1:{port}"}, ["logger.mode=online"],
     "error: logger.mode=online but http://127.0.0.1:{port} did not answer within 3 s (no network?); use "
     "logger.mode=offline"),
])
def test_wandb_modes_that_cannot_work_are_one_line(env, overrides, message, tmp_path, monkeypatch, capsys):
    port = closed_port()
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(port=port))
    fast = [o for o in FAST if o != "logger=none"]
    started = time.monotonic()
    assert run_here(tmp_path / "run", *fast, *overrides) == 2
    assert time.monotonic() - started < 10
    assert only_line(capsys.readouterr().err).startswith(message.format(port=port))
    assert not (tmp_path / "run").exists()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def test_wandb_auto_mode_falls_back_to_offline_with_one_warning(tmp_path):
    nothing = {"NETRC": str(tmp_path / "no-netrc")}  # no ~/.netrc either
    creds = {"WANDB_API_KEY": "k" * 40}
    assert choose_wandb_mode(None, nothing, probe=lambda url: True) == (
        "offline", "wandb: no wandb API key (set WANDB_API_KEY or run `wandb login`); logging offline into the run "
                   "folder's wandb/ (upload later with `wandb sync`)")
    asked = []
    mode, warning = choose_wandb_mode(None, {**creds, "WANDB_BASE_URL": "https://example.org:8443"},
                                      probe=lambda url: asked.append(url))
    assert asked == ["https://example.org:8443"] and mode == "offline"
    assert warning.startswith("wandb: https://example.org:8443 did not answer within 3 s (no network?); logging offline")
    assert choose_wandb_mode(None, creds, probe=lambda url: True) == ("online", None)
    assert choose_wandb_mode("offline", nothing, probe=None) == ("offline", None)
    assert choose_wandb_mode("online", {"WANDB_MODE": "disabled"}, probe=None) == ("disabled", None)


def test_the_network_probe_answers_within_its_timeout():
    import http.server
    import threading

    class Unauthorized(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()  # accepts connections (the kernel does) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        assert reachable(f"http://127.0.0.1:{server.server_address[1]}")  # any status is an answer
        started = time.monotonic()
        assert not reachable(f"http://127.0.0.1:{closed_port()}")
        assert time.monotonic() - started < 1.0  # refused: at once
        started = time.monotonic()
        assert not reachable(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        assert 0.4 < time.monotonic() - started < 1.5  # silent: the timeout, not wandb's 110 s
    finally:
        server.shutdown()
        silent.close()


def test_wandb_online_start_failure_falls_back_unless_demanded(tmp_path, monkeypatch, capsys):
    import wandb

    modes = []

    def init(**kwargs):
        modes.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("Error communicating with wandb: 401 unauthorized\nmore detail")
        return object()

    monkeypatch.setattr(wandb, "init", init)
    logger = WandbLogger(tmp_path, "p", "n", {}, mode="online", fallback=True)
    assert logger.mode == "offline" and modes == ["online", "offline"]
    assert capsys.readouterr().err.strip() == ("wandb: online start failed (Error communicating with wandb: 401 "
                                               "unauthorized); logging offline instead (upload later with `wandb sync`)")
    with pytest.raises(ConfigError, match=r"^wandb could not start in online mode \(Error communicating"):
        WandbLogger(tmp_path, "p", "n", {}, mode="online", fallback=False)


def test_type_checks_follow_the_annotations():
    assert matches(3, int) and not matches(True, int) and not matches(3.0, int) and matches(3, float)
    assert matches(None, int | None) and matches([1, 2], tuple[int, ...]) and not matches([1, "a"], list[int])
    assert matches("auto", bool | str) and not matches(1, bool | str)
    assert matches(object(), torch.Tensor)  # an annotation configs cannot express accepts anything
    with pytest.raises(ConfigError, match=r"^trainer.foo is not an option of TrainerConfig \(options: epochs, "):
        check_keywords({"foo": 1}, train.TrainerConfig, "trainer.")


def test_every_experiment_passes_the_checks(monkeypatch):
    """No experiment of the repository trips the type checks (they are not stricter than the code)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    from omegaconf import OmegaConf

    names = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))
    choices = {"dataset.target": "sketch", "model.pretrained": "false"}  # what PACS leaves to the command line
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        for name in names:
            cfg = compose("train", overrides=[f"experiment={name}"])
            cfg = compose("train", overrides=[f"experiment={name}", *(f"{k}={choices[k]}" for k in OmegaConf.missing_keys(cfg))])
            resolved = OmegaConf.to_container(cfg, resolve=True)
            assert train.validate(resolved).mode == "offline", name


def test_errors_raised_in_dataloader_workers_are_one_line():
    class Broken(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise DatasetNotFoundError("data/x/img_1.jpg: unreadable image (image file is truncated)")

    with pytest.raises(DatasetNotFoundError) as err:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert "Original Traceback" in str(err.value)  # what PyTorch hands over: the worker's whole traceback
    assert train.one_line(err.value) == "data/x/img_1.jpg: unreadable image (image file is truncated)"


def test_unreadable_pacs_image_names_the_file(tmp_path):
    from PIL import Image

    from opl.data.pacs import PacsImages

    folder = tmp_path / "PACS" / "photo" / "dog"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "good.jpg", quality=90)
    (folder / "cut.jpg").write_bytes((folder / "good.jpg").read_bytes()[:300])  # a truncated JPEG
    images = PacsImages(tmp_path / "PACS", ["photo/dog/good.jpg", "photo/dog/cut.jpg"], [0, 0], [0, 0], ("photo",),
                        lambda image: image.size)
    assert images[0] == ((64, 64), 0)
    with pytest.raises(DatasetNotFoundError, match=r"cannot read image \S*PACS/photo/dog/cut.jpg: (?i:.*truncated)"):
        images[1]


# ============================================================================ a finished run
def test_a_finished_run_has_its_files_readable_and_a_log_of_its_lines(finished):
    names = sorted(p.name for p in finished.iterdir())
    assert names == ["DONE", "last.pt", "metrics.jsonl", "results.json", "run.lock", "run_config.json", "train.log"]
    assert (finished / "run.lock").read_text() == ""  # released
    log = (finished / "train.log").read_text().splitlines()
    assert log[0].startswith("=== ") and f"{HOST} pid {os.getpid()}: python train.py" in log[0]
    assert [line.split()[1] for line in log if line.startswith("epoch ")] == ["1/2", "2/2"]
    assert log[-1].startswith("done: final-epoch test top-1")
    umask = os.umask(0)
    os.umask(umask)
    for name in ("DONE", "last.pt", "metrics.jsonl", "results.json", "run_config.json", "train.log"):
        assert (finished / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    results = json.loads((finished / "results.json").read_text())
    fingerprint = digits(10, [0.3], [0.3]).fingerprint
    assert len(fingerprint) == 16 and results["data_fingerprint"] == fingerprint
    assert results["run_owner"] == json.loads((finished / "run_config.json").read_text())
    assert results["run_owner"]["data_fingerprint"] == fingerprint
    assert results["command"].startswith("python train.py logger=none")


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o007)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        JsonlWriter(tmp_path / "m.jsonl").write({"epoch": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o660
    assert (tmp_path / "m.jsonl").stat().st_mode & 0o777 == 0o660


def test_rerun_skips_and_another_configuration_is_refused(finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path / "run")
    before = (run / "results.json").read_bytes()
    assert run_here(run, *FAST) == 0
    assert "already finished" in capsys.readouterr().out
    assert run_here(run, *fast("loss.gamma=2.0")) == 2
    line = only_line(capsys.readouterr().err)
    assert "belongs to a run with another configuration or other data" in line and "loss.gamma: 0.5 -> 2.0" in line
    assert (run / "results.json").read_bytes() == before


def test_other_data_under_the_same_settings_never_reuses_a_folder(tmp_path, cifar10_format_root, capsys):
    """A changed dataset.root is left out of the run's identity; the data's fingerprint is not."""
    import pickle

    same = shutil.copytree(cifar10_format_root, tmp_path / "same")
    other = shutil.copytree(cifar10_format_root, tmp_path / "other")
    batch = other / "cifar-10-batches-py" / "test_batch"
    entry = pickle.loads(batch.read_bytes(), encoding="latin1")
    entry["data"][0, 0] ^= 1  # one pixel of one test image
    batch.write_bytes(pickle.dumps(entry, protocol=2))
    run = tmp_path / "run"
    cifar = ["dataset=cifar10", "dataset.download=false", "model.in_features=3072", "trainer.batch_size=50",
             "trainer.epochs=1", "logger=none", "trainer.progress=line"]
    assert run_here(run, *cifar, f"dataset.root={cifar10_format_root}") == 0
    first = json.loads((run / "results.json").read_text())
    assert run_here(run, *cifar, f"dataset.root={same}") == 0  # a byte-identical copy elsewhere: the same run
    assert "already finished" in capsys.readouterr().out
    assert run_here(run, *cifar, f"dataset.root={other}") == 2
    line = only_line(capsys.readouterr().err)
    assert "another configuration or other data" in line and f"data_fingerprint: '{first['data_fingerprint']}' -> '" in line
    assert json.loads((run / "results.json").read_text()) == first


# ============================================================================ the lock
def test_a_folder_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    with RunDir(run).locked():  # another open file description: a second holder, as another process would be
        assert run_here(run, *FAST) == 2
        line = only_line(capsys.readouterr().err)
    assert line.startswith(f"error: {run} is in use by process {os.getpid()} on host {HOST} (since ")
    assert "wait for it to finish" in line.lower() and f"kill {os.getpid()}" in line
    assert sorted(p.name for p in run.iterdir()) == ["run.lock"]  # nothing of the refused run


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text(json.dumps({"host": HOST, "pid": dead.pid, "since": "2026-01-01T00:00:00+00:00"}))
    assert run_here(run, *FAST) == 0
    out = capsys.readouterr().out
    note = (f"note: {run / 'run.lock'} was left by process {dead.pid} on host {HOST} (since 2026-01-01T00:00:00+00:00), "
            "which is no longer running; taking it over")
    assert note in out
    assert (run / "DONE").exists() and (run / "run.lock").read_text() == ""
    log = (run / "train.log").read_text().splitlines()
    assert log[0].startswith("=== ") and log[1] == note  # printed before train.log opened, and kept there


def test_two_processes_on_one_folder_and_ctrl_c(tmp_path):
    """Two real copies of one command started together: one runs, the other stops at once naming
    it. The one that runs, stopped with Ctrl-C, says where and how to resume, exits 130, and
    leaves a consistent folder."""
    run = tmp_path / "run"
    args = ["logger=none", "trainer.progress=line", "trainer.epochs=100000", "dataset.limit_train=128",
            "trainer.eval_every=1000", f"hydra.run.dir={run}"]
    procs = [start_cli(*args, stdout=subprocess.DEVNULL) for _ in range(2)]
    try:
        deadline = time.monotonic() + 300
        while all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "neither process stopped"
            time.sleep(0.2)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        assert loser.returncode == 2
        assert only_line(loser.communicate()[1]).startswith(
            f"error: {run} is in use by process {winner.pid} on host {HOST} (since ")
        while not (run / "last.pt").exists():
            assert winner.poll() is None and time.monotonic() < deadline, winner.communicate()
            time.sleep(0.2)
        assert json.loads((run / "run.lock").read_text())["pid"] == winner.pid
        winner.send_signal(signal.SIGINT)
        _, err = winner.communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert winner.returncode == 130
    line = only_line(err)
    checkpoint = torch.load(run / "last.pt", weights_only=True)["state"]["epoch"]
    assert line.startswith(f"interrupted at epoch {checkpoint + 1}; run the same command to resume"), line
    done = epochs_in(run)
    assert done in (list(range(1, checkpoint + 1)), list(range(1, checkpoint + 2)))  # the next start drops an extra line
    log = (run / "train.log").read_text().splitlines()
    assert log[-1] == line and sum(entry.startswith("=== ") for entry in log) == 1  # the loser wrote nothing
    assert (run / "run.lock").read_text() == "" and not list(run.glob(".*.tmp"))


# ============================================================================ crash windows
def crash_on(monkeypatch, owner, name, when, before=None):
    """Make `owner.name` die like a killed process (optionally after `before(*args)`) on the calls
    for which `when(self_or_first_arg)` is true."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if when(*args):
            if before is not None:
                before(*args)
            raise Killed(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def test_killed_during_the_first_checkpoint_write(tmp_path, monkeypatch, capsys):
    """The old failure: the epoch-1 line was written twice and the half-written checkpoint stayed."""
    run = tmp_path / "run"

    def half_written(trainer):
        (run / ".last.pt.k1l2l3.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")

    crash_on(monkeypatch, Trainer, "save_checkpoint", lambda trainer: True, before=half_written)
    with pytest.raises(Killed):
        run_here(run, *FAST)
    assert epochs_in(run) == [1] and not (run / "last.pt").exists()
    monkeypatch.undo()
    assert run_here(run, *FAST) == 0
    assert "note: removed 1 temporary file(s) left by an interrupted write: .last.pt.k1l2l3.tmp" in capsys.readouterr().out
    assert epochs_in(run) == [1, 2] and not list(run.glob(".*.tmp"))


def test_killed_while_appending_a_metrics_line(tmp_path, monkeypatch, capsys):
    """The old failure: the partial last line blocked every resume with a traceback."""
    run = tmp_path / "run"

    def partial(writer, record):
        with open(writer.path, "a") as f:
            f.write(json.dumps(record)[:25])

    crash_on(monkeypatch, JsonlWriter, "write", lambda writer, record: record["epoch"] == 2,
             before=partial)
    with pytest.raises(Killed):
        run_here(run, *FAST)
    assert not (run / "metrics.jsonl").read_text().endswith("\n")
    monkeypatch.undo()
    assert run_here(run, *FAST) == 0
    out = capsys.readouterr().out
    assert f"note: dropped the partial last line of {run / 'metrics.jsonl'}" in out and "at epoch 1" in out
    assert epochs_in(run) == [1, 2]


def test_a_damaged_metrics_line_inside_the_file_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_here(run, *fast("trainer.epochs=3")) == 0
    (run / "DONE").unlink()
    text = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([text[0], text[1][:30], text[2]]) + "\n")
    assert run_here(run, *fast("trainer.epochs=3")) == 2
    assert only_line(capsys.readouterr().err) == (
        f"error: {run / 'metrics.jsonl'}:2 is not valid JSON; delete that line, or pass force=true to start the run "
        "over (the old files are kept aside)")


def test_killed_between_results_and_done(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    original = RunDir.write_results

    def results_only(self, results):
        original(self, results)
        self.done_marker.unlink()
        raise Killed("before DONE")

    monkeypatch.setattr(RunDir, "write_results", results_only)
    with pytest.raises(Killed):
        run_here(run, *FAST)
    monkeypatch.undo()
    metrics = (run / "metrics.jsonl").read_bytes()
    assert run_here(run, *FAST) == 0
    assert "at epoch 2" in capsys.readouterr().out  # resumed at the end: nothing trained again
    assert (run / "DONE").exists() and (run / "metrics.jsonl").read_bytes() == metrics


def test_ctrl_c_while_writing_the_results_says_so_and_the_same_command_finishes(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"

    def interrupted(self, results):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "write_results", interrupted)
    assert run_here(run, *FAST) == 130
    message = ("interrupted after training, while writing results.json; run the same command to write it "
               "(no epoch is trained again)")
    assert only_line(capsys.readouterr().err) == message
    assert (run / "train.log").read_text().splitlines()[-1] == message
    monkeypatch.undo()
    metrics = (run / "metrics.jsonl").read_bytes()
    assert run_here(run, *FAST) == 0
    assert f"resuming {run / 'last.pt'} at epoch 2" in capsys.readouterr().out
    assert (run / "DONE").exists() and (run / "metrics.jsonl").read_bytes() == metrics


def test_ctrl_c_after_the_results_are_written_says_the_run_is_finished(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"

    class SyncingLogger:  # stands in for wandb, interrupted while it syncs at the end
        def __init__(self, *args, **kwargs):
            pass

        def log(self, metrics, step):
            pass

        def summary(self, metrics):
            pass

        def finish(self, exit_code=0):
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "WandbLogger", SyncingLogger)
    assert run_here(run, *fast("logger=wandb", "logger.mode=offline")) == 130
    assert only_line(capsys.readouterr().err) == ("interrupted after the run finished (results.json is written); "
                                                  "nothing is left to run")
    assert (run / "DONE").exists()


def test_a_run_without_a_classification_evaluator_finishes_with_a_plain_done_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_here(run, *fast("evaluators.classification=null")) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"done -> {run / 'results.json'}"
    assert json.loads((run / "results.json").read_text())["metrics"]["final_epoch_test"] == {"epoch": 2}


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_done_without_readable_results_is_re_derived(finished, tmp_path, damage, capsys):
    run = copy_of(finished, tmp_path / "run")
    before = json.loads((run / "results.json").read_text())
    if damage == "missing":
        (run / "results.json").unlink()
    else:
        (run / "results.json").write_text((run / "results.json").read_text()[:100])
    assert run_here(run, *FAST) == 0
    state = "missing" if damage == "missing" else "damaged"
    assert f"note: {run / 'results.json'} is {state}; re-deriving it from {run / 'last.pt'}" in capsys.readouterr().out
    after = json.loads((run / "results.json").read_text())
    assert after["metrics"]["final_epoch_test"] == before["metrics"]["final_epoch_test"]
    assert after["run_key"] == before["run_key"] and (run / "DONE").exists()


def test_done_without_results_or_checkpoint_names_the_files(finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path / "run")
    (run / "results.json").unlink()
    (run / "last.pt").unlink()
    assert run_here(run, *FAST) == 2
    assert only_line(capsys.readouterr().err) == (
        f"error: {run / 'DONE'} marks the run finished but {run / 'results.json'} is missing and there is no last.pt "
        "to re-derive it from; pass force=true to run it again (the old files are kept aside)")


def test_a_damaged_run_config_is_rewritten_only_when_the_folder_agrees(finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path / "run")
    owner = (run / "run_config.json").read_text()
    (run / "run_config.json").write_text(owner[:40])
    assert run_here(run, *FAST) == 0
    out = capsys.readouterr().out
    assert f"note: {run / 'run_config.json'} was damaged; rewritten" in out and "already finished" in out
    assert (run / "run_config.json").read_text() == owner
    (run / "run_config.json").unlink()
    assert run_here(run, *FAST) == 0
    assert f"note: {run / 'run_config.json'} was missing; rewritten" in capsys.readouterr().out
    assert (run / "run_config.json").read_text() == owner
    (run / "run_config.json").write_text(owner[:40])
    assert run_here(run, *fast("loss.gamma=2.0")) == 2
    assert only_line(capsys.readouterr().err) == (
        f"error: {run / 'run_config.json'} is damaged and {run / 'last.pt'} belongs to another configuration or other "
        "data; choose another hydra.run.dir, or pass force=true to move the old files aside")


# ============================================================================ Ctrl-C, NaN, force, eval
def test_ctrl_c_names_the_epoch_and_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    original = Trainer._train_epoch

    def interrupted(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", interrupted)
    assert run_here(run, *FAST) == 130
    assert only_line(capsys.readouterr().err) == "interrupted at epoch 2; run the same command to resume"
    assert (run / "train.log").read_text().splitlines()[-1] == "interrupted at epoch 2; run the same command to resume"
    monkeypatch.undo()
    assert run_here(run, *FAST) == 0
    assert f"resuming {run / 'last.pt'} at epoch 1" in capsys.readouterr().out
    assert epochs_in(run) == [1, 2]


def test_nan_stop_names_a_checkpoint_only_when_there_is_one(tmp_path):
    import functools

    from opl.losses import ce_plus_opl
    from opl.methods import StandardStep
    from opl.models import MLP

    class NanAt(torch.nn.Module):
        def __init__(self, step):
            super().__init__()
            self.inner, self.step, self.calls, self.needs_pairs = ce_plus_opl(), step, 0, True

        def forward(self, logits, features, labels, index=None):
            self.calls += 1
            parts = self.inner(logits, features, labels, index)
            if self.calls >= self.step:
                parts["loss"] = parts["loss"] * float("nan")
            return parts

    def trainer(run, at_step):
        data = digits(10, [0.3053], [0.3759], limit_train=128, limit_test=64)
        cfg = train.TrainerConfig(epochs=3, batch_size=32, device="cpu", log_every=1, progress="line")
        return Trainer(cfg, StandardStep(MLP(10, 64, (32,)), NanAt(at_step)), data,
                       functools.partial(torch.optim.SGD, lr=0.05), {"kind": "constant"}, run)

    with pytest.raises(NonFiniteLossError, match="stopped without saving, no checkpoint had been written yet$"):
        trainer(tmp_path / "a", at_step=2).fit()
    assert not (tmp_path / "a" / "last.pt").exists()
    with pytest.raises(NonFiniteLossError, match=re.escape(f"the last good checkpoint is {tmp_path / 'b' / 'last.pt'}") + "$"):
        trainer(tmp_path / "b", at_step=6).fit()  # 4 steps per epoch: step 6 is in epoch 2


def test_force_moves_every_file_of_the_run(finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path / "run")
    (run / "eval-last-0123abcd.json").write_text("{}")
    (run / "wandb").mkdir()
    (run / "wandb" / "run-x.wandb").write_text("x")
    (run / ".hydra").mkdir()  # what older versions left
    (run / "notes.txt").write_text("mine")
    old = sorted(p.name for p in run.iterdir() if p.name != "run.lock")
    assert run_here(run, *fast("force=true")) == 0
    out = capsys.readouterr().out
    archive = next(run.glob("superseded-*"))
    assert f"force=true: earlier files of {run} moved to {archive}" in out
    assert (run / "train.log").read_text().splitlines()[1] == f"force=true: earlier files of {run} moved to {archive}"
    assert sorted(p.name for p in archive.iterdir()) == old
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["DONE", "last.pt", "metrics.jsonl", "results.json", "run.lock", "run_config.json", "train.log", archive.name])


def test_each_evaluated_checkpoint_gets_its_own_eval_file(finished, tmp_path, capsys):
    run = tmp_path / "eval"
    other = tmp_path / "other.pt"
    state = torch.load(finished / "last.pt", weights_only=True)
    state["model"]["fc.bias"] += 1.0
    torch.save(state, other)
    for ckpt in (finished / "last.pt", finished / "last.pt", other):
        assert run_here(run, *fast("eval_only=true", f"ckpt_path={ckpt}")) == 0
    capsys.readouterr()
    files = sorted(p.name for p in run.glob("eval-*.json"))
    assert len(files) == 3
    import hashlib

    for path in run.glob("eval-*.json"):
        out = json.loads(path.read_text())
        sha = hashlib.sha256(Path(out["ckpt_path"]).read_bytes()).hexdigest()
        assert out["ckpt_sha256"] == sha and path.name.startswith(f"eval-{Path(out['ckpt_path']).stem}-{sha[:8]}")
        assert out["ckpt_epoch"] == 2 and out["data_fingerprint"] == digits(10, [0.3], [0.3]).fingerprint
    last = json.loads((finished / "results.json").read_text())["metrics"]["final_epoch_test"]["top1"]
    evaluated = [json.loads(p.read_text()) for p in run.glob("eval-last-*.json")]
    assert len(evaluated) == 2 and all(e["metrics"]["test_top1"] == pytest.approx(last) for e in evaluated)


# ============================================================================ folders
def test_run_folders_are_siblings_named_without_quoting(tmp_path):
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        plain = compose("train", overrides=["logger=none", "seed=3"], return_hydra_config=True)
        swept = compose("train", overrides=["logger=none", "seed=3", "loss.gamma=2.0", "trainer.epochs=1",
                                            "model.hidden=[32,16]", "trainer.device=cpu"], return_hydra_config=True)
    assert plain.hydra.run.dir == "runs/digits_opl/seed3/default"
    assert swept.hydra.run.dir == "runs/digits_opl/seed3/loss.gamma-2.0+model.hidden-%5B32%2C16%5D+trainer.epochs-1"
    assert swept.hydra.sweep.subdir == "seed3/loss.gamma-2.0+model.hidden-%5B32%2C16%5D+trainer.epochs-1"


@pytest.mark.parametrize("pairs", [
    [], [("loss.gamma", "2.0")], [("loss.gamma", "-1")], [("sched.milestones", "[60,120]")],
    [("+extra.key", "a=b,c d/e")], [("model", "resnet20"), ("dataset", "cifar10_jpg")], [("x", "100%")],
])
def test_folder_names_are_distinct_and_parse_back_unquoted(pairs):
    name = folder_name(pairs)
    path = f"runs/exp/seed0/{name}/last.pt"
    (override,) = OverridesParser.create().parse_overrides([f"ckpt_path={path}"])
    assert override.value() == path


def test_folder_names_of_distinct_overrides_differ():
    cases = [[("a", "1")], [("a", "-1")], [("a-", "1")], [("a", "1"), ("b", "2")], [("a", "1+b-2")],
             [("a", "1,b=2")], [("a", "[1,2]")], [("a", "%5B1%2C2%5D")], [("a.b", "1")], [("a", "b.1")]]
    assert len({folder_name(c) for c in cases}) == len(cases)


def test_unused_folders_are_removed_and_others_kept(tmp_path):
    inside = tmp_path / "work"
    (inside / "runs" / "other").mkdir(parents=True)  # an earlier run's folder
    (inside / "empty").mkdir()  # an empty folder that was there before
    since = time.time() + 0.05
    time.sleep(0.1)
    (inside / "runs" / "exp" / "seed0" / "default").mkdir(parents=True)
    remove_unused_folder(inside / "runs" / "exp" / "seed0" / "default", inside, since)
    assert sorted(p.name for p in (inside / "runs").iterdir()) == ["other"]  # every new, empty level went
    remove_unused_folder(inside / "empty", inside, since)
    assert (inside / "empty").is_dir()  # older than the process: not ours to remove
    kept = inside / "runs" / "b"
    kept.mkdir()
    (kept / "f").write_text("x")
    remove_unused_folder(kept, inside, since)
    assert (kept / "f").exists()


# ============================================================================ read-only folder, full disk
def test_read_only_folder_and_full_disk_name_the_path_and_errno(finished, tmp_path):
    """Real mounts in a private mount namespace (works as root, where chmod would not stop a write)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode:
        pytest.skip("cannot create a private mount namespace here (unshare -Urm): no read-only or full file "
                    "system to test with")
    ro = copy_of(finished, tmp_path / "ro" / "run")
    (ro / "DONE").unlink()
    (ro / "results.json").unlink()  # the run must write to finish
    full = tmp_path / "full"
    full.mkdir()
    args = " ".join(FAST)
    script = f"""
        mount --bind {ro.parent} {ro.parent} && mount -o remount,bind,ro {ro.parent} || exit 90
        mount -t tmpfs -o size=300k tmpfs {full} || exit 91
        ({sys.executable} train.py {args} hydra.run.dir={ro} 2> {tmp_path}/ro.err > /dev/null
         echo $? > {tmp_path}/ro.rc) &
        {sys.executable} train.py {args} hydra.run.dir={full}/run 2> {tmp_path}/full.err > /dev/null
        echo $? > {tmp_path}/full.rc
        ls -A {full}/run > {tmp_path}/full.ls
        wait
    """
    done = subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=400)
    if done.returncode in (90, 91):
        pytest.skip(f"mounts are not permitted in a private namespace here: {done.stderr.strip()}")
    assert (tmp_path / "ro.rc").read_text().strip() == "2"
    assert only_line((tmp_path / "ro.err").read_text()) == (
        f"error: {ro / 'run.lock'}: Read-only file system (EROFS); the file system is read-only: choose another "
        "hydra.run.dir")
    assert (tmp_path / "full.rc").read_text().strip() == "2"
    assert only_line((tmp_path / "full.err").read_text()) == (
        f"error: {full / 'run' / 'last.pt'}: No space left on device (ENOSPC); free disk space, then run the same "
        "command again to resume")
    left = (tmp_path / "full.ls").read_text().split()
    assert not [name for name in left if name.endswith(".tmp")] and "last.pt" not in left  # no orphan temporary
