"""Flax training: a TrainState with batch_stats, jitted train steps (one augmenting on the device),
one jitted eval step.

The optimiser is the PyTorch side's, transform for transform: L2-coupled Adam is
`add_decayed_weights -> scale_by_adam -> scale_by_learning_rate(schedule)` (PyTorch's
Adam(weight_decay=w) adds w * p to the gradient); `adamw` is Optax's decoupled AdamW; Nesterov SGD is
`add_decayed_weights -> trace(nesterov) -> scale_by_learning_rate(schedule)`, whose momentum buffer
starts at the first gradient as PyTorch's SGD does (a zero buffer plus g is g). The schedule
is expert_core.schedules.learning_rate, the very formula PyTorch's LambdaLR evaluates.

Data parallel over every visible device (or the first `devices`), on one host or several: the
backend lays the devices out as a 1-D mesh ("data"), keeps the TrainState replicated and shards
each global batch along it. The jitted steps are the same functions as on one device; XLA's SPMD
partitioner splits them, so augmentation (drawn for the global batch from one key) and the
BatchNorm statistics (means over the global batch) are those of a single-device run.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data.augment import predict_over_views
from expert_core import portable, schedules
from expert_core.config import DEFAULT_MERGE, EVAL_BATCH, AugmentConfig, ModelConfig, TrainConfig, parameter_dtype
from expert_core.training import Predictions, TrainingError, check_batch_divides, check_driver_step
from flax_expert.augment import augment_batch
from flax_expert.model import ExpertCNN, init_variables, to_model_input


class TrainState(train_state.TrainState):
    batch_stats: Any
    key: jax.Array  # root of the per-step augmentation and dropout randomness
    slow: Any = None  # lookahead's average of {"params", "batch_stats"}; None without lookahead


def lookahead_of(config: TrainConfig, steps_per_epoch: int) -> tuple[TrainConfig, int] | None:
    """The static argument that switches lookahead on in the train steps, or None for a recipe without it."""
    return (config, steps_per_epoch) if config.lookahead_period else None


def _lookahead(state: TrainState, lookahead: tuple[TrainConfig, int]) -> TrainState:
    """After the step just taken: at a sync, the average takes in the weights, and they become it."""
    config, steps_per_epoch = lookahead
    step = state.step - 1

    def sync(state):
        # In the parameters' float: int32 steps would divide in float32 even under float64 parity, and a
        # float64 decay would turn float32 weights into float64 ones where x64 is on for another backend.
        dtype = jax.tree.leaves(state.params)[0].dtype
        decay = schedules.lookahead_decay(jnp.asarray(step, dtype), config, steps_per_epoch)
        current = {"params": state.params, "batch_stats": state.batch_stats}
        slow = jax.tree.map(lambda s, w: s + (1 - decay) * (w - s), state.slow, current)
        return state.replace(params=slow["params"], batch_stats=slow["batch_stats"], slow=slow)

    return jax.lax.cond(schedules.lookahead_sync(step, config, steps_per_epoch), sync, lambda s: s, state)


def create_optimizer(config: TrainConfig, steps_per_epoch: int,
                     norm_biases: frozenset[tuple[str, ...]] = frozenset()) -> optax.GradientTransformation:
    """The recipe's optimiser; `norm_biases` (params paths, `norm_bias_paths`) train at
    config.norm_bias_lr_scale x its learning rate with weight decay / that scale, as a second
    PyTorch parameter group does."""
    if config.norm_bias_lr_scale == 1:
        return _optimizer(config, steps_per_epoch, lr_scale=1.0)
    if not norm_biases:
        raise ValueError(f"norm_bias_lr_scale {config.norm_bias_lr_scale} needs the BatchNorm biases' params paths, "
                         "found none; pass norm_biases=norm_bias_paths(model_config).")

    def labels(params):
        return flax.traverse_util.path_aware_map(
            lambda path, _: "norm_bias" if tuple(path) in norm_biases else "other", params)

    return optax.multi_transform({"other": _optimizer(config, steps_per_epoch, lr_scale=1.0),
                                  "norm_bias": _optimizer(config, steps_per_epoch, config.norm_bias_lr_scale)},
                                 labels)


def _optimizer(config: TrainConfig, steps_per_epoch: int, lr_scale: float) -> optax.GradientTransformation:
    def schedule(count):
        # In the default float type: float32, or float64 under jax.enable_x64 (parity's float64 checks).
        return lr_scale * schedules.learning_rate(jnp.asarray(count, float), config, steps_per_epoch, jnp)

    b1, b2 = config.adam_betas
    weight_decay = config.weight_decay / lr_scale
    if config.optimizer == "adamw":
        return optax.adamw(schedule, b1, b2, config.adam_eps, weight_decay=weight_decay)
    if config.optimizer == "sgd_nesterov":
        direction = optax.trace(decay=config.momentum, nesterov=True)
    else:
        direction = optax.scale_by_adam(b1, b2, config.adam_eps)
    return optax.chain(optax.add_decayed_weights(weight_decay), direction, optax.scale_by_learning_rate(schedule))


def norm_bias_paths(config: ModelConfig) -> frozenset[tuple[str, ...]]:
    """The params paths of a model's BatchNorm biases, for `create_optimizer`."""
    return frozenset(portable.flax_params_path(name) for name in portable.norm_bias_names(config))


