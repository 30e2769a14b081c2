"""The numerical parity checks: same weights, same images, same numbers, within stated tolerances.

Each check returns `Check` rows. Train-mode checks run with dropout off, since the two frameworks
cannot share a dropout mask; everything else is the model exactly as configured. Float32 and float64:
PyTorch on the CPU, JAX on its default device (on a GPU host the GPU, with full float32 matmuls).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax.traverse_util import flatten_dict

from data.augment import augment_batch
from expert_core.config import LR_SCHEDULES, OPTIMIZERS, ModelConfig, TrainConfig
from expert_core.portable import UNUSED_IN_FLAX, flax_to_canonical
from flax_expert import model as flax_model
from flax_expert import train as flax_train
from parity.convert import port_flax_to_torch, port_torch_to_flax, torch_to_canonical
from torch_reference import model as torch_model
from torch_reference import train as torch_train

LOGITS_TOLERANCE = 1e-5
RUNNING_STATISTICS_TOLERANCE = 1e-5
ATTENTION_TOLERANCE = 1e-6
GRADIENT_TOLERANCE = 1e-5  # per tensor: max |diff| / max |value|
FLOAT64_GRADIENT_TOLERANCE = 1e-9
TRAJECTORY_TOLERANCE = 1e-4
FLOAT64_TRAJECTORY_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Check:
    """One compared quantity. A row without a tolerance is reported, not judged."""

    quantity: str
    max_abs_diff: float
    tolerance: float | None
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.tolerance is None or bool(self.max_abs_diff <= self.tolerance)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed}


@contextlib.contextmanager
def exact_float32():
    """Full float32 on both sides while a check runs: TF32 off in PyTorch, "highest" matmuls in JAX.

    PyTorch's CPU convolutions stay as they are by default (oneDNN): measured against float64 on the
    seed preset, its float32 gradients were 3e-6 off where ATen's fallback kernels were 8e-4 off.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.backends.cudnn.flags(enabled=True, allow_tf32=False))
        stack.enter_context(jax.default_matmul_precision("highest"))
        matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        stack.callback(setattr, torch.backends.cuda.matmul, "allow_tf32", matmul_tf32)
        yield


def _exact(check):
    @functools.wraps(check)
    def wrapped(*args, **kwargs):
        with exact_float32():
            return check(*args, **kwargs)
    return wrapped


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))


@dataclass
class Pair:
    """The same network in both frameworks, holding the same weights."""

    config: ModelConfig
    torch_net: torch.nn.Module
    flax_net: flax_model.ExpertCNN
    variables: dict

    @classmethod
    def from_torch(cls, config: ModelConfig, state_dict=None, seed: int = 0) -> "Pair":
        torch.manual_seed(seed)
        torch_net = torch_model.ExpertCNN(config)
        if state_dict is not None:
            torch_net.load_state_dict(state_dict)
        variables = jax.tree.map(jnp.asarray, port_torch_to_flax(torch_net.state_dict(), config))
        return cls(config, torch_net, flax_model.ExpertCNN(config), variables)

    def torch_forward(self, images, train: bool, temperature: float):
        self.torch_net.train(train)
        return self.torch_net(torch_model.to_model_input(images), temperature=temperature, return_attention=True)

    def flax_forward(self, images, train: bool, temperature: float):
        return _flax_forward(self.flax_net, self.variables, flax_model.to_model_input(jnp.asarray(images)), train,
                             temperature)


@functools.partial(jax.jit, static_argnames=("net", "train"))
def _flax_forward(net: flax_model.ExpertCNN, variables, x, train: bool, temperature):
    return net.apply(variables, x, train=train, temperature=temperature, return_attention=True,
                     mutable=["batch_stats"] if train else False)


