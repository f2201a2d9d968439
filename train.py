"""Train or evaluate one configuration: `python train.py experiment=cifar100_opl [overrides]`.

Wiring only: Hydra composes the configuration, the library (`opl/`) does the work. Every option is
checked before anything is built or written; errors a user can act on (wrong types, impossible
values, missing data, a busy or foreign run folder, a full disk) print one line and exit 2; Ctrl-C
exits 130 with the epoch it stopped in. A failed sweep job does not stop the others; the sweep
exits non-zero at the end (`failure_policy`). docs/runs.md describes run folders, resume, locking
and the messages.
"""

import contextlib
import errno
import io
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import torch
from opl.config_types import check_finite, check_keywords, check_targets
from opl.data.noise import LabelNoise, with_label_noise
from opl.engine.distributed import DistributedContext, broadcast_object
from opl.engine.gpu_claim import GpuClaim, claim_gpu, cuda_names, default_lock_dir
from opl.engine.run_dir import RunDir, folder_name, owner_signature, remove_unused_folder
from opl.engine.schedule import lr_factor
from opl.engine.trainer import Trainer, TrainerConfig
from opl.errors import ConfigError, OPLError
from opl.io import atomic_write_json
from opl.logging import RunLog, Tee, WandbLogger, choose_wandb_mode
from opl.results.records import keyed_config, run_key, strip_keys
from opl.runinfo import code_version, environment, resolve_device
from opl.seed import seed_everything

PROCESS_START = time.time()  # folders created after this and left empty by a failed start are removed
FAILED_JOBS: list[str] = []  # sweep jobs of this process that failed (the sweep goes on, then exits 2)


def run_folder_name(task_overrides, exclude_keys) -> str:
    """The last part of a run folder: `default`, or this job's overrides that change the experiment
    (opl.engine.run_dir.folder_name). Hydra resolver `opl_run_folder`."""
    excluded = set(exclude_keys)
    parsed = OverridesParser.create().parse_overrides([str(o) for o in task_overrides])
    return folder_name([tuple(o.input_line.split("=", 1)) if "=" in o.input_line else (o.input_line, "")
                        for o in parsed if o.key_or_group not in excluded])


OmegaConf.register_new_resolver("opl_run_folder", run_folder_name, replace=True)


# ------------------------------------------------------------------------------------------ building
def instantiate_checked(node, **kwargs):
    """`hydra.utils.instantiate`, with the library's own errors surfaced unchanged.

    Hydra wraps constructor errors in its own exception; a user should see "gamma must be >= 0"
    or "no CIFAR-100 at <path>", so library errors are unwrapped and plain ValueErrors (impossible
    values rejected by a constructor) become ConfigError.
    """
    try:
        return instantiate(node, **kwargs)
    except OPLError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    except Exception as exc:
        cause = exc.__cause__
        if isinstance(cause, OPLError):
            raise cause from None
        if isinstance(cause, ValueError):
            raise ConfigError(str(cause)) from exc
        raise


def instantiate_with(node, **objects):
    """`instantiate_checked` for constructors that also take live objects (model, data, ...), which
    must not pass through OmegaConf."""
    factory = instantiate_checked(node, _partial_=True)
    try:
        return factory(**objects)
    except OPLError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _run_control(name: str, seed: int, resume: str, force: bool, eval_only: bool, dist_timeout_s: float,
                 ckpt_path: str | None = None):
    """The top-level options (their annotations are what `validate` checks)."""


def _logger(name: str, project: str | None = None, entity: str | None = None, mode: str | None = None,
            tags: list[str] | None = None):
    """The logger node's options."""


@dataclass
class WandbChoice:
    mode: str | None  # None: no wandb
    fallback: bool = False  # may go offline if the online start fails (the mode was not demanded)
    warning: str | None = None


