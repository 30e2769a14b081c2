"""The PyTorch reference model: shapes, attention, the merges, training, temperature, names."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import expert_core.config as core_config
from expert_core.config import (CIFAR10_MEAN, CIFAR10_STD, MERGE_MODES, BlockConfig, ModelConfig, TrainConfig,
                                block_merge)
from expert_core.training import TrainingError
from torch_reference import model as torch_model
from torch_reference.model import ExpertCNN, to_model_input
from torch_reference.train import resolve_device

from model_configs import SHAPE_CONFIGS

# Wide enough to exercise every option, small enough to run in milliseconds on 8x8 images.
MIXED = ModelConfig(stem_channels=6, blocks=(BlockConfig(6, pool=False, residual=True), BlockConfig(10)),
                    num_experts=3, reduction=2, classifier_hidden=12, dropout=0.5)


def make_model(config: ModelConfig, merge: str = "branches", seed: int = 0) -> ExpertCNN:
    torch.manual_seed(seed)
    return ExpertCNN(config, merge)


def make_input(n: int = 6, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("config", [*SHAPE_CONFIGS.values(), MIXED], ids=[*SHAPE_CONFIGS, "mixed"])
@pytest.mark.parametrize("merge", MERGE_MODES)
def test_output_and_attention_shapes(config, merge):
    logits, attention = make_model(config, merge)(make_input(n=5), return_attention=True)
    assert logits.shape == (5, config.num_classes)
    assert [a.shape for a in attention] == [(5, config.num_experts)] * len(config.blocks)
    assert make_model(config, merge)(make_input(n=5)).shape == (5, config.num_classes)


@pytest.mark.parametrize("train", [True, False])
def test_attention_rows_are_distributions(train):
    model = make_model(MIXED).train(train)
    _, attention = model(make_input(), return_attention=True)
    for a in attention:
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum(dim=1), torch.ones(len(a)), rtol=0, atol=1e-6)


def run_merge(model: ExpertCNN, merge: str, x: torch.Tensor, train: bool):
    """Logits, attention, every parameter's gradient and the BN buffers after one forward/backward."""
    model = copy.deepcopy(model).train(train)
    model.merge = merge
    torch.manual_seed(123)  # the same dropout mask for every merge
    logits, attention = model(x, temperature=0.7, return_attention=True)
    (logits.square().mean() + sum(a[:, 0].sum() for a in attention)).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return logits, attention, grads, dict(model.named_buffers())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_the_merges_agree_on_the_same_weights(train):
    model, x = make_model(MIXED), make_input()
    reference = run_merge(model, "branches", x, train)
    for merge in ("stacked", "aggregated", "auto"):
        logits, attention, grads, buffers = run_merge(model, merge, x, train)
        torch.testing.assert_close(logits, reference[0], rtol=1e-5, atol=1e-5)
        for a, a_ref in zip(attention, reference[1]):
            torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-5)
        assert grads.keys() == reference[2].keys()
        for name, grad in grads.items():
            assert max_relative_difference(reference[2][name], grad) <= 1e-5, f"{merge}: gradient of {name}"
        for name, buffer in buffers.items():
            torch.testing.assert_close(buffer, reference[3][name], rtol=1e-5, atol=1e-5, msg=name)


