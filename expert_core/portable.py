"""Canonical weights: one naming and layout that both frameworks convert to and from.

Canonical names and layouts are PyTorch's state-dict ones (OIHW kernels, (out, in) linear weights,
BatchNorm running statistics), held as numpy arrays. The Flax side reaches them through the rule
table below, which needs only numpy, so either framework can write and read the portable
`.safetensors` file without importing the other.

Rules, one per kind of tensor (torch leaf -> Flax collection/leaf, layout change):
| torch leaf            | rank | Flax                         | layout                         |
| conv `weight`         | 4    | params `kernel`              | OIHW -> HWIO                   |
| expert `kernels`      | 5    | params `kernels`             | (K, O, I, H, W) -> (K, H, W, I, O) |
| linear `weight`       | 2    | params `kernel`              | (out, in) -> (in, out)         |
| BatchNorm `weight`    | 1    | params `scale`               | same                           |
| `bias`                | 1    | params `bias`                | same                           |
| `running_mean`        | 1    | batch_stats `mean`           | same                           |
| `running_var`         | 1    | batch_stats `var`            | same                           |
| `num_batches_tracked` | 0    | none (unused: momentum is set); Flax -> torch writes 0 |
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from expert_core.config import ModelConfig, model_config_from_dict, to_dict
from expert_core.files import arrays_checksum, atomic_write_bytes

FORMAT = "expert-cnn-portable"
# 2: metadata carries `tensors_sha256`, so damaged tensor bytes never load; 3: `sha256` covers the model
# config and the run's record (recipe, temperature) too. Version 2 files still load.
FORMAT_VERSION = 3
READABLE_VERSIONS = ("2", str(FORMAT_VERSION))  # the checksum check below knows these two
UNUSED_IN_FLAX = "num_batches_tracked"


class WeightsError(ValueError):
    """Weights this code cannot load: an unreadable file (UnreadableWeightsError), or weights that do not
    fit the model (PortingError)."""


class PortingError(WeightsError):
    """Weights that do not fit the model; lists every missing, unexpected and wrongly shaped entry."""

    def __init__(self, direction: str, missing=(), unexpected=(), wrong_shape=()):
        self.missing, self.unexpected, self.wrong_shape = list(missing), list(unexpected), list(wrong_shape)
        lines = [f"{direction}: the weights do not fit the model config."]
        lines += [f"  missing: {key}" for key in self.missing]
        lines += [f"  unexpected: {key}" for key in self.unexpected]
        lines += [f"  wrong shape: {key}: expected {want}, found {got}" for key, want, got in self.wrong_shape]
        lines.append("Check that the weights were saved with the same model config (preset) you load them into.")
        super().__init__("\n".join(lines))


class UnreadableWeightsError(WeightsError):
    """A weights file that cannot be read as such (damaged, or another format): no config to check."""

    def __init__(self, where: str, found: str,
                 expected: str = f"a {FORMAT} file of version {' or '.join(READABLE_VERSIONS)}"):
        super().__init__(f"{where}: expected {expected}, found {found}. Use an undamaged copy, or the version of "
                         "this library that wrote it.")


def canonical_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor of a model with this config, and its shape."""
    k, experts = config.kernel_size, config.num_experts
    shapes = {"stem.conv.weight": (config.stem_channels, 3, k, k), **_batchnorm("stem.bn", config.stem_channels)}
    for i, (c_in, block) in enumerate(zip(config.block_in_channels(), config.blocks)):
        hidden = config.expert_hidden(c_in)
        shapes.update({
            f"blocks.{i}.expert.fc1.weight": (hidden, c_in), f"blocks.{i}.expert.fc1.bias": (hidden,),
            f"blocks.{i}.expert.fc2.weight": (experts, hidden), f"blocks.{i}.expert.fc2.bias": (experts,),
            f"blocks.{i}.kernels": (experts, block.out_channels, c_in, k, k),
            **_batchnorm(f"blocks.{i}.bn", block.out_channels),
        })
    features = config.blocks[-1].out_channels
    if config.classifier_hidden:
        shapes.update({"classifier.hidden.weight": (config.classifier_hidden, features),
                       "classifier.hidden.bias": (config.classifier_hidden,)})
        features = config.classifier_hidden
    shapes.update({"classifier.out.weight": (config.num_classes, features),
                   "classifier.out.bias": (config.num_classes,)})
    return shapes


def _batchnorm(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{leaf}": (channels,) for leaf in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.{UNUSED_IN_FLAX}": ()}


def norm_bias_names(config: ModelConfig) -> list[str]:
    """The canonical names of the BatchNorm biases (the recipe's norm_bias_lr_scale applies to these)."""
    return [name.removesuffix("running_mean") + "bias" for name in canonical_shapes(config)
            if name.endswith(".running_mean")]


def check_canonical(tensors: dict[str, np.ndarray], config: ModelConfig, direction: str,
                    partial: bool = False) -> None:
    """Every canonical tensor of `config` with its shape and nothing else; `partial`: some of them."""
    expected = canonical_shapes(config)
    wrong = [(key, expected[key], tuple(np.shape(value))) for key, value in tensors.items()
             if key in expected and tuple(np.shape(value)) != expected[key]]
    missing = [] if partial else [key for key in expected if key not in tensors]
    unexpected = [key for key in tensors if key not in expected]
    if missing or unexpected or wrong:
        raise PortingError(direction, missing, unexpected, wrong)


