"""The GPU check: the CUDA path proven in one short run on a fresh GPU machine (docs/gpu.md).

    bash scripts/gpu_check.sh OUT_DIR CIFAR10_JPG_TARBALL       # the shell wrapper installs .whl/ first
    python scripts/gpu_check.py OUT_DIR CIFAR10_JPG_TARBALL [--parts ...] [--hard-limit-s S] [--cpu-smoke]
                                [--commit SHA]

Parts, each in its own process with its own time limit, every one reporting pass / fail / skipped
/ timeout and its figures, none stopping the others (an unexpected error in one is that part's
failure, and the others still run):

  pytest    python -m pytest -q -m gpu tests/test_gpu.py: the CUDA tests (only that file, so that
            modules needing scipy, sklearn or matplotlib, absent from a bare GPU image, are never
            collected)
  train     a real-data run, `train.py experiment=cifar10_opl dataset=cifar10_jpg` for 15 epochs on
            the extracted archive: final test top-1, epoch times, and the extrapolated time of the
            full 200-epoch CIFAR-100 run with its per-epoch evaluation (same image counts: 45,000
            train, 5,000 validation, 10,000 test)
  eval      `train.py ... eval_only=true` on that run's checkpoint: the same test top-1
  bench128  scripts/benchmark.py at the paper's recipe (ResNet-56, batch 128): a (ours, CE+OPL),
            b (ours, CE), c (the authors'-style loop), and "ours" under every trainer.capture mode
            side by side, with the fastest mode named
  bench512  the benchmark again at batch 512

To fit about 8 minutes, the compile-heavy, untimed work runs first and concurrently (the CUDA
tests, the extraction, and one short benchmark process per compiled configuration of bench128 and
bench512 that fills torch.compile's on-disk caches); the timed parts then run one after the other,
in the order above, so their figures are not disturbed and the 200-epoch estimate (train, eval)
comes before the benchmarks. Every process is killed by `--hard-limit-s` after the start, and a
part starts only while its usual duration still fits before it (else it is reported as skipped),
so the check always returns its summary. The benchmark's warm-up figures are therefore warm-cache
figures; the real-data run compiles cold, inside its first epoch.

Output (flat, few files): OUT_DIR/summary.json (written after every part), gpu_check.log (this
script's own log), pytest.log, bench.log, train.log, eval.log. Scratch (extracted data, run
folders) goes to --work-dir (default: a temporary folder).

--cpu-smoke runs the same parts on the CPU at tiny sizes (the CPU test of this script): the GPU-only
parts (pytest, cache warming, bench512) report "skipped: no CUDA".
"""

import argparse
import concurrent.futures
import json
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from opl.io import atomic_write_text  # noqa: E402

PARTS = ("pytest", "train", "eval", "bench128", "bench512")  # in the order they run
GPU_TESTS = "tests/test_gpu.py"  # the only module with gpu-marked tests
CAPTURE_MODES = "step_only,with_augment,whole_step"
FULL_RUN_EPOCHS = 200  # the CIFAR-100 recipe (configs/experiment/cifar100_ce.yaml)
TARGETS = {"speedup_vs_reference_min": 5.0, "speedup_vs_reference_moonshot": 8.0, "opl_overhead_max": 0.03,
           "full_run_s_max": 600.0}  # issue 10, item 5
MAX_LOG_BYTES = 4 << 20
TOP1_TOLERANCE = 0.05  # percentage points between the run's last evaluation and eval_only (bf16, autotuned kernels)

