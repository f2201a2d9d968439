"""scripts/gpu_check.py, the GPU check, in its CPU smoke mode (the GPU-only parts skip) and its
pieces: the JUnit report reader, argument checking, the refusal to call a CUDA-less run a pass, the
CUDA tests it collects, the order of its parts, a part's unexpected error, re-entrant locks for the
SIGTERM handler, and the commit it records."""

import importlib.util
import json
import os
import re
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("opl_gpu_check_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_run_reports_every_part(gpu_check, cifar10_jpg_format_root, tmp_path):
    archive = tmp_path / "cifar10-jpg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for folder in ("train", "test"):
            tar.add(cifar10_jpg_format_root / folder, arcname=folder)
    out = tmp_path / "out"
    summary = gpu_check.main([str(out), str(archive), "--cpu-smoke", "--work-dir", str(tmp_path / "work")])

    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "cpu-smoke" and summary["ok"] is True
    parts = summary["parts"]
    assert summary["statuses"] == {"pytest": "skipped", "bench128": "pass", "train": "pass", "eval": "pass",
                                   "bench512": "skipped"}
    # The real-data run and its evaluation come before the benchmarks (the 200-epoch estimate first).
    assert list(parts) == ["pytest", "train", "eval", "bench128", "bench512"]
    assert "no CUDA" in parts["pytest"]["note"] and "no CUDA" in parts["bench512"]["note"]

    comparison = parts["bench128"]["figures"]["capture_comparison"]
    assert set(comparison["images_per_s"]) == {"step_only", "with_augment", "whole_step"}
    assert comparison["fastest"] in comparison["images_per_s"] and comparison["relative_to_first"]["step_only"] == 1.0
    assert parts["bench128"]["result"]["configs"]["ours@whole_step"]["settings"]["capture"] == "whole_step"

    train = parts["train"]["figures"]
    assert train["epochs"] == 2 and 0.0 <= train["final_test_top1"] <= 100.0
    assert train["test_top1_per_epoch"][-1] == train["final_test_top1"]
    assert train["median_epoch_wall_s"] > 0 and train["first_epoch_end_s"] > 0
    assert train["estimate_200_epochs_s"] == pytest.approx(
        train["first_epoch_end_s"] + 199 * train["median_epoch_wall_s"], abs=0.2)
    assert parts["eval"]["figures"]["identical"] and parts["eval"]["figures"]["test_top1"] == train["final_test_top1"]

    files = sorted(p.name for p in out.iterdir())
    assert files == summary["files"] == ["bench.log", "eval.log", "gpu_check.log", "summary.json", "train.log"]
    assert "eval_only=true" in (out / "eval.log").read_text()


def test_without_cuda_and_smoke_mode_nothing_passes(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: False)
    summary = gpu_check.main([str(tmp_path), "--parts", "pytest,bench128"])
    assert summary["statuses"] == {"pytest": "skipped", "bench128": "skipped"} and summary["ok"] is False


def test_junit_report_is_read_per_test(gpu_check, tmp_path):
    report = tmp_path / "r.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu" name="test_a" time="1.5"/>'
        '<testcase classname="tests.test_gpu" name="test_b" time="2"><failure message="assert 1 == 2">long'
        '</failure></testcase>'
        '<testcase classname="tests.test_gpu" name="test_c" time="0"><skipped message="needs a CUDA device"/>'
        '</testcase></testsuite></testsuites>')
    parsed = gpu_check.parse_junit(report)
    assert parsed["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "errors": 0}
    assert parsed["tests"]["test_gpu::test_b"] == {"outcome": "failed", "seconds": 2.0, "message": "assert 1 == 2"}
    assert parsed["tests"]["test_gpu::test_a"] == {"outcome": "passed", "seconds": 1.5}


def test_bad_arguments_are_refused(gpu_check, tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.parse_args([str(tmp_path), "--parts", "pytest,nonsense"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args([str(tmp_path), str(tmp_path / "absent.tar.gz")])


def test_a_failing_capture_mode_is_reported_and_the_benchmark_goes_on(monkeypatch, capsys):
    """The benchmark measures the further capture modes after a, b and c; one that fails becomes an
    error entry instead of ending the run, and the comparison leaves it out."""
    spec = importlib.util.spec_from_file_location("opl_benchmark_script_capture", REPO / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    order = []

    def run_ours(key, name, capture, args, data, run_dir):
        order.append(name)
        if capture == "whole_step":
            raise RuntimeError("capture failed")
        return {"id": key, "name": name, "images_per_s": 100.0 if capture == "step_only" else 120.0,
                "steps": 1, "warmup_s": 0.0}

    monkeypatch.setattr(bench, "run_ours", run_ours)
    result = bench.main(["--device", "cpu", "--batch-size", "8", "--images", "16", "--steps", "1",
                         "--configs", "a,b", "--capture", "step_only,whole_step,with_augment"])
    capsys.readouterr()
    assert order == ["ours", "ours_ce", "ours@whole_step", "ours@with_augment"]
    assert result["configs"]["ours@whole_step"]["error"] == "RuntimeError: capture failed"
    comparison = result["capture_comparison"]
    assert comparison["images_per_s"] == {"step_only": 100.0, "with_augment": 120.0}
    assert comparison["fastest"] == "with_augment" and comparison["relative_to_first"]["with_augment"] == 1.2
    assert result["configs"]["ours"]["images_per_s"] == 100.0 and result["speedup_vs_reference"] is None


def test_the_pytest_part_collects_only_the_gpu_tests(gpu_check, tmp_path, monkeypatch):
    """Other test modules import scipy, sklearn or matplotlib at the top, absent from a bare GPU image:
    collecting them would be errors, and a false "fail"."""
    gpu_mark = re.compile(r"^(pytestmark\s*=.*|@)pytest\.mark\.gpu\b", re.MULTILINE)
    marked = sorted(p.name for p in (gpu_check.REPO_ROOT / "tests").glob("test_*.py")
                    if gpu_mark.search(p.read_text()))
    assert marked == [Path(gpu_check.GPU_TESTS).name] == ["test_gpu.py"]
    commands = []

    def run_process(cmd, log, timeout_s, env=None, on_line=None):
        commands.append(cmd)
        return {"rc": 0, "seconds": 1.0, "timed_out": False, "limit_s": timeout_s}

    monkeypatch.setattr(gpu_check, "run_process", run_process)
    check = gpu_check.Check(gpu_check.parse_args([str(tmp_path / "out"), "--work-dir", str(tmp_path / "w")]))
    check.cuda = True
    gpu_check.part_pytest(check)
    (cmd,) = commands
    assert cmd[cmd.index("pytest") + 1:].count(gpu_check.GPU_TESTS) == 1
    assert not [a for a in cmd if a.startswith("tests") and a != gpu_check.GPU_TESTS]
    assert "--continue-on-collection-errors" not in cmd


def test_an_unexpected_error_fails_its_part_and_the_others_still_run(gpu_check, tmp_path, monkeypatch):
    archive = tmp_path / "cifar10-jpg.tar.gz"
    archive.write_bytes(b"")

    def extract(tarball, dest):
        raise ValueError("unreadable\nsecond line")  # not an OSError: nothing in the script expects it

    def part_bench(check, part, batch):
        raise KeyError(part)

    monkeypatch.setattr(gpu_check, "extract", extract)
    monkeypatch.setattr(gpu_check, "part_bench", part_bench)
    out = tmp_path / "out"
    summary = gpu_check.main([str(out), str(archive), "--cpu-smoke", "--parts", "train,eval,bench128,bench512",
                              "--work-dir", str(tmp_path / "w")])
    assert summary["statuses"] == {"train": "fail", "eval": "skipped", "bench128": "fail", "bench512": "skipped"}
    assert summary["parts"]["train"]["note"] == "unexpected error: ValueError('unreadable\\nsecond line')"
    assert summary["parts"]["bench128"]["note"] == "unexpected error: KeyError('bench128')"
    assert summary["ok"] is False and json.loads((out / "summary.json").read_text()) == summary


def test_the_locks_are_reentrant_for_the_sigterm_handler(gpu_check, tmp_path):
    """The handler runs finish() (which takes check.lock) and kill_all() (ACTIVE_LOCK) in the main
    thread, possibly while that very thread holds them: with plain locks it would wait forever."""
    check = gpu_check.Check(gpu_check.parse_args([str(tmp_path / "out"), "--cpu-smoke", "--parts", "train",
                                                  "--work-dir", str(tmp_path / "w")]))
    done = threading.Event()

    def holder():
        with check.lock, gpu_check.ACTIVE_LOCK:
            gpu_check.kill_all()
            gpu_check.finish(check)
        done.set()

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    thread.join(30)
    assert done.is_set(), "finish() or kill_all() deadlocked on a lock its own thread holds"
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["statuses"] == {}


def test_the_commit_is_recorded_from_the_option_or_git(gpu_check, tmp_path, monkeypatch):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=gpu_check.REPO_ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert gpu_check.environment("0123abc")["commit"] == "0123abc"
    assert gpu_check.environment()["commit"] == head and gpu_check.environment()["commit_from"] == "git"
    monkeypatch.setattr(gpu_check, "REPO_ROOT", tmp_path)  # a copy without .git, as on a lent machine
    assert gpu_check.environment()["commit"] is None and gpu_check.environment()["commit_from"] is None
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: False)
    summary = gpu_check.main([str(tmp_path / "o"), "--parts", "pytest", "--commit", "feedbeef"])
    assert summary["environment"]["commit"] == "feedbeef" and summary["environment"]["commit_from"] == "--commit"


def test_the_wrapper_passes_the_commit_git_knows(tmp_path):
    """gpu_check.sh without CUDA (every part skipped, fast): the summary names this checkout's HEAD."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": "python3"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path), "--parts", "pytest"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert proc.returncode == 1 and summary["statuses"] == {"pytest": "skipped"}  # no CUDA: never a pass
    assert summary["environment"]["commit"] == head and summary["environment"]["commit_from"] == "--commit"