def _flax_location(name: str, rank: int) -> tuple[str, tuple[str, ...], tuple[int, ...] | None]:
    """(collection, path, transpose) for a canonical name; transpose None keeps the layout."""
    *modules, leaf = name.split(".")
    path = []
    for part in modules:  # "blocks", "0" -> "blocks_0": Linen names list members that way
        if part.isdigit():
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    if leaf == "kernels":
        return "params", (*path, "kernels"), (0, 3, 4, 2, 1)
    if leaf == "weight":
        return "params", (*path, {4: "kernel", 2: "kernel", 1: "scale"}[rank]), {4: (2, 3, 1, 0), 2: (1, 0)}.get(rank)
    if leaf == "bias":
        return "params", (*path, "bias"), None
    return "batch_stats", (*path, {"running_mean": "mean", "running_var": "var"}[leaf]), None


def flax_params_path(name: str) -> tuple[str, ...]:
    """Where the canonical bias `name` lives in Flax's `params` collection."""
    collection, path, _ = _flax_location(name, rank=1)
    if collection != "params" or not name.endswith(".bias"):
        raise ValueError(f"expected the canonical name of a bias, such as 'stem.bn.bias'; got {name!r}")
    return path


def canonical_to_flax(tensors: dict[str, np.ndarray], config: ModelConfig) -> dict:
    """Canonical numpy tensors -> Flax variables {"params": ..., "batch_stats": ...} (nested dicts)."""
    check_canonical(tensors, config, "canonical -> Flax")
    variables: dict = {"params": {}, "batch_stats": {}}
    for name, value in tensors.items():
        if name.endswith(UNUSED_IN_FLAX):
            continue
        collection, path, transpose = _flax_location(name, np.ndim(value))
        node = variables[collection]
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.ascontiguousarray(np.transpose(value, transpose)) if transpose else np.asarray(value)
    return variables


def flax_to_canonical(variables, config: ModelConfig) -> dict[str, np.ndarray]:
    """Flax variables -> canonical numpy tensors; every expected tensor must be there, and nothing else."""
    found = {(collection, path): np.asarray(value) for collection in ("params", "batch_stats")
             for path, value in _flatten(variables.get(collection, {}))}
    tensors, missing, wrong = {}, [], []
    for name, shape in canonical_shapes(config).items():
        if name.endswith(UNUSED_IN_FLAX):
            tensors[name] = np.zeros((), np.int64)
            continue
        collection, path, transpose = _flax_location(name, len(shape))
        flax_shape = tuple(shape[axis] for axis in transpose) if transpose else shape
        value = found.pop((collection, path), None)
        if value is None:
            missing.append("/".join((collection, *path)))
        elif value.shape != flax_shape:
            wrong.append(("/".join((collection, *path)), flax_shape, value.shape))
        else:
            tensors[name] = np.ascontiguousarray(np.transpose(value, np.argsort(transpose))) if transpose else value
    if missing or found or wrong:
        raise PortingError("Flax -> canonical", missing, ["/".join((c, *p)) for c, p in found], wrong)
    return tensors


def _flatten(tree, prefix=()):
    for key, value in tree.items():
        if hasattr(value, "items"):
            yield from _flatten(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def save_portable(path, tensors: dict[str, np.ndarray], config: ModelConfig, extra: dict | None = None) -> None:
    """Write canonical tensors and their model config to one .safetensors file (numpy only)."""
    from safetensors.numpy import save

    check_canonical(tensors, config, "save portable")
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "model_config": json.dumps(to_dict(config)), "extra": json.dumps(extra or {})}
    metadata["sha256"] = _contents_checksum(tensors, metadata)
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def _contents_checksum(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """Version 3's: the tensors' checksum, the model config and the run's record, each as written."""
    digest = hashlib.sha256(arrays_checksum(tensors).encode())
    for key in ("model_config", "extra"):
        digest.update(b"\0" + metadata.get(key, "").encode())
    return digest.hexdigest()


def _scalar_fix(key: str, value: np.ndarray) -> np.ndarray:
    # safetensors' numpy reader hands a saved 0-d counter back with shape (1,).
    return value.reshape(()) if key.endswith(UNUSED_IN_FLAX) and value.shape == (1,) else value


def load_portable(path) -> tuple[dict[str, np.ndarray], ModelConfig, dict]:
    """Read a portable file: (canonical tensors, model config, extra metadata)."""
    from safetensors import SafetensorError, safe_open

    where = f"load portable {path}"
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {key: _scalar_fix(key, f.get_tensor(key)) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise UnreadableWeightsError(where, f"an unreadable file ({error})") from error
    version = metadata.get("format_version")
    if metadata.get("format") != FORMAT or version not in READABLE_VERSIONS:
        raise UnreadableWeightsError(where, f"format {metadata.get('format')!r} version {version!r}")
    recorded, found = ((metadata.get("tensors_sha256"), arrays_checksum(tensors)) if version == "2"
                       else (metadata.get("sha256"), _contents_checksum(tensors, metadata)))
    if recorded != found:
        raise UnreadableWeightsError(where, "contents that do not match the file's checksum (damaged)")
    try:
        config = model_config_from_dict(json.loads(metadata["model_config"]))
        extra = json.loads(metadata.get("extra", "{}"))
    except (KeyError, TypeError, ValueError) as error:
        raise UnreadableWeightsError(where, f"a model config this code cannot read ({error!r})") from error
    check_canonical(tensors, config, where)
    return tensors, config, extra