# Block 0 of the first sees 8x8 images, block 1 4x4 ones; both blocks of the others see 8x8 images
# (64 pixels), where PyTorch with AVX-512 stacks 129 output channels and aggregates 128, and without
# it aggregates both. The capability is set, so that every case runs whatever this CPU has.
@pytest.mark.parametrize("capability, blocks, n, expected", [
    ("AVX2", (BlockConfig(6), BlockConfig(8)), 6, ["aggregated", "stacked"]),
    ("AVX512", (BlockConfig(129, pool=False), BlockConfig(128)), 2, ["stacked", "aggregated"]),
    ("AVX2", (BlockConfig(129, pool=False), BlockConfig(128)), 2, ["aggregated", "aggregated"]),
], ids=["by-image-size", "by-output-channels-avx512", "by-output-channels-avx2"])
def test_auto_merge_picks_per_block_and_computes_what_branches_do(record_merges, monkeypatch, capability, blocks,
                                                                   n, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    model, x = make_model(ModelConfig(stem_channels=4, blocks=blocks, num_experts=2)), make_input(n=n, size=8)
    reference = run_merge(model, "branches", x, train=True)
    seen = record_merges(torch_model)
    logits, _, grads, _ = run_merge(model, "auto", x, train=True)
    assert seen == expected
    torch.testing.assert_close(logits, reference[0], rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        assert max_relative_difference(reference[2][name], grad) <= 1e-5, f"gradient of {name}"


def test_flax_auto_merge_aggregates_where_pytorch_with_avx512_stacks():
    assert block_merge("auto", 8, 8, 129, "torch-avx512") == "stacked"
    assert block_merge("auto", 8, 8, 129, "flax") == "aggregated"  # XLA's dense convs gain nothing there


def test_only_a_cpu_with_avx512_takes_the_avx512_merge_rule(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert torch_model.merge_backend(torch.device("cpu")) == "torch-avx512"
    assert torch_model.merge_backend(torch.device("cuda")) == "torch"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert torch_model.merge_backend(torch.device("cpu")) == "torch"


# MIXED on 8x8 images holds 1,092 elements an image in block 0 (kernel, input, output), 1,564 in block 1.
@pytest.mark.parametrize("budget, min_images, chunk_sizes",
                         [(1, 1, [1] * 14), (5_000, 1, [4, 3, 3, 2, 2]), (1, 4, [4, 3] * 2)],
                         ids=["one-image-chunks", "as-even-as-they-come", "at-least-the-minimum"])
def test_aggregated_merge_in_batch_chunks_equals_the_whole_batch(monkeypatch, budget, min_images, chunk_sizes):
    model, x = make_model(MIXED), make_input(n=7)
    whole = run_merge(model, "aggregated", x, train=True)
    seen, conv = [], torch_model._aggregated_conv
    monkeypatch.setattr(torch_model, "_aggregated_conv", lambda x, *rest: seen.append(len(x)) or conv(x, *rest))
    monkeypatch.setattr(core_config, "CPU_CHUNK_ELEMENTS", budget)
    monkeypatch.setattr(core_config, "MIN_CHUNK_IMAGES", min_images)
    chunked = run_merge(model, "aggregated", x, train=True)
    assert seen == chunk_sizes
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-6)
    for name, grad in chunked[2].items():
        assert max_relative_difference(whole[2][name], grad) <= 1e-6, f"gradient of {name}"


def test_merge_choice_leaves_the_weights_alone():
    states = [make_model(MIXED, merge).state_dict() for merge in MERGE_MODES]
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        assert all(torch.equal(state[key], states[0][key]) for key in state)


def test_unknown_merge_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="aggregated"):
        ExpertCNN(MIXED, "grouped")
    model = make_model(MIXED)
    with pytest.raises(ValueError, match="branches"):
        model.merge = "grouped"
    assert model.merge == "branches"


def test_initialisation_is_deterministic_under_manual_seed():
    a, b, c = make_model(MIXED, seed=3), make_model(MIXED, seed=3), make_model(MIXED, seed=4)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.blocks[0].kernels, c.blocks[0].kernels)


def test_each_expert_kernel_is_initialised_like_its_own_conv():
    config = ModelConfig(stem_channels=16, blocks=(BlockConfig(64),), num_experts=2)
    kernels = make_model(config).blocks[0].kernels.detach()
    expected_std = (2 / (64 * 3 * 3)) ** 0.5  # kaiming normal, fan_out of one (64, 16, 3, 3) conv
    for kernel in kernels:
        assert kernel.std().item() == pytest.approx(expected_std, rel=0.1)
    assert not torch.equal(kernels[0], kernels[1])


def test_a_few_adam_steps_reduce_the_loss_on_one_batch():
    model = make_model(dataclasses.replace(MIXED, dropout=0.0), merge="aggregated").train()
    x, labels = make_input(n=16), torch.arange(16) % 10
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.log()).sum(dim=1)


def test_larger_temperature_flattens_attention():
    model = make_model(MIXED).eval()
    with torch.no_grad():
        _, cold = model(make_input(), temperature=1.0, return_attention=True)
        _, hot = model(make_input(), temperature=30.0, return_attention=True)
    for a_cold, a_hot in zip(cold, hot):
        assert (entropy(a_hot) > entropy(a_cold)).all()
        assert entropy(a_hot).min() > 0.99 * np.log(MIXED.num_experts)


