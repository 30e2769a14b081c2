"""The one schedule formula equals PyTorch's StepLR and Optax's staircase decay step for step."""

import dataclasses

import numpy as np
import pytest

from expert_core import schedules
from expert_core.config import ModelConfig, TrainConfig

STEP = TrainConfig(learning_rate=1e-3, step_size_epochs=2, step_gamma=0.5, epochs=8)


def test_step_schedule_equals_torch_steplr():
    torch = pytest.importorskip("torch")
    steps_per_epoch = 3
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=STEP.learning_rate)
    step_lr = torch.optim.lr_scheduler.StepLR(optimizer, STEP.step_size_epochs * steps_per_epoch, STEP.step_gamma)
    for step in range(STEP.epochs * steps_per_epoch):
        assert schedules.learning_rate(step, STEP, steps_per_epoch) == pytest.approx(
            optimizer.param_groups[0]["lr"], rel=1e-12)
        optimizer.step()
        step_lr.step()


def test_step_schedule_equals_optax_staircase_decay():
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax.numpy")
    steps_per_epoch = 3
    staircase = optax.exponential_decay(STEP.learning_rate, STEP.step_size_epochs * steps_per_epoch,
                                        STEP.step_gamma, staircase=True)
    for step in range(STEP.epochs * steps_per_epoch):
        ours = schedules.learning_rate(jnp.asarray(step), STEP, steps_per_epoch, jnp)
        assert float(ours) == pytest.approx(float(staircase(step)), rel=1e-6)


def test_onecycle_rises_to_peak_then_falls_to_zero():
    config = dataclasses.replace(STEP, lr_schedule="onecycle", warmup_fraction=0.25)
    rates = np.array([schedules.learning_rate(s, config, 10) for s in range(80)])
    peak = int(np.argmax(rates))
    assert peak == 20 and rates[peak] == pytest.approx(config.learning_rate)
    assert (np.diff(rates[:peak + 1]) > 0).all() and (np.diff(rates[peak:]) < 0).all()
    assert rates[-1] == pytest.approx(config.learning_rate / 60)


def test_temperature_anneals_linearly_to_the_model_temperature():
    model = ModelConfig(temperature=1.0)
    train = TrainConfig(temperature_start=31.0, temperature_anneal_epochs=10)
    assert schedules.temperature(0, model, train) == 31.0
    assert schedules.temperature(5, model, train) == pytest.approx(16.0)
    assert schedules.temperature(10, model, train) == schedules.temperature(50, model, train) == 1.0
    assert schedules.temperature(3, model, TrainConfig()) == 1.0


def test_lookahead_syncs_every_period_and_at_the_last_step_with_airbenchs_decay():
    recipe = TrainConfig(epochs=2, lookahead_period=5, lookahead_decay=0.95)
    synced = [step for step in range(2 * 12) if schedules.lookahead_sync(step, recipe, 12)]
    assert synced == [4, 9, 14, 19, 23]
    decays = [schedules.lookahead_decay(step, recipe, 12) for step in synced]
    np.testing.assert_allclose(decays, [0.95 ** 5 * (n / 24) ** 3 for n in (5, 10, 15, 20, 24)])