def validate(resolved: dict) -> WandbChoice:
    """Every user-facing option's type and the values no constructor checks, before anything is
    built or written. Returns how to run wandb."""
    check_keywords({k: resolved.get(k) for k in ("name", "seed", "resume", "force", "eval_only", "dist_timeout_s",
                                                 "ckpt_path")}, _run_control, "")
    check_keywords(resolved["logger"], _logger, "logger.")
    check_keywords(resolved["trainer"], TrainerConfig, "trainer.")
    check_keywords(resolved["sched"], lr_factor, "sched.", skip=("iters_per_epoch", "epochs"))
    check_keywords(resolved["label_noise"], LabelNoise, "label_noise.")
    check_targets({k: v for k, v in resolved.items() if k != "neutral"})
    check_finite(resolved)
    if not resolved["dist_timeout_s"] > 0:
        raise ConfigError(f"dist_timeout_s={resolved['dist_timeout_s']}: expected a number of seconds > 0")
    resolve_device(resolved["trainer"]["device"])  # a device torch does not know, or CUDA without a GPU
    if resolved["resume"] not in ("auto", "never"):
        raise ConfigError(f"resume={resolved['resume']!r}: expected auto or never")
    if resolved["eval_only"]:
        if not resolved["ckpt_path"]:
            raise ConfigError("eval_only=true needs ckpt_path=<checkpoint file>")
        if not Path(resolved["ckpt_path"]).is_file():
            raise ConfigError(f"ckpt_path={resolved['ckpt_path']}: no such checkpoint file")
    lr = resolved["optim"].get("lr")
    if lr is not None and not lr > 0:
        raise ConfigError(f"optim.lr={lr}: expected a learning rate > 0")
    try:
        lr_factor(iters_per_epoch=1, epochs=1, **resolved["sched"])
    except ValueError as exc:
        raise ConfigError(f"sched: {exc}") from exc
    logger = resolved["logger"]["name"]
    if logger not in ("wandb", "none"):
        raise ConfigError(f"logger={logger!r}: expected wandb or none")
    if logger == "none" or resolved["eval_only"]:  # an evaluation logs nothing to wandb
        return WandbChoice(None)
    mode, warning = choose_wandb_mode(resolved["logger"].get("mode"))
    return WandbChoice(mode, not (os.environ.get("WANDB_MODE") or resolved["logger"].get("mode")), warning)


@dataclass
class Parts:
    """Everything a run needs, built (and so checked) before its folder is touched."""

    trainer_cfg: TrainerConfig
    data: object
    step: object
    evaluators: dict
    optimizer_factory: object
    schedule: dict
    notes: list = field(default_factory=list)


def build_parts(cfg: DictConfig) -> Parts:
    seed_everything(cfg.seed)
    try:
        trainer_cfg = TrainerConfig(**cfg.trainer)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"trainer: {exc}") from exc
    notes = []
    data = instantiate_checked(cfg.dataset)
    if cfg.label_noise.kind != "none":
        try:
            noise = LabelNoise(cfg.label_noise.kind, cfg.label_noise.rate, cfg.label_noise.seed)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        data = with_label_noise(data, noise)
        facts = data.notes["label_noise"]
        notes.append(f"label noise: {noise.kind} at rate {noise.rate}: {facts['flipped']} of {facts['train_samples']} "
                     f"training labels changed (realised rate {facts['realised_rate']:.4f})")
    model = instantiate_checked(cfg.model)
    criterion = instantiate_checked(cfg.loss)
    step = instantiate_with(cfg.method, model=model, criterion=criterion, data=data)
    evaluators = {name: instantiate_checked(node) for name, node in cfg.evaluators.items() if node is not None}
    optimizer_factory = instantiate_checked(cfg.optim)
    try:  # the optimizer's own checks (momentum, weight decay, ...) before any folder is used
        optimizer_factory([torch.zeros(1, requires_grad=True)])
    except ValueError as exc:
        raise ConfigError(f"optim: {exc} (check the optim.* values)") from exc
    schedule = OmegaConf.to_container(cfg.sched, resolve=True)
    return Parts(trainer_cfg, data, step, evaluators, optimizer_factory, schedule, notes)