def test_temperature_one_is_the_plain_softmax_of_the_expert_logits():
    model = make_model(MIXED).eval()
    x = make_input()
    with torch.no_grad():
        _, attention = model(x, temperature=1.0, return_attention=True)
        expert = model.blocks[0].expert
        z = expert.fc2(F.relu(expert.fc1(model.stem(x).mean(dim=(2, 3)))))
    torch.testing.assert_close(attention[0], torch.softmax(z, dim=1), rtol=0, atol=1e-7)


def test_no_temperature_means_the_configured_one():
    config = ModelConfig(stem_channels=4, blocks=(BlockConfig(8),), num_experts=3, temperature=4.0)
    model = make_model(config).eval()
    with torch.no_grad():
        _, default = model(make_input(), return_attention=True)
        _, explicit = model(make_input(), temperature=4.0, return_attention=True)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)


def test_state_dict_has_exactly_the_canonical_names_and_shapes():
    bn = lambda prefix, c: {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}
    expected = {
        "stem.conv.weight": (6, 3, 3, 3), **bn("stem.bn", 6),
        "blocks.0.expert.fc1.weight": (4, 6), "blocks.0.expert.fc1.bias": (4,),  # max(6 // 2, 4)
        "blocks.0.expert.fc2.weight": (3, 4), "blocks.0.expert.fc2.bias": (3,),
        "blocks.0.kernels": (3, 6, 6, 3, 3), **bn("blocks.0.bn", 6),
        "blocks.1.expert.fc1.weight": (4, 6), "blocks.1.expert.fc1.bias": (4,),
        "blocks.1.expert.fc2.weight": (3, 4), "blocks.1.expert.fc2.bias": (3,),
        "blocks.1.kernels": (3, 10, 6, 3, 3), **bn("blocks.1.bn", 10),
        "classifier.hidden.weight": (12, 10), "classifier.hidden.bias": (12,),
        "classifier.out.weight": (10, 12), "classifier.out.bias": (10,),
    }
    state = make_model(MIXED).state_dict()
    assert {key: tuple(value.shape) for key, value in state.items()} == expected


def test_batchnorm_follows_the_config():
    config = ModelConfig(stem_channels=4, blocks=(BlockConfig(8),), bn_momentum=0.3, bn_eps=1e-3)
    model = make_model(config)
    for bn in (model.stem.bn, model.blocks[0].bn):
        assert (bn.momentum, bn.eps) == (0.3, 1e-3)
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


@pytest.mark.parametrize("as_tensor", [False, True])
def test_model_input_is_normalised_nchw_float32(as_tensor):
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    x = to_model_input(torch.from_numpy(images) if as_tensor else images)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 5, 4) and x.is_contiguous()
    # The float64 formula rounded once: the closest float32 to the exact value.
    expected = ((images / 255 - np.asarray(CIFAR10_MEAN)) / np.asarray(CIFAR10_STD)).astype(np.float32)
    assert torch.equal(x, torch.from_numpy(expected).permute(0, 3, 1, 2))


def test_bfloat16_runs_the_convolutions_alone_in_bfloat16():
    """As Flax does (expert_core.config.PRECISIONS): BatchNorm, the expert branch and the classifier
    compute in float32, where torch.autocast would run the linear layers in bfloat16."""
    from torch_reference.train import TorchBackend

    def make_backend(precision):
        return TorchBackend(MIXED, TrainConfig(batch_size=6), steps_per_epoch=1, seed=0, device="cpu",
                            precision=precision)

    backend = make_backend("bfloat16")
    inputs, outputs = {}, {}

    def record(seen, name, tensor):  # a hook that returned a value would replace the module's input or output
        seen[name] = tensor.dtype

    for name, module in backend.model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.BatchNorm2d)):
            module.register_forward_hook(lambda module, args, out, name=name: record(outputs, name, out))
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_pre_hook(lambda module, args, name=name: record(inputs, name, args[0]))
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    half = backend.step_on_batch(images, np.arange(6), 1.0)[0]
    assert half != make_backend("float32").step_on_batch(images, np.arange(6), 1.0)[0]  # convolutions in bf16
    linear_layers = 2 * len(MIXED.blocks) + 2  # fc1 and fc2 per block; the classifier's hidden and output
    norms = len(MIXED.blocks) + 1  # each block's and the stem's
    assert len(outputs) == linear_layers + norms and len(inputs) == norms
    assert set(outputs.values()) == set(inputs.values()) == {torch.float32}


def test_device_flag_refuses_an_unknown_device_in_one_message():
    with pytest.raises(TrainingError, match="--device gpu: expected cpu, cuda, cuda:N or auto"):
        resolve_device("gpu")