@_exact
def eval_checks(pair: Pair, images: np.ndarray, temperature: float) -> list[Check]:
    with torch.no_grad():
        t_logits, t_attention = pair.torch_forward(images, False, temperature)
    f_logits, f_attention = pair.flax_forward(images, False, temperature)
    rows = [Check("eval logits", _max_diff(t_logits, f_logits), LOGITS_TOLERANCE)]
    rows += [Check(f"eval attention, block {b}", _max_diff(t, f), ATTENTION_TOLERANCE)
             for b, (t, f) in enumerate(zip(t_attention, f_attention))]
    mismatched = int((t_logits.argmax(1).numpy() != np.asarray(f_logits).argmax(1)).sum())
    rows.append(Check("eval argmax predictions differing", mismatched, 0, f"of {len(images)} images"))
    return rows


@contextlib.contextmanager
def _state_kept(net: torch.nn.Module):
    """A train-mode forward updates PyTorch's running statistics in place; put them back after."""
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        yield
    finally:
        net.load_state_dict(saved)


@_exact
def train_mode_checks(pair: Pair, images: np.ndarray, temperature: float) -> list[Check]:
    """Batch-statistics forward; afterwards the updated running statistics must agree too."""
    with _state_kept(pair.torch_net), torch.no_grad():
        t_logits, _ = pair.torch_forward(images, True, temperature)
        t_stats = torch_to_canonical(pair.torch_net.state_dict(), pair.config)
    (f_logits, _), updates = pair.flax_forward(images, True, temperature)
    f_stats = flax_to_canonical({"params": pair.variables["params"], **updates}, pair.config)
    running = max(_max_diff(t_stats[k], f_stats[k]) for k in t_stats if "running" in k)
    return [Check("train-mode logits (batch statistics)", _max_diff(t_logits, f_logits), LOGITS_TOLERANCE),
            Check("running mean/var after one train-mode batch", running, RUNNING_STATISTICS_TOLERANCE,
                  "PyTorch convention: unbiased running variance")]


def _float32_check(quantity: str, diff: float, tolerance: float, torch_floor: float, flax_floor: float,
                  note: str) -> Check:
    """A float32 comparison, judged at `tolerance` only where float32 can tell: where the two frameworks'
    float32 errors (each one's distance from its own float64 result, its floor) add up to no more than
    `tolerance`. Two correct float32 runs can lie that sum apart, so beyond it the row is reported and
    the float64 row beside it judges: a max-pool near-tie can flip in either framework, and a gradient
    summed from terms that cancel (the expert bias of a K=2 softmax) keeps few correct digits."""
    judged = torch_floor + flax_floor <= tolerance
    return Check(quantity, diff, tolerance if judged else None,
                 note + ("" if judged else f"; over {tolerance:.0e}, so float64 judges"))


@dataclass
class BackwardPass:
    """One framework's gradients of the label-smoothed train-mode loss (canonical names), and each
    ReLU's input as that same computation saw it (layer -> array, channels last; see `relu_layers`)."""

    gradients: dict[str, np.ndarray]
    relu_inputs: dict[str, np.ndarray]


def backward_passes(pair: Pair, images, labels, temperature: float, smoothing: float,
                    dtype: str) -> dict[str, BackwardPass]:
    """{"PyTorch": ..., "Flax": ...} in `dtype`; float64 needs `jax.enable_x64` around the call."""
    return {"PyTorch": _torch_backward(pair, images, labels, temperature, smoothing, dtype),
            "Flax": _flax_backward(pair, images, labels, temperature, smoothing, dtype)}


def relu_layers(config: ModelConfig) -> dict[str, bool]:
    """Every ReLU of the network, named by the module that holds it, and whether a 2x2 max-pool follows."""
    layers = {"stem": False}
    for i, block in enumerate(config.blocks):
        layers |= {f"blocks.{i}.expert": False, f"blocks.{i}": block.pool}
    return layers | ({"classifier": False} if config.classifier_hidden else {})