def lookahead_start(variables, config: TrainConfig) -> dict | None:
    """Lookahead's average before the first step: a copy of the weights (the step donates its state,
    which must not hold one buffer twice); None for a recipe without lookahead."""
    if not config.lookahead_period:
        return None
    return jax.tree.map(jnp.copy, {"params": variables["params"], "batch_stats": variables["batch_stats"]})


def create_train_state(model: ExpertCNN, config: TrainConfig, steps_per_epoch: int, key: jax.Array,
                       param_dtype=jnp.float32) -> TrainState:
    init_key, train_key = jax.random.split(key)
    variables = jax.tree.map(lambda v: v.astype(param_dtype), init_variables(model, init_key))
    return train_state_from_variables(model, variables, config, steps_per_epoch, train_key)


def train_state_from_variables(model: ExpertCNN, variables, config: TrainConfig, steps_per_epoch: int,
                               key: jax.Array) -> TrainState:
    """A fresh optimiser over given weights; `key` roots every step's augmentation and dropout draws."""
    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              batch_stats=variables["batch_stats"], key=key,
                              tx=create_optimizer(config, steps_per_epoch, norm_bias_paths(model.config)),
                              slow=lookahead_start(variables, config))
    # A Python 0 is weakly typed, the int32 step jit hands back is not: without this the second step recompiles.
    return state.replace(step=jnp.zeros((), jnp.int32))


def smoothed_cross_entropy(logits, labels, smoothing: float):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def _update(state: TrainState, images, labels, temperature, dropout_key, smoothing: float, lookahead):
    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, to_model_input(images), train=True,
            temperature=temperature, mutable=["batch_stats"], rngs={"dropout": dropout_key})
        return smoothed_cross_entropy(logits, labels, smoothing), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if lookahead is not None:
        state = _lookahead(state, lookahead)
    return state, {"loss": loss, "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
                   "grad_norm": optax.tree.norm(grads)}