# Time limits (seconds) of each process; the hard limit cuts them shorter. With their usual
# durations (pytest and the cache warm-up well under their limits, train about 130 s, eval 30 s),
# train and eval run within the default 480 s before the benchmarks; a slow untimed phase or a
# train run near its limit leaves eval out, and the summary says so.
LIMITS = {"pytest": 240, "prewarm": 200, "train": 240, "eval": 90, "bench128": 170, "bench512": 150}
# A part starts only with at least this long left before the hard limit (its expected duration).
MIN_START = {"train": 130, "eval": 30, "bench128": 90, "bench512": 80}
# The untimed phase runs several compiling processes at once: fewer compile workers each keeps
# them from swamping the CPU (the thread count is not part of the compile caches' keys).
CONCURRENT_ENV = {"TORCHINDUCTOR_COMPILE_THREADS": "4"}
ACTIVE: set = set()  # running child processes (each the leader of its own process group)
ACTIVE_LOCK = threading.RLock()  # re-entrant: the SIGTERM handler may interrupt its holder


# ------------------------------------------------------------------------------------ processes
def run_process(cmd: list[str], log: Path, timeout_s: float, env: dict | None = None, on_line=None) -> dict:
    """Run `cmd` in its own process group, its output appended to `log` (and each line passed to
    `on_line(line, seconds_since_start)`); killed with its children after `timeout_s`."""
    start = time.monotonic()
    with open(log, "a", encoding="utf-8", errors="replace") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1, start_new_session=True)
        with ACTIVE_LOCK:
            ACTIVE.add(proc)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            kill_group(proc)

        timer = threading.Timer(max(1.0, timeout_s), kill)
        timer.start()
        try:
            for line in proc.stdout:
                f.write(line)
                if on_line is not None:
                    on_line(line, time.monotonic() - start)
            rc = proc.wait()
        finally:
            timer.cancel()
            with ACTIVE_LOCK:
                ACTIVE.discard(proc)
        seconds = time.monotonic() - start
        f.write(f"[exit {rc}{' (killed: time limit)' if timed_out.is_set() else ''} after {seconds:.1f} s]\n")
    return {"rc": rc, "seconds": round(seconds, 2), "timed_out": timed_out.is_set(), "limit_s": round(timeout_s, 1)}


def kill_group(proc: subprocess.Popen) -> None:
    """The process and everything it started (compile workers, DataLoader workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_all() -> None:
    with ACTIVE_LOCK:
        procs = list(ACTIVE)
    for proc in procs:
        kill_group(proc)


def one_line(exc: BaseException) -> str:
    return " ".join(repr(exc).split())[:300]


def guarded(check: "Check", part: str, run, *args):
    """`run(*args)`; an unexpected exception becomes `part`'s failure (its repr in the note) instead
    of ending the check, so the later parts and the summary still come."""
    try:
        return run(*args)
    except Exception as exc:
        check.record(part, {"status": "fail", "note": f"unexpected error: {one_line(exc)}"})
        return None


def status_of(finished: dict) -> str:
    return "timeout" if finished["timed_out"] else ("pass" if finished["rc"] == 0 else "fail")


def clip_log(path: Path) -> None:
    """Keep the last MAX_LOG_BYTES of a log (the device tool returns files of limited size)."""
    if path.exists() and path.stat().st_size > MAX_LOG_BYTES:
        data = path.read_bytes()[-MAX_LOG_BYTES:]
        path.write_bytes(b"[... earlier output cut ...]\n" + data)


# ------------------------------------------------------------------------------------ the check
class Check:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.lock = threading.RLock()  # re-entrant: the SIGTERM handler's finish() may interrupt its holder
        self.cuda = False if args.cpu_smoke else cuda_available()
        self.summary = {
            "schema_version": 1,
            "check": "gpu_check",
            "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "environment": environment(args.commit),
            "hard_limit_s": args.hard_limit_s,
            "targets": TARGETS,
            "parts": {},
        }

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        """Until the hard limit."""
        return self.args.hard_limit_s - self.elapsed()

    def limit(self, part: str) -> float:
        """A part's process limit: its own, cut to end by the hard limit."""
        return min(LIMITS[part], max(1.0, self.remaining()))

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f} s] {message}"
        print(line, flush=True)
        with self.lock, open(self.out / "gpu_check.log", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def record(self, part: str, result: dict) -> None:
        with self.lock:
            self.summary["parts"][part] = result
        self.write()
        self.log(f"{part}: {result.get('status')}{(' (' + result['note'] + ')') if result.get('note') else ''}")

    def write(self) -> None:
        """summary.json as it stands (after every part, so a cut run leaves its figures)."""
        with self.lock:
            self.summary["wall_s"] = round(time.monotonic() - self.started, 1)
            self.summary["files"] = sorted({"summary.json"} | {p.name for p in self.out.iterdir()
                                                                if p.is_file() and not p.name.startswith(".")})
            atomic_write_text(self.out / "summary.json", json.dumps(self.summary, indent=2, default=str) + "\n")

    def wanted(self, part: str) -> bool:
        return part in self.args.parts

    def may_start(self, part: str) -> bool:
        if self.remaining() >= MIN_START.get(part, 0):
            return True
        self.record(part, {"status": "skipped", "note": f"out of time: {self.remaining():.0f} s left before the "
                                                        f"{self.args.hard_limit_s:.0f} s limit, {MIN_START[part]} s needed"})
        return False

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]


def cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def environment(commit: str | None = None) -> dict:
    """Versions, the GPU, and the code's commit: `commit` (--commit) where given, since the
    checkout on a lent machine may have no .git, else git's HEAD."""
    info = {"python": sys.version.split()[0], "host_cpus": os.cpu_count(),
            "packages": {name: installed_version(name) for name in ("torch", "torchvision", "timm", "hydra-core",
                                                                     "omegaconf", "pytest", "pytest-xdist")}}
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if gpu.returncode == 0:
            info["gpu"] = gpu.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if commit:
        info["commit"], info["commit_from"] = commit, "--commit"
        return info
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        info["commit"] = head.stdout.strip() if head.returncode == 0 and head.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    info["commit_from"] = "git" if info["commit"] else None
    return info


def installed_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------ pytest
def parse_junit(path: Path) -> dict:
    """Counts and per-test outcome, seconds and (first line of) message of a JUnit XML report."""
    root = ET.parse(path).getroot()
    tests, counts = {}, {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        outcome, message = "passed", None
        for tag, label in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                outcome, message = label, (node.get("message") or node.text or "").strip().splitlines()[:1]
                message = message[0][:300] if message else ""
                break
        counts[outcome] += 1
        tests[name] = {"outcome": outcome, "seconds": round(float(case.get("time", 0.0)), 2),
                       **({"message": message} if message else {})}
    return {"counts": counts, "tests": tests}


def part_pytest(check: Check) -> None:
    if not check.cuda:
        check.record("pytest", {"status": "skipped", "note": "no CUDA: the GPU tests skip themselves"})
        return
    report = check.work / "pytest.xml"
    cmd = check.python("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={report}",
                       GPU_TESTS, *check.args.pytest_args)
    if installed_version("pytest-xdist"):
        cmd += ["-n", str(check.args.pytest_workers)]
    env = {**os.environ, **CONCURRENT_ENV,
           "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")}
    finished = run_process(cmd, check.out / "pytest.log", check.limit("pytest"), env=env)
    result = {"status": status_of(finished), **finished}
    if report.exists():
        result.update(parse_junit(report))
        if result["counts"]["passed"] == 0 and result["status"] == "pass":
            result["status"] = "fail"
            result["note"] = "no GPU test ran"
    check.record("pytest", result)


# ------------------------------------------------------------------------------------ benchmark
def bench_args(check: Check, batch: int) -> list[str]:
    if check.args.cpu_smoke:  # "ours" under each capture mode (a/b/c end to end: tests/test_benchmark.py)
        return ["--device", "cpu", "--model", "resnet20", "--batch-size", "8", "--steps", "1", "--warmup-steps", "1",
                "--images", "16", "--workers", "0", "--configs", "a", "--capture", CAPTURE_MODES]
    if batch == 128:  # the defaults: 50 warm-up + 200 timed steps, inside one epoch of 45,000 images
        return ["--batch-size", "128", "--capture", CAPTURE_MODES]
    # 120 steps of 512 stay inside one epoch of 65,536 images (no smaller last batch, no new graph)
    return ["--batch-size", "512", "--steps", "100", "--warmup-steps", "20", "--images", "65536"]