def make_trainer(cfg: DictConfig, parts: Parts, run_dir: Path, signature: str | None, loggers=()) -> Trainer:
    return Trainer(parts.trainer_cfg, parts.step, parts.data, parts.optimizer_factory, parts.schedule, run_dir,
                   cfg.seed, evaluators=parts.evaluators, loggers=loggers, config_signature=signature)


def build(cfg: DictConfig, run_dir, signature: str | None, loggers=()):
    """(Trainer, data) of a configuration, for code that drives a Trainer itself (tests, scripts)."""
    parts = build_parts(cfg)
    return make_trainer(cfg, parts, run_dir, signature, loggers), parts.data


# ------------------------------------------------------------------------------------------ one job
IN_PROCESS_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
POOL_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"  # hydra/launcher=gpus


def failure_policy(multirun: bool, launcher: str, ctx: DistributedContext) -> str:
    """How a job that failed with an explained error (status 2) ends:

    - "defer": Hydra's default launcher runs a sweep's jobs one after another in this process; the
      job returns so the next one runs, and the sweep exits 2 at the end naming every failed job;
    - "raise": joblib's process pool (hydra/launcher=gpus); exiting would end the sweep's other
      running jobs too, so the job raises and Hydra records it, runs the others and exits non-zero
      at the end;
    - "exit": anything else (one run, each job its own process as under SLURM, any process of a
      data-parallel run): exit with the status now, so the launcher (srun, sacct, submitit) sees it.
    """
    if not multirun or ctx.enabled:
        return "exit"
    return {IN_PROCESS_LAUNCHER: "defer", POOL_LAUNCHER: "raise"}.get(launcher, "exit")


class SweepJobFailed(CompactHydraException):
    """Raised by a failed job of a joblib sweep; Hydra prints its one line (no traceback) at the end."""


@dataclass
class Job:
    """What a run needs from Hydra: its folder, the keys left out of its identity, its command."""

    output_dir: Path
    exclude_keys: list
    multirun: bool = False
    command: str = "python train.py"
    number: int = 0  # the job's number in its sweep
    # This process's place in a data-parallel run (torchrun, SLURM): every process runs the job,
    # rank 0 alone decides what to do with the run folder and writes files, logs and prints.
    ctx: DistributedContext = field(default_factory=DistributedContext)
    on_failure: str = "exit"  # failure_policy
    trainer: Trainer | None = None  # set once built, for the Ctrl-C message
    # For the Ctrl-C message: starting | training (fit() runs) | finishing (writing results.json) |
    # finished (results.json written; closing the loggers)
    stage: str = "starting"
    gpu: GpuClaim | None = None  # the GPU this sweep job holds (released when it ends)

    @classmethod
    def from_hydra(cls) -> "Job":
        hc = HydraConfig.get()
        multirun, ctx = hc.mode == RunMode.MULTIRUN, DistributedContext.from_env()
        return cls(Path(hc.runtime.output_dir), list(hc.job.config.override_dirname.exclude_keys), multirun,
                   shlex.join(["python", "train.py", *hc.overrides.task]), hc.job.get("num") or 0, ctx,
                   failure_policy(multirun, hc.launcher.get("_target_", ""), ctx))


def shown(path: Path) -> Path:
    """`path` relative to the working directory when inside it (as a user would type it)."""
    path = Path(path).absolute()
    cwd = Path.cwd()
    return path.relative_to(cwd) if path == cwd or cwd in path.parents else path


