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
from expert_core.portable import UnreadableWeightsError, canonical_to_flax, flax_to_canonical, load_portable
from expert_core.report import evaluation_settings, resolve_checkpoint
from torch_reference.model import canonical_to_torch, torch_to_canonical


def port_torch_to_flax(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict:
    return canonical_to_flax(torch_to_canonical(state_dict, config), config)


def port_flax_to_torch(variables, config: ModelConfig) -> dict[str, torch.Tensor]:
    return canonical_to_torch(flax_to_canonical(variables, config), config)


def load_any_checkpoint(source: str | Path | checkpoints.Checkpoint
                        ) -> tuple[dict[str, np.ndarray], ModelConfig, str, dict]:
    """Canonical tensors, model config, origin ("torch", "flax" or "portable") of a checkpoint file (or
    one already read), and what it records of its run (recipe, preset, epochs, test subset)."""
    if not isinstance(source, checkpoints.Checkpoint):
        if Path(source).suffix == ".safetensors":
            tensors, config, extra = load_portable(source)
            return tensors, config, "portable", extra
        source = checkpoints.read_checkpoint(source)
    config, run_record = _recorded_run(source)
    framework = source.header["framework"]
    if framework == "torch":
        state = torch.load(io.BytesIO(source.payload), map_location="cpu", weights_only=True)
        return torch_to_canonical(state["model"], config), config, framework, run_record
    if framework == "flax":
        from flax.serialization import msgpack_restore

        state = msgpack_restore(source.payload)
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        return flax_to_canonical(variables, config), config, framework, run_record
    raise UnreadableWeightsError(f"load {source.path}", repr(framework), "the framework 'torch' or 'flax'")


def _recorded_run(checkpoint: checkpoints.Checkpoint) -> tuple[ModelConfig, dict]:
    run = checkpoint.header["run"]
    try:
        config = model_config_from_dict(run["model"])
    except (KeyError, TypeError, ValueError) as error:  # a field added or renamed by another version
        raise UnreadableWeightsError(f"load {checkpoint.path}", f"one this code cannot read ({error!r})",
                                     "a model config with the fields of expert_core.config.ModelConfig") from error
    return config, {"train": run["train"], "epochs": len(checkpoint.header["history"]),
                    "max_test_examples": run.get("max_test_examples")}


@dataclass(frozen=True)
class EvaluationWeights:
    path: Path
    tensors: dict[str, np.ndarray]  # canonical
    config: ModelConfig
    origin: str  # "torch", "flax" or "portable"
    temperature: float  # the attention temperature of the run's own final evaluation
    recipe: TrainConfig  # the run's recipe: its test-time views
    max_test_examples: int | None  # the run's test subset (None: all)


def load_for_evaluation(checkpoint: str | Path) -> EvaluationWeights:
    """A checkpoint file, or a run directory's weights, with the settings its run evaluated at."""
    source = resolve_checkpoint(checkpoint)
    path = source.path if isinstance(source, checkpoints.Checkpoint) else source
    tensors, config, origin, run_record = load_any_checkpoint(source)
    return EvaluationWeights(path, tensors, config, origin, *evaluation_settings(run_record, config, path),
                             run_record.get("max_test_examples"))
