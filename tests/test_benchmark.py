"""scripts/benchmark.py: the tiny CPU run end to end, its JSON record, and argument checking."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "benchmark.py"
TINY = ["--device", "cpu", "--model", "resnet20", "--batch-size", "16", "--steps", "3", "--warmup-steps", "1",
        "--ref-workers", "0", "--workers", "0", "--images", "128"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bench_script():
    spec = importlib.util.spec_from_file_location("opl_benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_reports_three_configs_and_consistent_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script(*TINY, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result  # stdout carries exactly the JSON record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # atomic write left no temp file

    configs = result["configs"]
    assert set(configs) == {"ours", "ours_ce", "reference"}
    for name, c in configs.items():
        assert math.isfinite(c["images_per_s"]) and c["images_per_s"] > 0, name
        assert c["steps"] == 3 and c["images"] == 3 * 16
        assert c["images_per_s"] == pytest.approx(c["images"] / c["seconds"])
        assert c["warmup_steps"] == 1 and c["warmup_s"] > 0
        assert math.isfinite(c["final_train_loss"])

    a, b, c = (configs[k]["images_per_s"] for k in ("ours", "ours_ce", "reference"))
    assert result["speedup_vs_reference"] == pytest.approx(a / c, rel=1e-12)
    assert result["opl_overhead"] == pytest.approx(1.0 - a / b, rel=1e-12, abs=1e-12)
    estimate = result["estimate_full_run"]
    assert estimate["images_per_epoch"] == 45_000  # the last, smaller batch is kept
    assert estimate["seconds"] == pytest.approx(200 * estimate["images_per_epoch"] / a + configs["ours"]["warmup_s"])
    assert "ESTIMATE" in estimate["note"] and "evaluation" in estimate["note"]

    # What each configuration ran: the trainer with CE+OPL / CE, and the authors'-style eager fp32 loop.
    ours, ours_ce, ref = (configs[k]["settings"] for k in ("ours", "ours_ce", "reference"))
    assert "OrthogonalProjectionLoss" in ours["criterion"] and "OrthogonalProjectionLoss" not in ours_ce["criterion"]
    assert ours["channels_last"] and not ours["compiled"] and ours["amp"] == "none"  # auto on CPU
    assert not ref["channels_last"] and not ref["compiled"] and not ref["fused"] and "OrthogonalProjectionLoss" in ref["criterion"]
    assert result["recipe"]["optimizer"]["lr"] == 0.1 and result["recipe"]["augment"]["brightness"] == 0.4
    assert result["args"]["steps"] == 3 and result["args"]["configs"] == ["a", "b", "c"]
    assert result["device"] and result["torch"] and result["timestamp"]


def test_invalid_argument_exits_nonzero_with_message():
    proc = run_script("--device", "cpu", "--steps", "0")
    assert proc.returncode != 0
    assert "--steps must be >= 1" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("argv, message", [
    (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--batch-size", "1"], "OPL compares pairs"),
    (["--model", "resnet18"], "is not a model of --recipe cifar100"),
    (["--configs", "a,x"], "unknown configuration"),
    (["--images", "8", "--batch-size", "16"], "at least one batch"),
    (["--ref-workers", "-1"], "--ref-workers"),
    (["--device", "tpu"], "auto, cpu, cuda or cuda:N"),
])
def test_bad_arguments_are_argparse_errors(bench_script, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        bench_script.parse_args(["--device", "cpu", *argv] if "--device" not in argv else argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_batch_of_one_is_allowed_without_opl(bench_script):
    args = bench_script.parse_args(["--device", "cpu", "--batch-size", "1", "--configs", "ours_ce"])
    assert args.configs == ["b"]


def test_main_on_real_cifar100_through_the_experiment_split(bench_script, cifar100_root, capsys):
    """Importable `main(argv)` on the real CIFAR-100 pickles (partial copy): the experiment's 10% split."""
    result = bench_script.main(["--device", "cpu", "--model", "resnet20", "--batch-size", "16", "--steps", "1",
                             "--warmup-steps", "0", "--workers", "0", "--configs", "a",
                             "--cifar-root", str(cifar100_root)])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result, default=str))
    assert result["data"]["variant"].startswith("cifar100/original|val=0.1@0")
    assert result["configs"]["ours"]["images_per_s"] > 0
    assert result["speedup_vs_reference"] is None and result["opl_overhead"] is None


def test_imagenet_mode_on_a_jpeg_tree_reports_the_data_path(bench_script, cifar10_jpg_format_root, capsys):
    """--recipe imagenet: timm ResNet-18 at 224 px, the three configurations on JPEGs read from disk
    (ours through the folder dataset, c through torchvision's ImageFolder), and the data path alone."""
    result = bench_script.main(["--recipe", "imagenet", "--model", "resnet18", "--device", "cpu", "--batch-size", "2",
                                "--steps", "1", "--warmup-steps", "0", "--ref-workers", "0", "--workers", "0",
                                "--images", "8", "--data-root", str(cifar10_jpg_format_root)])
    assert result["recipe"]["model"] == "resnet18" and result["data"]["num_classes"] == 10
    assert result["data"]["variant"].startswith("imagenet/folder|size=224|resize=256|train=8@0")
    assert {c["settings"]["experiment"] for c in result["configs"].values()} == {"imagenet_r18_opl", "imagenet_r18_ce"}
    assert result["configs"]["reference"]["settings"]["loader"] == "DataLoader(Subset, torchvision PIL transforms)"
    assert result["data_path"]["images_per_s"] > 0 and result["data_path"]["workers"] == 0
    estimate = result["estimate_full_run"]
    assert (estimate["epochs"], estimate["images_per_epoch"]) == (90, 1_281_167)


def test_imagenet_mode_refuses_a_cifar_model(bench_script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_script.parse_args(["--recipe", "imagenet", "--model", "resnet56"])
    assert exit_info.value.code == 2 and "resnet18, resnet50, resnet50d" in capsys.readouterr().err


def test_partial_batch_warning(bench_script):
    """Batch 512 over the default 45,000 images: 250 steps cross the epoch's end, whose last batch of
    456 compiles new graphs among the measured steps (docs/speed.md's batch-512 command avoids it)."""
    warning = bench_script.partial_batch_warning(45_000, 512, 50 + 200, drop_last=False)
    assert warning and "last batch of 456" in warning and "--images 128000" in warning
    assert 128_000 % 512 == 0 and 128_000 // 512 == 250  # the suggestion holds every step in one epoch
    assert bench_script.partial_batch_warning(65_536, 512, 20 + 100, drop_last=False) is None  # gpu_check's bench512
    assert bench_script.partial_batch_warning(45_000, 128, 50 + 200, drop_last=False) is None  # inside one epoch
    assert bench_script.partial_batch_warning(45_000, 512, 250, drop_last=True) is None  # no smaller batch
    assert bench_script.partial_batch_warning(1_024, 512, 5, drop_last=False) is None  # a multiple of the batch


def test_the_warning_is_printed_on_a_crossing_run(tmp_path):
    proc = run_script("--device", "cpu", "--model", "resnet20", "--batch-size", "16", "--steps", "2",
                      "--warmup-steps", "1", "--workers", "0", "--images", "40", "--configs", "b")
    assert proc.returncode == 0, proc.stderr
    assert "warning: 3 steps of 16 reach the end of an epoch of 40 images, whose last batch of 8" in proc.stderr