def evaluate_checkpoint(cfg: DictConfig, parts: Parts, run_dir: RunDir, job: Job) -> dict:
    """eval_only=true: the checkpoint's metrics, in a new eval-<checkpoint>-<hash>.json."""
    trainer = make_trainer(cfg, parts, run_dir.path, None)
    ckpt = trainer.load_weights(cfg.ckpt_path)
    metrics = trainer.evaluate_all()
    if not job.ctx.is_main:
        return metrics
    path, sha256 = run_dir.eval_file(cfg.ckpt_path)
    epoch = (ckpt.get("state") or {}).get("epoch", ckpt.get("epoch"))
    atomic_write_json(path, {"ckpt_path": str(cfg.ckpt_path), "ckpt_sha256": sha256, "ckpt_epoch": epoch,
                             "data_variant": parts.data.variant, "data_fingerprint": parts.data.fingerprint,
                             "metrics": metrics, "environment": environment(trainer.device), "code": code_version()})
    print(json.dumps(metrics, indent=2, sort_keys=True))
    print(f"wrote {path}")
    return metrics


def place(cfg: DictConfig, job: Job) -> None:
    """This process's device: its GPU in a data-parallel run (joining the process group), or, for a
    sweep job with trainer.device=auto on a machine with several GPUs, a GPU no other job holds
    (opl.engine.gpu_claim; the sweep's jobs may run side by side)."""
    if job.ctx.enabled:
        device = resolve_device(job.ctx.device(cfg.trainer.device))
        job.ctx.init(device, cfg.dist_timeout_s)
        cfg.trainer.device = str(device)
    elif (job.multirun and cfg.trainer.device == "auto" and torch.cuda.is_available()
          and torch.cuda.device_count() > 1):
        names = cuda_names()
        job.gpu = claim_gpu(names, job.number % len(names), default_lock_dir())
        cfg.trainer.device = f"cuda:{job.gpu.index}"