def _torch_backward(pair: Pair, images, labels, temperature: float, smoothing: float, dtype: str) -> BackwardPass:
    net = copy.deepcopy(pair.torch_net).to(getattr(torch, dtype)).train(True)  # pair's statistics stay
    seen = {}  # what the modules before each ReLU gave, channels last

    def keep(name, pre=False):
        def hook(module, args, output=None):
            value = (args[0] if pre else output).detach().numpy()
            seen[name] = value.transpose(0, 2, 3, 1) if value.ndim == 4 else value
        return hook

    net.stem.bn.register_forward_hook(keep("stem"))
    for i, block in enumerate(net.blocks):
        block.register_forward_pre_hook(keep(f"blocks.{i}.input", pre=True))
        block.expert.fc1.register_forward_hook(keep(f"blocks.{i}.expert"))
        block.bn.register_forward_hook(keep(f"blocks.{i}"))
    if pair.config.classifier_hidden:
        net.classifier.hidden.register_forward_hook(keep("classifier"))
    logits = net(torch_model.to_model_input(images).to(getattr(torch, dtype)), temperature=temperature)
    torch_train.smoothed_cross_entropy(logits, torch.as_tensor(labels), smoothing).backward()
    for i, block in enumerate(pair.config.blocks):
        block_input = seen.pop(f"blocks.{i}.input")
        if block.residual:  # numpy's float32 add is PyTorch's, bit for bit
            seen[f"blocks.{i}"] = seen[f"blocks.{i}"] + block_input
    return BackwardPass({k: p.grad.numpy() for k, p in net.named_parameters()}, seen)


def _flax_backward(pair: Pair, images, labels, temperature: float, smoothing: float, dtype: str) -> BackwardPass:
    flax_net = pair.flax_net.clone(compute_dtype=jnp.dtype(dtype))
    variables = jax.tree.map(lambda v: jnp.asarray(v, dtype), pair.variables)
    x = flax_model.to_model_input(jnp.asarray(images)).astype(dtype)

    def loss_fn(params):
        logits, state = flax_net.apply({**variables, "params": params}, x, train=True, temperature=temperature,
                                       mutable=["batch_stats", "intermediates"])
        return flax_train.smoothed_cross_entropy(logits, jnp.asarray(labels), smoothing), state["intermediates"]

    # One compiled program gives both, so the ReLU inputs are the values this gradient used.
    gradients, sown = jax.jit(jax.grad(loss_fn, has_aux=True))(variables["params"])
    relu_inputs = {".".join(path[:-1]).replace("blocks_", "blocks."): np.asarray(value[0])
                   for path, value in flatten_dict(sown).items()}
    return BackwardPass(flax_to_canonical({"params": gradients, "batch_stats": variables["batch_stats"]},
                                          pair.config), relu_inputs)


def _worst_relative(reference: dict, other: dict) -> tuple[str, float]:
    """The tensor where `other` strays furthest from `reference`: max |diff| / max |reference|."""
    return max(((k, _max_diff(t, other[k]) / max(float(np.abs(t).max()), 1e-30)) for k, t in reference.items()),
               key=lambda item: item[1])


@_exact
def gradient_checks(pair: Pair, images, labels, temperature: float, smoothing: float,
                    tolerance: float = GRADIENT_TOLERANCE) -> list[Check]:
    """Every parameter's gradient in both frameworks, judged as the trajectory is.

    Float64 must agree to 1e-9. Float32 is judged at `tolerance` only where the two frameworks' float32
    errors against their own float64 gradients add up to no more than it: a max-pool window whose top
    two values lie within float32 rounding of each other sends its gradient to whichever pixel a
    framework's rounding favours (seed preset, 32 test images, on a 2-core Intel Xeon: one window of
    65,536 in block 2 of PyTorch's float32 pass, which moved every gradient below it by up to 7.6e-3).
    Two reported rows name, per framework, the decisions of that kind its float32 pass changed.
    """
    with jax.enable_x64(True):
        high = backward_passes(pair, images, labels, temperature, smoothing, "float64")
    low = backward_passes(pair, images, labels, temperature, smoothing, "float32")
    t64, f64, t32, f32 = (passes[f].gradients for passes in (high, low) for f in ("PyTorch", "Flax"))
    (name64, worst64), (name32, worst32) = _worst_relative(t64, f64), _worst_relative(t32, f32)
    (t_name, t_floor), (f_name, f_floor) = _worst_relative(t64, t32), _worst_relative(f64, f32)
    quantity = "gradients, max |diff| / max |grad| over tensors"
    floors = f"float32 vs float64: PyTorch {t_floor:.1e} ({t_name}), Flax {f_floor:.1e} ({f_name})"
    layers = relu_layers(pair.config)
    return [Check(f"{quantity}, float64", worst64, FLOAT64_GRADIENT_TOLERANCE, f"worst: {name64}; {len(t64)} tensors"),
            _float32_check(f"{quantity}, float32", worst32, tolerance, t_floor, f_floor, f"worst: {name32}; {floors}")
            ] + [_decision_row(framework, low[framework], high[framework], layers) for framework in ("PyTorch", "Flax")]