def prewarm_jobs(check: Check) -> dict[str, list[str]]:
    """One short benchmark process per compiled configuration of the timed benchmarks, by name:
    each compiles exactly the graphs the timed run will (same recipe, batch and capture mode),
    filling the on-disk compile caches."""
    script = str(REPO_ROOT / "scripts" / "benchmark.py")
    # Three steps on 1,024 images: the graphs depend on the batch, not on the number of images.
    short = ["--steps", "1", "--warmup-steps", "2", "--images", "1024", "--out", os.devnull]
    jobs = {}
    if check.wanted("bench128"):
        jobs.update({f"a128_{mode}": check.python(script, "--configs", "a", "--capture", mode, "--batch-size", "128",
                                                  *short) for mode in CAPTURE_MODES.split(",")})
        jobs["b128"] = check.python(script, "--configs", "b", "--batch-size", "128", *short)
    if check.wanted("bench512"):
        for key in "ab":
            jobs[f"{key}512"] = check.python(script, "--configs", key, "--batch-size", "512", *short)
    return jobs


def bench_figures(result: dict) -> dict:
    configs = result.get("configs", {})
    speedup, overhead = result.get("speedup_vs_reference"), result.get("opl_overhead")
    figures = {
        "device": result.get("device"),
        "images_per_s": {name: round(c["images_per_s"], 1) for name, c in configs.items() if "error" not in c},
        "warmup_s": {name: round(c["warmup_s"], 2) for name, c in configs.items() if "error" not in c},
        "errors": {name: c["error"] for name, c in configs.items() if "error" in c},
        "speedup_vs_reference": speedup,
        "opl_overhead": overhead,
        "capture_comparison": result.get("capture_comparison"),
        "estimate_200_epochs_train_only_s": (result.get("estimate_full_run") or {}).get("seconds"),
    }
    if speedup is not None:
        figures["meets_speedup_target"] = speedup >= TARGETS["speedup_vs_reference_min"]
        figures["meets_speedup_moonshot"] = speedup >= TARGETS["speedup_vs_reference_moonshot"]
    if overhead is not None:
        figures["meets_opl_overhead_target"] = overhead <= TARGETS["opl_overhead_max"]
    return figures


def part_bench(check: Check, part: str, batch: int) -> None:
    if not check.may_start(part):
        return
    out = check.work / f"{part}.json"
    cmd = check.python(str(REPO_ROOT / "scripts" / "benchmark.py"), *bench_args(check, batch), "--out", str(out))
    finished = run_process(cmd, check.out / "bench.log", check.limit(part))
    result = {"status": status_of(finished), **finished}
    if out.exists():
        full = json.loads(out.read_text())
        result["figures"] = bench_figures(full)
        result["result"] = full
        if result["figures"]["errors"]:
            result.update(status="fail", note="failed: " + ", ".join(result["figures"]["errors"]))
        comparison = result["figures"]["capture_comparison"]
        if comparison:
            check.log("capture modes: " + ", ".join(f"{mode} {ips:.0f} images/s" for mode, ips in
                                                    comparison["images_per_s"].items())
                      + f"; fastest: {comparison['fastest']}")
    elif result["status"] == "pass":
        result.update(status="fail", note=f"no result file {out}")
    check.record(part, result)