def require_choices(cfg: DictConfig) -> None:
    """Values a configuration leaves open (`???`, e.g. PACS's target domain and pretrained weights)
    must come from the command line: one line naming them, before anything is built."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{', '.join(missing)}: no value; this experiment needs it on the command line, e.g. "
                          f"{missing[0]}=<value> (configs/experiment/{cfg.get('name', '<name>')}.yaml and its "
                          "groups' configs list the choices)")


def execute(cfg: DictConfig, job: Job) -> dict | None:
    require_choices(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    wandb = validate(resolved)
    run_dir = RunDir(shown(job.output_dir))
    place(cfg, job)
    parts = build_parts(cfg)
    if wandb.warning and job.ctx.is_main:
        print(wandb.warning, file=sys.stderr)
    if cfg.eval_only:
        return evaluate_checkpoint(cfg, parts, run_dir, job)

    owned_by = strip_keys(resolved, [k for k in job.exclude_keys if k != "seed"])
    owner = {"config": keyed_config(owned_by), "data_variant": parts.data.variant,
             "data_fingerprint": parts.data.fingerprint}
    job.trainer = make_trainer(cfg, parts, run_dir.path, owner_signature(owner))  # its last checks, nothing written
    if not job.ctx.is_main:  # rank 0 holds the folder; the others follow its decision
        action = broadcast_object(None)
        if isinstance(action, StoppedOnRankZero):
            raise action
        return train(cfg, resolved, owned_by, owner, parts, run_dir, job, action, WandbChoice(None))
    with contextlib.ExitStack() as held:
        try:
            action, log = take_folder(cfg, run_dir, owner, job, held)
        except BaseException as exc:
            # Tell the other ranks (waiting in the broadcast) at once, instead of after dist_timeout_s.
            broadcast_object(StoppedOnRankZero.of(exc))
            raise
        broadcast_object(action)
        if action == "skip":
            print(f"{run_dir.path} already finished (results.json); nothing to do. Pass force=true to run it again.")
            return run_dir.finished_results()
        try:
            return train(cfg, resolved, owned_by, owner, parts, run_dir, job, action, wandb)
        except BaseException as exc:
            message, _ = failure(exc, job)
            if message:
                log.error(message)
            raise


class StoppedOnRankZero(OPLError):
    """On the other ranks of a data-parallel run: rank 0 stopped before training (its one line)."""

    @classmethod
    def of(cls, exc: BaseException) -> "StoppedOnRankZero":
        if isinstance(exc, (OPLError, OSError)):
            return cls(one_line(exc))
        return cls(f"rank 0 stopped before training ({type(exc).__name__}); its output says why")


def take_folder(cfg: DictConfig, run_dir: RunDir, owner: dict, job: Job, held: contextlib.ExitStack):
    """Rank 0: lock the run folder (held until `held` closes), claim it and decide what to do
    ("fresh", "resume" or "skip"); unless skipping, open train.log (held too) with this start's
    notes (lock taken over, temporaries removed, files archived, run_config.json rewritten), which
    are printed before the log can be opened. Returns (action, the log or None)."""
    notes = io.StringIO()
    with contextlib.redirect_stdout(Tee(sys.stdout, notes)):
        held.enter_context(run_dir.locked())
        run_dir.remove_temporaries()
        if cfg.force:
            moved = run_dir.archive()
            if moved:
                print(f"force=true: earlier files of {run_dir.path} moved to {moved}")
        run_dir.claim(owner)
        action = run_dir.decide(cfg.resume, cfg.force)
    if action == "skip":
        return action, None
    run_dir.require_writable()
    header = (f"=== {datetime.now(timezone.utc).isoformat(timespec='seconds')} {socket.gethostname()} "
              f"pid {os.getpid()}: {job.command}")
    return action, held.enter_context(RunLog(run_dir.log_file, header + "\n" + notes.getvalue()))


def train(cfg, resolved, owned_by, owner, parts, run_dir, job, action, wandb: WandbChoice) -> dict:
    if action == "skip":
        return None
    for note in parts.notes if job.ctx.is_main else ():
        print(note)
    trainer = job.trainer
    if wandb.mode is not None:
        trainer.loggers.append(WandbLogger(run_dir.path, cfg.logger.project, cfg.name, resolved, mode=wandb.mode,
                                           entity=cfg.logger.entity, tags=list(cfg.logger.tags),
                                           fallback=wandb.fallback))
    started = time.time()
    exit_code = 1
    try:
        if action == "resume":
            trainer.resume(run_dir.checkpoint)
            if job.ctx.is_main:
                print(f"resuming {run_dir.checkpoint} at epoch {trainer.state.epoch}")
        job.stage = "training"
        summary = trainer.fit()
        job.stage = "finishing"
        if not job.ctx.is_main:
            exit_code = 0
            return None
        data = parts.data
        results = {
            "schema_version": 1,
            "name": cfg.name,
            "seed": cfg.seed,
            "data_variant": data.variant,
            "data_fingerprint": data.fingerprint,
            "data_notes": data.notes,
            # Initial weights loaded from a file or a hub (pretrained backbones), None when trained from scratch.
            "model_weights": {"source": getattr(trainer.model, "weights_source", None),
                              "sha256": getattr(trainer.model, "weights_sha256", None)},
            "run_key": run_key(owned_by, cfg.seed, data.variant),
            "run_owner": owner,
            "metrics": summary,
            "experiment_config": owned_by,
            "config": resolved,
            "command": job.command,
            "code": code_version(),
            "environment": {**environment(trainer.device), "world_size": trainer.world_size},
            "wall_time_s": time.time() - started,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_dir": str(run_dir.path),
        }
        for logger in trainer.loggers:
            logger.summary({"final_test_top1": (summary["final_epoch_test"] or {}).get("top1")})
        run_dir.write_results(results)
        job.stage = "finished"
        exit_code = 0
    finally:
        for logger in trainer.loggers:
            logger.finish(exit_code=exit_code)
    final = summary["final_epoch_test"] or {}  # without a classification evaluator: no top-1 / top-5
    shown_metrics = "  ".join(f"{name} {final[key]:.2f}%" for key, name in (("top1", "top-1"), ("top5", "top-5"))
                              if key in final)
    print(f"done: final-epoch test {shown_metrics}  -> {run_dir.results}" if shown_metrics
          else f"done -> {run_dir.results}")
    return results


# ------------------------------------------------------------------------------------------ messages
ERRNO_HINTS = {
    errno.ENOSPC: "free disk space, then run the same command again to resume",
    errno.EDQUOT: "free disk space (quota), then run the same command again to resume",
    errno.EROFS: "the file system is read-only: choose another hydra.run.dir",
    errno.EACCES: "make it writable, or choose another hydra.run.dir",
    errno.EPERM: "make it writable, or choose another hydra.run.dir",
    errno.EFBIG: "the file size limit (ulimit -f) was reached",
}


def one_line(exc: BaseException) -> str:
    """The message of an error as one line (an error raised in a DataLoader worker arrives wrapped
    in the worker's traceback: its own message is the last line)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        where = f"{exc.filename}: " if exc.filename else ""
        hint = ERRNO_HINTS.get(exc.errno)
        return f"{where}{exc.strerror} ({name}){'; ' + hint if hint else ''}"
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        name, sep, message = last.partition(": ")
        return message if sep and name.rsplit(".", 1)[-1] == type(exc).__name__ else last
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def failure(exc: BaseException, job: Job) -> tuple[str | None, int]:
    """(the one line to print, the exit status) for what stopped a job; (None, 1) for a bug."""
    if isinstance(exc, KeyboardInterrupt):
        if job.stage == "starting":
            return "interrupted before training started; run the same command to start it", 130
        if job.stage == "finishing":
            return ("interrupted after training, while writing results.json; run the same command to write it "
                    "(no epoch is trained again)"), 130
        if job.stage == "finished":
            return "interrupted after the run finished (results.json is written); nothing is left to run", 130
        restart, finished = job.trainer.checkpoint_epoch + 1, job.trainer.state.epoch
        span = f"epochs {restart}-{finished}" if finished > restart else f"epoch {restart}"
        redo = f" ({span} finished after the last checkpoint and will run again)" if finished >= restart else ""
        return f"interrupted at epoch {restart}; run the same command to resume{redo}", 130
    if isinstance(exc, (OPLError, OSError)):
        return f"error: {one_line(exc)}", 2
    return None, 1


def run_job(cfg: DictConfig, job: Job) -> int:
    """Run one job; print what stopped it as one line. The exit status: 0, 2 (an error the message
    explains) or 130 (Ctrl-C). Anything else is a bug and keeps its traceback."""
    finished = False
    try:
        execute(cfg, job)
        finished = True
        return 0
    except (KeyboardInterrupt, OPLError, OSError) as exc:
        message, code = failure(exc, job)
    finally:
        if job.trainer is not None:
            job.trainer.close()
        if job.gpu is not None:
            job.gpu.release()
        job.ctx.close(finished)
    print(message, file=sys.stderr)
    remove_unused_folder(job.output_dir, Path.cwd(), PROCESS_START)
    return code


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig):
    job = Job.from_hydra()
    code = run_job(cfg, job)
    if code == 2 and job.on_failure == "defer":
        FAILED_JOBS.append(job.command)  # Hydra goes on with the sweep's next job in this process
    elif code == 2 and job.on_failure == "raise":
        raise SweepJobFailed("error: this job of the sweep failed (its message is above); the sweep's other jobs "
                             "ran, and every failed job printed its own line")
    elif code and job.ctx.enabled:
        # A process of a data-parallel run that stops with an error leaves c10d threads (the rendezvous
        # store, gloo's connections) that can abort the interpreter's shutdown while a peer is still
        # connected ("terminate called without an active exception", status -6): everything is closed
        # and written by now, so end at once with the status.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    elif code:
        sys.exit(code)


if __name__ == "__main__":
    main()
    if FAILED_JOBS:
        print(f"error: {len(FAILED_JOBS)} job(s) of the sweep failed (messages above): {'; '.join(FAILED_JOBS)}",
              file=sys.stderr)
        sys.exit(2)