def _decision_row(framework: str, low: BackwardPass, high: BackwardPass, layers: dict[str, bool]) -> Check:
    """Reported: the ReLU signs and max-pool winners `framework`'s float32 pass decided otherwise than
    its float64 pass, by layer with the float64 margin; why a float32 row may be left to float64."""
    found = {(layer, kind): flip for layer, pooled in layers.items()
             for kind, flip in decision_flips(low.relu_inputs[layer], high.relu_inputs[layer], pooled).items()}
    notes = [f"{layer} {kind}: {n} (float64 margin {margin:.1e})" for (layer, kind), (n, margin) in found.items()]
    # pool_windows is a reshape, so counting the windows copies nothing
    decisions = sum(x.size + (flax_model.pool_windows(x).size // 4 if layers[layer] else 0)
                    for layer, x in low.relu_inputs.items())
    return Check(f"float32 ReLU / max-pool decisions unlike float64, {framework}", sum(n for n, _ in found.values()),
                 None, "; ".join(notes) or f"none of {decisions}")


def _windows_last(x: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> (N, H // 2, W // 2, C, 4): each 2x2 window's values in row-major order."""
    n, h, w, c = x.shape
    return flax_model.pool_windows(x).transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, c, 4)


def decision_flips(low: np.ndarray, high: np.ndarray, pooled: bool) -> dict[str, tuple[int, float]]:
    """Where a lower-precision pass decided otherwise than a higher-precision one, given each pass's
    ReLU input: {"ReLU" / "max-pool": (decisions that differ, the smallest high-precision margin)}.

    A ReLU decides its input's sign; a max-pool after it, its window's winner (the first maximum in
    row-major order), which takes the gradient. A pixel can count twice, as a sign and as a winner.
    A window with nothing positive in high precision passes no gradient there, so a flip in it is
    its ReLU's and counts once. The gradient is smooth everywhere else."""
    flips = {}
    relu = (low > 0) != (high > 0)
    if relu.any():
        flips["ReLU"] = (int(relu.sum()), float(np.abs(high[relu]).min()))
    if pooled:
        low_windows, high_windows = _windows_last(np.maximum(low, 0)), _windows_last(np.maximum(high, 0))
        winner = (low_windows.argmax(-1) != high_windows.argmax(-1)) & (high_windows.max(-1) > 0)
        if winner.any():
            top_two = np.sort(high_windows[winner], axis=-1)[:, -2:]
            flips["max-pool"] = (int(winner.sum()), float((top_two[:, 1] - top_two[:, 0]).min()))
    return flips


def train_both(pair: Pair, train_config: TrainConfig, batches, steps_per_epoch: int, temperature: float,
               dtype: str) -> Pair:
    """Both frameworks take the same optimiser steps, in `dtype`, on byte-identical augmented batches.

    Float64 needs `jax.enable_x64` around the call, and around any later use of the returned pair.
    """
    torch_backend = torch_train.TorchBackend(pair.config, train_config, steps_per_epoch=steps_per_epoch,
                                             seed=0, device="cpu", precision=dtype)
    torch_backend.model.load_state_dict(pair.torch_net.state_dict())
    if torch_backend.lookahead:  # its average began at the backend's own random weights, Flax's at the pair's
        torch_backend.lookahead.restart()
    # A copy: train_step donates its state, and the pair's own buffers must outlive this run.
    variables = jax.tree.map(lambda a: jnp.array(a, dtype), pair.variables)
    flax_net = pair.flax_net.clone(compute_dtype=jnp.dtype(dtype))
    state = flax_train.train_state_from_variables(flax_net, variables, train_config, steps_per_epoch,
                                                  jax.random.PRNGKey(0))
    lookahead = flax_train.lookahead_of(train_config, steps_per_epoch)
    for images, labels in batches:
        torch_backend.step_on_batch(images, labels, temperature)
        state, _ = flax_train.train_step(state, images, labels, temperature, train_config.label_smoothing, lookahead)
    return Pair(pair.config, torch_backend.model, flax_net, {"params": state.params, "batch_stats": state.batch_stats})


def _ends(trained: Pair, eval_images, temperature: float) -> tuple[dict, dict]:
    """What training left, per framework: the canonical tensors plus eval logits on `eval_images`."""
    with torch.no_grad():
        t_logits, _ = trained.torch_forward(eval_images, False, temperature)
    f_logits, _ = trained.flax_forward(eval_images, False, temperature)
    return ({**torch_to_canonical(trained.torch_net.state_dict(), trained.config), "logits": t_logits.numpy()},
            {**flax_to_canonical(trained.variables, trained.config), "logits": np.asarray(f_logits)})


def _distances(a: dict, b: dict, parameter_names) -> dict[str, float]:
    def worst(names):
        return max(_max_diff(a[k], b[k]) for k in names)

    return {"parameters": worst(parameter_names), "running mean/var": worst(k for k in a if "running" in k),
            "eval logits": worst(["logits"])}


@_exact
def trajectory_checks(pair: Pair, train_config: TrainConfig, batches, steps_per_epoch: int,
                      eval_images, temperature: float) -> list[Check]:
    """The same optimiser steps in both frameworks, in float64 and in float32.

    Float64 shows that the two take the same step, with rounding too small to hide a difference in
    the recipe. Float32 cannot show that much: a max-pool window whose top two values lie within
    rounding of each other sends its gradient to whichever pixel a framework's rounding favours, and
    Adam's normalised steps carry the difference on. So a float32 row is judged at 1e-4 only where
    the two float32 runs together end within 1e-4 of their own float64 runs; elsewhere it is reported.
    """
    n, names = len(batches), [k for k, _ in pair.torch_net.named_parameters()]
    with jax.enable_x64(True):
        t64, f64 = _ends(train_both(pair, train_config, batches, steps_per_epoch, temperature, "float64"),
                         eval_images, temperature)
    t32, f32 = _ends(train_both(pair, train_config, batches, steps_per_epoch, temperature, "float32"),
                     eval_images, temperature)
    t_floor, f_floor = _distances(t32, t64, names), _distances(f32, f64, names)
    rows = [Check(f"{q} after {n} steps, float64", d, FLOAT64_TRAJECTORY_TOLERANCE)
            for q, d in _distances(t64, f64, names).items()]
    rows += [_float32_check(f"{q} after {n} steps, float32", d, TRAJECTORY_TOLERANCE, t_floor[q], f_floor[q],
                           f"float32 vs float64 of the same run: PyTorch {t_floor[q]:.1e}, Flax {f_floor[q]:.1e}")
             for q, d in _distances(t32, f32, names).items()]
    return rows


def optimizer_checks(train_config: TrainConfig, steps_per_epoch: int = 4, seed: int = 0) -> list[Check]:
    """Every optimiser under both schedules, the recipe's other settings kept: the two frameworks'
    optimisers fed the same float64 gradients from the same parameters, through the whole schedule.

    The trajectory check runs the recipe's own optimiser only; this row per pair covers the rest at
    no cost, a model-free 3 x 5 tensor taking 3 epochs of `steps_per_epoch` steps.
    """
    rng = np.random.default_rng(seed)
    start = rng.standard_normal((3, 5))
    rows = []
    for optimizer in OPTIMIZERS:
        for schedule in LR_SCHEDULES:
            # A bare tensor has no BatchNorm biases to scale; trajectory_checks covers that on the model.
            recipe = dataclasses.replace(train_config, optimizer=optimizer, lr_schedule=schedule, epochs=3,
                                         step_size_epochs=1, norm_bias_lr_scale=1.0)
            gradients = rng.standard_normal((recipe.epochs * steps_per_epoch, *start.shape))
            diff = _max_diff(*_optimised(recipe, steps_per_epoch, start, gradients))
            rows.append(Check(f"{optimizer} + {schedule} schedule, parameters after {len(gradients)} steps, float64",
                              diff, FLOAT64_TRAJECTORY_TOLERANCE))
    return rows


def _optimised(recipe: TrainConfig, steps_per_epoch: int, start: np.ndarray, gradients: np.ndarray):
    """(PyTorch's, Optax's) parameters after applying `gradients` one step at a time from `start`."""
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(torch.tensor(start))
    optimizer, scheduler = torch_train.make_optimizer(holder, recipe, steps_per_epoch)
    with jax.enable_x64(True):
        tx = flax_train.create_optimizer(recipe, steps_per_epoch)
        params = jnp.asarray(start)
        state = tx.init(params)
        for gradient in gradients:
            holder.weight.grad = torch.tensor(gradient)
            optimizer.step()
            scheduler.step()
            updates, state = tx.update(jnp.asarray(gradient), state, params)
            params = optax.apply_updates(params, updates)
        return holder.weight.detach().numpy(), np.asarray(params)


def round_trip_checks(pair: Pair) -> list[Check]:
    """PyTorch -> Flax -> PyTorch and Flax -> PyTorch -> Flax must be bit-exact."""
    state = pair.torch_net.state_dict()
    back = port_flax_to_torch(port_torch_to_flax(state, pair.config), pair.config)
    torch_trip = max(_max_diff(state[k], back[k]) for k in state if not k.endswith(UNUSED_IN_FLAX))
    flax_back = port_torch_to_flax(port_flax_to_torch(pair.variables, pair.config), pair.config)
    flax_trip = max(_max_diff(a, b) for a, b in zip(jax.tree.leaves(pair.variables), jax.tree.leaves(flax_back)))
    return [Check("round trip PyTorch -> Flax -> PyTorch", torch_trip, 0.0),
            Check("round trip Flax -> PyTorch -> Flax", flax_trip, 0.0)]


def parity_batches(images, labels, train_config: TrainConfig, steps: int, batch_size: int, seed: int = 0):
    """`steps` augmented uint8 batches, drawn once in numpy so both frameworks get the same bytes."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(steps):
        index = rng.choice(len(images), batch_size, replace=False)
        batches.append((augment_batch(images[index], rng, train_config.augment), labels[index]))
    return batches


def run_all(config: ModelConfig, train_config: TrainConfig, images, labels, state_dict=None, *,
            steps: int = 20, batch_size: int = 32, seed: int = 0) -> list[Check]:
    """Every check on one config: round trips, optimisers, eval, train mode, gradients, a short trajectory.

    The trajectory squeezes the recipe's schedule into about `steps`: as many epochs of `steps // 3`
    optimiser steps as cover `steps`. At 20 steps: 4 epochs of 6, so a StepLR of one epoch decays three
    times inside the run (at steps 6, 12 and 18) and a one-cycle schedule of 24 steps rises to its
    peak and falls most of the way.
    """
    temperature = config.temperature
    pair = Pair.from_torch(config, state_dict, seed)
    rows = round_trip_checks(pair) + optimizer_checks(train_config) + eval_checks(pair, images, temperature)
    # Dropout has no weights, so the same state dict serves the dropout-free twin.
    no_dropout = Pair.from_torch(dataclasses.replace(config, dropout=0.0), pair.torch_net.state_dict())
    rows += train_mode_checks(no_dropout, images[:256], temperature)
    rows += gradient_checks(no_dropout, images[:batch_size], labels[:batch_size], temperature,
                            train_config.label_smoothing)
    steps_per_epoch = max(steps // 3, 1)
    decaying = dataclasses.replace(train_config, step_size_epochs=1, epochs=-(-steps // steps_per_epoch))
    batches = parity_batches(images, labels, train_config, steps, batch_size, seed)
    rows += trajectory_checks(no_dropout, decaying, batches, steps_per_epoch, images[:256], temperature)
    return rows

