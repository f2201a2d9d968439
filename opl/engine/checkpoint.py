"""Atomic checkpoint files, safe loading (`weights_only=True`) and RNG state capture."""

import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from opl.errors import CheckpointError
from opl.io import atomic_write


def atomic_save(obj, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""  # torch adds paragraphs of advice
        raise CheckpointError(f"{path} is corrupt or not a checkpoint of this project ({type(exc).__name__}: {first})") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} holds no 'model' state: not a checkpoint of this project")
    return state


def load_model_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """Strict load with a message naming what differs, instead of PyTorch's long dump."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        details = []
        if missing:
            details.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            details.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if shapes:
            details.append(f"shape mismatch: {'; '.join(shapes[:3])}")
        raise CheckpointError(f"{source} does not match this model ({', '.join(details)}); "
                              "check the model / dataset choice it was trained with")
    model.load_state_dict(state)


def tensors_to(state, device: torch.device):
    """`state` (nested dicts, lists, tuples) with every tensor moved to `device`."""
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, dict):
        return {key: tensors_to(value, device) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(tensors_to(value, device) for value in state)
    return state


def capture_rng_state(device: torch.device) -> dict:
    """Python, NumPy and torch generator states (CPU, and `device`'s own when it is a GPU), as CPU
    tensors and plain values. Only this process's GPU: under data-parallel training each rank
    restores its own device, whichever index it has after a restart."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