# ------------------------------------------------------------------------------------ real data
def extract(tarball: Path, dest: Path) -> Path:
    """The dataset root inside the extracted archive: the folder holding train/ and test/."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(dest, filter="data")
    for candidate in (dest, *sorted(p for p in dest.iterdir() if p.is_dir())):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    raise FileNotFoundError(f"no train/ and test/ folders in {tarball}")


def train_overrides(check: Check, data_root: Path) -> list[str]:
    common = ["experiment=cifar10_opl", "dataset=cifar10_jpg", f"dataset.root={data_root}", "logger=none",
              "trainer.progress=line"]
    if check.args.cpu_smoke:
        return common + ["trainer.device=cpu", "model=resnet20", "trainer.epochs=2", "trainer.batch_size=16",
                         "trainer.eval_batch_size=64", "trainer.num_workers=0", "sched.milestones=[1]"]
    # 15 epochs with the recipe's multistep decay moved to epochs 8 and 12, so the short run ends at a
    # low learning rate and its accuracy means something; per-epoch cost is the recipe's.
    return common + ["trainer.epochs=15", "sched.milestones=[8,12]"]


def train_figures(run_dir: Path, epoch_lines: list[tuple[int, float]], seconds: float) -> dict:
    """Accuracy and timing of the real-data run (of the epochs it finished, if it was cut short), and
    the 200-epoch extrapolation."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    finished = (run_dir / "results.json").exists()
    walls = [b - a for (_, a), (_, b) in zip(epoch_lines, epoch_lines[1:])]  # epoch end to epoch end
    steady_train = [r["epoch_time_s"] for r in records if not r.get("warmup")]
    figures = {
        "finished": finished,
        "final_test_top1": records[-1].get("test_top1"),
        "final_test_top5": records[-1].get("test_top5"),
        "epochs": len(records),
        "test_top1_per_epoch": [r.get("test_top1") for r in records],
        "first_epoch_end_s": round(epoch_lines[0][1], 2) if epoch_lines else None,  # start-up, data, compile, epoch 1
        "warmup_epoch_train_s": round(records[0]["epoch_time_s"], 2),
        "median_epoch_train_s": round(statistics.median(steady_train), 3) if steady_train else None,
        "median_epoch_wall_s": round(statistics.median(walls), 3) if walls else None,
        "median_train_images_per_s": round(statistics.median(r["images_per_s"] for r in records if not r.get("warmup")), 1)
        if steady_train else None,
        "process_s": round(seconds, 2),
    }
    if finished:  # the figure train.py reports: the last epoch's evaluation
        final = json.loads((run_dir / "results.json").read_text())["metrics"]["final_epoch_test"]
        figures.update(final_test_top1=final["top1"], final_test_top5=final["top5"])
    if walls and steady_train:
        figures["median_eval_and_checkpoint_s"] = round(statistics.median(walls) - statistics.median(steady_train), 3)
    if epoch_lines and walls:
        estimate = epoch_lines[0][1] + (FULL_RUN_EPOCHS - 1) * statistics.median(walls)
        figures["estimate_200_epochs_s"] = round(estimate, 1)
        figures["estimate_note"] = (
            "start of the process to the end of epoch 1 (start-up, data, compilation) + 199 x the median "
            "steady epoch (training, evaluation of validation and test with feature geometry, checkpoint); "
            "CIFAR-100's run has the same image counts and model apart from its 100-way head")
        figures["meets_full_run_target"] = estimate <= TARGETS["full_run_s_max"]
    return figures


def part_train(check: Check, data_root: Path | None) -> dict | None:
    if data_root is None or not check.may_start("train"):
        return None
    run_dir = check.work / "train_run"
    cmd = check.python("train.py", *train_overrides(check, data_root), f"hydra.run.dir={run_dir}")
    epoch_lines = []

    def on_line(line: str, at: float) -> None:
        if line.startswith("epoch "):
            epoch_lines.append((int(line.split()[1].split("/")[0]), at))

    finished = run_process(cmd, check.out / "train.log", check.limit("train"), on_line=on_line)
    result = {"status": status_of(finished), **finished, "run_dir": str(run_dir)}
    if (run_dir / "metrics.jsonl").exists():
        result["figures"] = train_figures(run_dir, epoch_lines, finished["seconds"])
    if result["status"] == "pass" and not (run_dir / "results.json").exists():
        result.update(status="fail", note="the run wrote no results.json")
    check.record("train", result)
    return result


