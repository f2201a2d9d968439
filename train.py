"""Train or evaluate one configuration: `python train.py experiment=cifar100_opl [overrides]`.

Wiring only: Hydra composes the configuration, the library (`opl/`) does the work. Errors a user
can act on (missing data, bad values, corrupt checkpoints, NaN loss) print one message and exit 2.
"""

import json
import sys
import time
from datetime import datetime, timezone

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from opl.data.noise import LabelNoise, with_label_noise
from opl.engine.distributed import DistributedContext, broadcast_object
from opl.engine.run_dir import RunDir
from opl.engine.trainer import Trainer, TrainerConfig
from opl.errors import ConfigError, OPLError
from opl.io import atomic_write_json
from opl.logging import WandbLogger
from opl.results.records import run_key, strip_keys
from opl.runinfo import code_version, environment, resolve_device, sweep_device
from opl.seed import seed_everything


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


def build(cfg: DictConfig, run_dir, signature: str | None, loggers=()):
    seed_everything(cfg.seed)
    try:
        trainer_cfg = TrainerConfig(**cfg.trainer)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"trainer: {exc}") from exc
    data = instantiate_checked(cfg.dataset)
    if cfg.label_noise.kind != "none":
        try:
            noise = LabelNoise(cfg.label_noise.kind, cfg.label_noise.rate, cfg.label_noise.seed)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        data = with_label_noise(data, noise)
        facts = data.notes["label_noise"]
        print(f"label noise: {noise.kind} at rate {noise.rate}: {facts['flipped']} of {facts['train_samples']} "
              f"training labels changed (realised rate {facts['realised_rate']:.4f})")
    model = instantiate_checked(cfg.model)
    criterion = instantiate_checked(cfg.loss)
    step = instantiate_with(cfg.method, model=model, criterion=criterion, data=data)
    evaluators = {name: instantiate_checked(node) for name, node in cfg.evaluators.items() if node is not None}
    optimizer_factory = instantiate_checked(cfg.optim)
    schedule = OmegaConf.to_container(cfg.sched, resolve=True)
    return Trainer(trainer_cfg, step, data, optimizer_factory, schedule, run_dir, cfg.seed, evaluators=evaluators,
                   loggers=loggers, config_signature=signature), data


def run(cfg: DictConfig, ctx: DistributedContext) -> dict | None:
    """One configuration. In a data-parallel run every process executes this; rank 0 alone decides
    what to do with the run folder and writes files, logs and prints."""
    hydra_cfg = HydraConfig.get()
    run_dir = RunDir(hydra_cfg.runtime.output_dir)
    if ctx.enabled:
        device = resolve_device(ctx.device(cfg.trainer.device))
        ctx.init(device, cfg.dist_timeout_s)
        cfg.trainer.device = str(device)
    elif hydra_cfg.mode == RunMode.MULTIRUN and torch.cuda.is_available():
        cfg.trainer.device = sweep_device(cfg.trainer.device, hydra_cfg.job.num, torch.cuda.device_count())
    resolved = OmegaConf.to_container(cfg, resolve=True)
    owned_by = strip_keys(resolved, [k for k in hydra_cfg.job.config.override_dirname.exclude_keys if k != "seed"])
    signature = json.dumps(owned_by, sort_keys=True)

    if cfg.eval_only:
        if not cfg.ckpt_path:
            raise ConfigError("eval_only=true needs ckpt_path=<checkpoint file>")
        trainer, data = build(cfg, run_dir.path, None)
        trainer.load_weights(cfg.ckpt_path)
        metrics = trainer.evaluate_all()
        if ctx.is_main:
            out = {"ckpt_path": str(cfg.ckpt_path), "data_variant": data.variant, "metrics": metrics,
                   "environment": environment(trainer.device), "code": code_version()}
            atomic_write_json(run_dir.path / "eval.json", out)
            print(json.dumps(metrics, indent=2, sort_keys=True))
        return metrics

    action = None
    if ctx.is_main:
        if cfg.force:
            moved = run_dir.archive()
            if moved:
                print(f"force=true: earlier files of {run_dir.path} moved to {moved}")
        run_dir.claim(owned_by)
        action = run_dir.decide(cfg.resume, cfg.force)
    action = broadcast_object(action)
    if action == "skip":
        print(f"{run_dir.path} already finished (results.json); nothing to do. Pass force=true to run it again.")
        return json.loads(run_dir.results.read_text())

    loggers = []
    if cfg.logger.name == "wandb" and ctx.is_main:
        loggers.append(WandbLogger(run_dir.path, cfg.logger.project, cfg.name, resolved, mode=cfg.logger.mode,
                                   entity=cfg.logger.entity, tags=list(cfg.logger.tags)))
    elif cfg.logger.name != "none":
        raise ConfigError(f"logger must be wandb or none, got {cfg.logger.name!r}")
    started = time.time()
    try:
        trainer, data = build(cfg, run_dir.path, signature, loggers)
        if action == "resume":
            trainer.resume(run_dir.checkpoint)
            if ctx.is_main:
                print(f"resuming {run_dir.checkpoint} at epoch {trainer.state.epoch}")
        summary = trainer.fit()
        if not ctx.is_main:
            return None
        results = {
            "schema_version": 1,
            "name": cfg.name,
            "seed": cfg.seed,
            "data_variant": data.variant,
            "data_notes": data.notes,
            "data_fingerprint": data.fingerprint,
            # Initial weights loaded from a file or a hub (pretrained backbones), None when trained from scratch.
            "model_weights": {"source": getattr(trainer.model, "weights_source", None),
                              "sha256": getattr(trainer.model, "weights_sha256", None)},
            "run_key": run_key(owned_by, cfg.seed, data.variant),
            "metrics": summary,
            "experiment_config": owned_by,
            "config": resolved,
            "code": code_version(),
            "environment": {**environment(trainer.device), "world_size": trainer.world_size},
            "wall_time_s": time.time() - started,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_dir": str(run_dir.path),
        }
        for logger in loggers:
            logger.summary({"final_test_top1": (summary["final_epoch_test"] or {}).get("top1")})
        run_dir.write_results(results)
    finally:
        for logger in loggers:
            logger.finish()
    final = summary["final_epoch_test"]
    print(f"done: final-epoch test top-1 {final['top1']:.2f}%  top-5 {final['top5']:.2f}%  -> {run_dir.results}")
    return results


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig):
    ctx = DistributedContext.from_env()
    try:
        return run(cfg, ctx)
    except OPLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # Hydra finishes the sweep's other jobs, then reports this failure and exits non-zero.
            raise
        sys.exit(2)
    finally:
        ctx.close()


if __name__ == "__main__":
    main()
