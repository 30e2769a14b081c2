"""Weight porting between the frameworks, through the canonical tensors of expert_core.portable.

`port_torch_to_flax` / `port_flax_to_torch` apply the one rule table (OIHW <-> HWIO, linear
transpose, BatchNorm -> params + batch_stats); every mismatch is collected into one PortingError.
`load_any_checkpoint` reads a training checkpoint of either framework or a portable file;
`load_for_evaluation` adds how the run evaluated, for the scripts that evaluate or predict.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from expert_core import checkpoints
from expert_core.config import ModelConfig, TrainConfig, model_config_from_dict
from expert_core.portable import (PortingError, canonical_to_flax, check_canonical, flax_to_canonical,
                                  load_portable)
from expert_core.report import evaluation_settings, resolve_checkpoint


def torch_to_canonical(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, np.ndarray]:
    tensors = {key: value.detach().cpu().numpy().copy() for key, value in state_dict.items()}  # no aliasing
    check_canonical(tensors, config, "PyTorch -> canonical")
    return tensors


def canonical_to_torch(tensors: dict[str, np.ndarray], config: ModelConfig) -> dict[str, torch.Tensor]:
    check_canonical(tensors, config, "canonical -> PyTorch")
    return {key: torch.from_numpy(np.array(value)) for key, value in tensors.items()}


def port_torch_to_flax(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict:
    return canonical_to_flax(torch_to_canonical(state_dict, config), config)


def port_flax_to_torch(variables, config: ModelConfig) -> dict[str, torch.Tensor]:
    return canonical_to_torch(flax_to_canonical(variables, config), config)


def load_any_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], ModelConfig, str, dict]:
    """Canonical tensors, model config, origin ("torch", "flax" or "portable") of a checkpoint file, and
    what it records of its run (recipe, preset, epochs), read in one pass over the file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors, config, extra = load_portable(path)
        return tensors, config, "portable", extra
    checkpoint = checkpoints.read_checkpoint(path)
    config = model_config_from_dict(checkpoint.header["run"]["model"])
    run_record = {"train": checkpoint.header["run"]["train"], "epochs": len(checkpoint.header["history"])}
    framework = checkpoint.header["framework"]
    if framework == "torch":
        state = torch.load(io.BytesIO(checkpoint.payload), map_location="cpu", weights_only=True)
        return torch_to_canonical(state["model"], config), config, framework, run_record
    if framework == "flax":
        from flax.serialization import msgpack_restore

        state = msgpack_restore(checkpoint.payload)
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        return flax_to_canonical(variables, config), config, framework, run_record
    raise PortingError(f"load {path}", unexpected=[f"framework {framework!r}, expected 'torch' or 'flax'"])


@dataclass(frozen=True)
class EvaluationWeights:
    path: Path
    tensors: dict[str, np.ndarray]  # canonical
    config: ModelConfig
    origin: str  # "torch", "flax" or "portable"
    temperature: float  # the attention temperature of the run's own final evaluation
    recipe: TrainConfig  # the run's recipe: its test-time views


def load_for_evaluation(checkpoint: str | Path) -> EvaluationWeights:
    """A checkpoint file, or a run directory's weights, with the settings its run evaluated at."""
    path = resolve_checkpoint(checkpoint)
    tensors, config, origin, run_record = load_any_checkpoint(path)
    return EvaluationWeights(path, tensors, config, origin, *evaluation_settings(run_record, config, path))