def part_eval(check: Check, data_root: Path | None, trained: dict | None) -> None:
    if trained is None or not trained.get("figures", {}).get("finished"):
        check.record("eval", {"status": "skipped", "note": "no finished real-data run to evaluate"})
        return
    if not check.may_start("eval"):
        return
    run_dir = check.work / "eval_run"
    checkpoint = Path(trained["run_dir"]) / "last.pt"
    cmd = check.python("train.py", *train_overrides(check, data_root), "eval_only=true", f"ckpt_path={checkpoint}",
                       f"hydra.run.dir={run_dir}")
    finished = run_process(cmd, check.out / "eval.log", check.limit("eval"))
    result = {"status": status_of(finished), **finished}
    written = sorted(run_dir.glob("eval-*.json"))  # eval-<checkpoint>-<hash>.json (docs/runs.md)
    if written:
        top1 = json.loads(written[-1].read_text())["metrics"]["test_top1"]
        trained_top1 = trained["figures"]["final_test_top1"]
        difference = abs(top1 - trained_top1)
        result["figures"] = {"test_top1": top1, "run_final_test_top1": trained_top1, "difference": difference,
                             "identical": top1 == trained_top1, "tolerance": TOP1_TOLERANCE}
        if difference > TOP1_TOLERANCE:
            result.update(status="fail", note=f"eval_only gives {top1:.2f}, the run ended at {trained_top1:.2f}")
    elif result["status"] == "pass":
        result.update(status="fail", note="eval_only wrote no eval-*.json")
    check.record("eval", result)