def step_keys(state: TrainState) -> tuple[jax.Array, jax.Array]:
    """The step's augmentation and dropout keys, one derivation for both train steps: the same state
    draws the same dropout masks whether the step augments or is handed an augmented batch."""
    augment_key, dropout_key = jax.random.split(jax.random.fold_in(state.key, state.step))
    return augment_key, dropout_key


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("smoothing", "lookahead"))
def train_step(state: TrainState, images, labels, temperature, smoothing: float, lookahead=None):
    """One step on an already augmented uint8 batch (how parity feeds identical batches to both sides);
    `lookahead`: `lookahead_of(recipe, steps_per_epoch)`."""
    return _update(state, images, labels, temperature, step_keys(state)[1], smoothing, lookahead)


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("augment", "smoothing", "lookahead"))
def augmented_train_step(state: TrainState, images, labels, temperature, augment: AugmentConfig,
                         smoothing: float, lookahead=None):
    """One step that first augments the raw uint8 batch on the device, from the state's key and step."""
    augment_key, dropout_key = step_keys(state)
    # The barrier makes XLA write the augmented batch once: fused into its consumers (the stem's nine
    # shifted patch slices) the augmentation's gathers were recomputed for each.
    augmented = jax.lax.optimization_barrier(augment_batch(images, augment_key, augment))
    return _update(state, augmented, labels, temperature, dropout_key, smoothing, lookahead)


@functools.partial(jax.jit, static_argnames=("test_time_flip", "translate"))
def eval_step(state: TrainState, images, temperature, test_time_flip: bool = False, translate: int = 0):
    """Weighted logits over the test-time views; attention of the unshifted image."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    def forward(view):
        return state.apply_fn(variables, to_model_input(view), train=False, temperature=temperature,
                              return_attention=True)

    return predict_over_views(forward, images, translate, test_time_flip, jnp)


def resolve_devices(device: str, count: int | None = None) -> list[jax.Device]:
    """The first `count` (default: all) devices of the platform `device` names, over all processes.

    On several hosts leave `count` unset: every process must own a part of the mesh."""
    if ":" in device:
        raise TrainingError(f"--device {device}: expected cpu, cuda or auto; Flax trains on the first --devices "
                            "of a platform, so pick GPUs with CUDA_VISIBLE_DEVICES instead of an index.")
    platform = None if device == "auto" else "gpu" if device == "cuda" else device
    try:
        available = jax.devices(platform)
    except RuntimeError as error:
        raise TrainingError(f"--device {device}: expected a JAX {platform} device, found only "
                           f"{[d.platform for d in jax.devices()]}; use --device cpu or auto.") from error
    if count is not None and not 1 <= count <= len(available):
        raise TrainingError(f"--devices {count}: expected 1 to {len(available)}, the {available[0].platform} "
                            "devices JAX sees; lower --devices (a CPU shows more with XLA_FLAGS="
                            "--xla_force_host_platform_device_count=N).")
    return available[:count]


def initialize_multihost() -> None:
    """Joins a multi-host run when JAX_COORDINATOR_ADDRESS (host:port of process 0) is set; call it first.

    JAX_NUM_PROCESSES and JAX_PROCESS_ID give the number of processes and this one's index; when
    they are unset JAX detects them (SLURM, Open MPI). Untested here: this repository has one host.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(num_processes=_env_int("JAX_NUM_PROCESSES"),
                                   process_id=_env_int("JAX_PROCESS_ID"))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise TrainingError(f"{name}={value!r}: expected a whole number; set it to one, or unset it to let JAX "
                            "detect it.") from None