# ------------------------------------------------------------------------------------ phases
def untimed_phase(check: Check) -> Path | None:
    """The CUDA tests, the cache-warming benchmark processes and the extraction, concurrently."""
    data_root = None

    def extraction():
        nonlocal data_root
        start = time.monotonic()
        try:
            data_root = extract(Path(check.args.tarball), check.work / "cifar10_jpg")
            check.log(f"extracted {check.args.tarball} to {data_root} in {time.monotonic() - start:.1f} s")
        except (OSError, tarfile.TarError) as exc:
            check.record("train", {"status": "fail", "note": f"could not extract {check.args.tarball}: {exc}"})

    def prewarm():
        try:
            warm_caches()
        except Exception as exc:  # not a part: the benchmarks then compile cold (a longer warmup_s)
            check.summary["prewarm"] = {"error": one_line(exc)}
            check.log(f"cache warming failed: {one_line(exc)}")

    def warm_caches():
        jobs = prewarm_jobs(check) if check.cuda else {}
        if not jobs:
            return
        logs = check.work / "prewarm"
        logs.mkdir(exist_ok=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            env = {**os.environ, **CONCURRENT_ENV}
            futures = {name: pool.submit(run_process, cmd, logs / f"{name}.log", check.limit("prewarm"), env)
                       for name, cmd in jobs.items()}
            finished = {name: future.result() for name, future in futures.items()}
        check.summary["prewarm"] = finished
        check.log("compile caches warmed: " + ", ".join(f"{name} rc {f['rc']} in {f['seconds']:.0f} s"
                                                        for name, f in finished.items()))
        with open(check.out / "bench.log", "a", encoding="utf-8") as out:
            for log in sorted(logs.glob("*.log")):
                out.write(f"--- cache warming {log.name} (last 40 lines)\n")
                out.writelines(log.read_text(errors="replace").splitlines(keepends=True)[-40:])

    jobs = [prewarm]
    if check.wanted("pytest"):
        jobs.append(lambda: guarded(check, "pytest", part_pytest, check))
    if check.args.tarball and (check.wanted("train") or check.wanted("eval")):
        jobs.append(lambda: guarded(check, "train", extraction))
    elif check.wanted("train"):
        check.record("train", {"status": "skipped", "note": "no CIFAR-10 JPEG archive given"})
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()
    return data_root


def main(argv=None) -> dict:
    args = parse_args(argv)
    check = Check(args)

    def stop(signum, frame):  # e.g. the wrapper's `timeout`: end the children too, keep the summary
        kill_all()
        check.summary["interrupted"] = f"signal {signum} after {check.elapsed():.0f} s"
        finish(check)
        sys.exit(124)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return run_parts(check)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_parts(check: Check) -> dict:
    args = check.args
    check.log(f"gpu_check ({check.summary['mode']}): parts {','.join(args.parts)}, hard limit {args.hard_limit_s:.0f} s, "
              f"CUDA {'yes' if check.cuda else 'no'}, work dir {check.work}")
    if not check.cuda and not args.cpu_smoke:
        for part in args.parts:
            check.record(part, {"status": "skipped", "note": "no CUDA device (--cpu-smoke runs the CPU plumbing)"})
        return finish(check)
    data_root = untimed_phase(check)
    # The real-data run and its evaluation first: the 200-epoch estimate is worth more than a benchmark.
    trained = None
    if check.wanted("train") and data_root is not None:
        trained = guarded(check, "train", part_train, check, data_root)
    if check.wanted("eval"):
        guarded(check, "eval", part_eval, check, data_root, trained)
    if check.wanted("bench128"):
        guarded(check, "bench128", part_bench, check, "bench128", 128)
    if check.wanted("bench512"):
        if check.cuda:
            guarded(check, "bench512", part_bench, check, "bench512", 512)
        else:
            check.record("bench512", {"status": "skipped", "note": "no CUDA: the CPU smoke run measures one size"})
    return finish(check)


def finish(check: Check) -> dict:
    statuses = {name: part.get("status") for name, part in check.summary["parts"].items()}
    check.summary["statuses"] = statuses
    # Without CUDA only the CPU smoke run can pass: a GPU check that ran nothing is not a pass.
    check.summary["ok"] = (check.cuda or check.args.cpu_smoke) and all(s in ("pass", "skipped") for s in statuses.values())
    check.log(f"done in {time.monotonic() - check.started:.0f} s: "
              + ", ".join(f"{k} {v}" for k, v in statuses.items()) + f" -> {check.out / 'summary.json'}")
    for name in ("pytest.log", "bench.log", "train.log", "eval.log", "gpu_check.log"):
        clip_log(check.out / name)
    check.write()
    return check.summary


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check.py", description="The GPU check of the CUDA path (docs/gpu.md).")
    p.add_argument("out_dir", help="folder for summary.json and the logs (created)")
    p.add_argument("tarball", nargs="?", default=None, help="the CIFAR-10 JPEG archive (cifar10-jpg.tar.gz)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--hard-limit-s", type=float, default=480.0,
                   help="every process is killed by this many seconds after the start, and a part starts only if "
                        "its usual duration fits before it (default 480: the 8 minutes the check may take)")
    p.add_argument("--work-dir", default=None, help="scratch folder (default: a new temporary folder)")
    p.add_argument("--pytest-workers", type=int, default=6, help="pytest-xdist processes where installed (default 6)")
    p.add_argument("--pytest-args", nargs="*", default=[], help="extra pytest arguments, e.g. a test file")
    p.add_argument("--cpu-smoke", action="store_true", help="the same parts on the CPU at tiny sizes (plumbing only)")
    p.add_argument("--commit", default=None,
                   help="the code's git commit, recorded in summary.json (default: git rev-parse HEAD, which a "
                        "checkout copied without .git lacks; gpu_check.sh passes it where git knows it)")
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {','.join(PARTS)}")
    if args.tarball is not None and not Path(args.tarball).is_file():
        p.error(f"{args.tarball} is not a file")
    return args


if __name__ == "__main__":
    summary = main()
    sys.exit(0 if summary["ok"] else 1)