class FlaxBackend:
    framework = "flax"

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, *, steps_per_epoch: int,
                 seed: int, merge: str | None = None, device: str = "auto", precision: str = "float32",
                 devices: int | None = None):
        mesh_devices = resolve_devices(device, devices)
        check_batch_divides(train_config.batch_size, len(mesh_devices), "devices", ", or fewer --devices")
        mesh = Mesh(np.array(mesh_devices), ("data",))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        self.is_main_process = jax.process_index() == 0
        first = mesh_devices[0]
        kind = "cpu" if first.platform == "cpu" else f"{first.platform} ({first.device_kind})"
        self.device = kind if len(mesh_devices) == 1 else f"{len(mesh_devices)} x {kind}"
        self.config = train_config
        self.model_config = model_config
        self.lookahead = lookahead_of(train_config, steps_per_epoch)
        if precision == "float64":
            jax.config.update("jax_enable_x64", True)  # for the whole process: JAX has no float64 without it
        model = ExpertCNN(model_config, merge=merge or DEFAULT_MERGE, compute_dtype=jnp.dtype(precision))
        # Built uncommitted on a device of this process, then copied to every device of the mesh.
        with jax.default_device(jax.local_devices(backend=first.platform)[0]):
            state = create_train_state(model, train_config, steps_per_epoch, jax.random.PRNGKey(seed),
                                       jnp.dtype(parameter_dtype(precision)))
        self.state = jax.device_put(state, self.replicated)

    @classmethod
    def from_canonical(cls, tensors: dict[str, np.ndarray], model_config: ModelConfig,
                       train_config: TrainConfig | None = None, device: str = "cpu") -> "FlaxBackend":
        """A backend holding canonical weights (from either framework's checkpoint), to evaluate them."""
        portable.check_canonical(tensors, model_config, "canonical -> Flax")  # all of them, not a few
        backend = cls(model_config, train_config or TrainConfig(), steps_per_epoch=1, seed=0, device=device)
        backend.replace_weights(tensors)
        return backend

    def versions(self) -> dict[str, str]:
        return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                "numpy": np.__version__}

    def train_step(self, images, labels, step, temperature):
        check_driver_step(int(self.state.step), step)
        self.state, metrics = augmented_train_step(self.state, self.shard(images), self.shard(labels),
                                                   temperature, self.config.augment, self.config.label_smoothing,
                                                   self.lookahead)
        return metrics["loss"], metrics["correct"], metrics["grad_norm"]

    def shard(self, batch: np.ndarray) -> jax.Array:
        """The global batch split along the mesh; each process copies only its own devices' parts."""
        return jax.make_array_from_callback(batch.shape, self.batch_sharding, lambda index: batch[index])

    def predict(self, images: np.ndarray, temperature: float, translate: int = 0) -> Predictions:
        devices = self.batch_sharding.num_devices
        size = -(-EVAL_BATCH // devices) * devices  # the shards must be equal
        batches = []
        for start in range(0, len(images), size):
            batch = images[start:start + size]
            padded = np.pad(batch, ((0, size - len(batch)), (0, 0), (0, 0), (0, 0)))  # one shape, one compile
            outputs = eval_step(self.state, self.shard(padded), temperature, self.config.test_time_flip, translate)
            logits, attention = multihost_utils.process_allgather(outputs, tiled=True)
            batches.append((np.float32(logits[:len(batch)]), [np.float32(a[:len(batch)]) for a in attention]))
        return Predictions.from_batches(batches)

    def state_bytes(self) -> bytes:
        return flax.serialization.to_bytes(self.state)

    def canonical_weights(self) -> dict[str, np.ndarray]:
        variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        return portable.flax_to_canonical(variables, self.model_config)

    def replace_weights(self, tensors: dict[str, np.ndarray]) -> None:
        portable.check_canonical(tensors, self.model_config, "replace_weights", partial=True)
        variables = portable.canonical_to_flax({**self.canonical_weights(), **tensors}, self.model_config)
        # Each new leaf keeps the old one's dtype (float64 runs) and sharding (every device of the mesh).
        keep = lambda new, old: jax.device_put(jnp.asarray(new, old.dtype), old.sharding)  # noqa: E731
        self.state = self.state.replace(params=jax.tree.map(keep, variables["params"], self.state.params),
                                        batch_stats=jax.tree.map(keep, variables["batch_stats"],
                                                                 self.state.batch_stats))
        # The average starts again from the new weights.
        self.state = self.state.replace(slow=lookahead_start(
            {"params": self.state.params, "batch_stats": self.state.batch_stats}, self.config))

    def load_state_bytes(self, payload: bytes) -> None:
        restored = flax.serialization.msgpack_restore(payload)
        restored.setdefault("slow", None)  # written before lookahead existed, by a run without it
        self.state = jax.device_put(flax.serialization.from_state_dict(self.state, restored), self.replicated)
