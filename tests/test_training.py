"""The shared training driver with each framework's backend, on short real runs of the tiny preset."""

import dataclasses
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from expert_core import checkpoints, runfiles
from expert_core.config import PRESETS, AugmentConfig, ModelConfig, TrainConfig, get_preset
from expert_core.portable import PortingError, load_portable
from expert_core.report import evaluation_settings
from expert_core.dirac import dirac_expert_kernels
from expert_core.training import (RunSpec, TrainingError, _differences, _warn_if_the_pixels_changed,
                                  build_parser, initialise_from_data, main, recorded_spec, run, run_spec, subset_index)
from expert_core.whitening import PATCH_IMAGES, whitening_stem_kernel

SHORT = ["--preset", "tiny", "--max-train-examples", "256", "--max-test-examples", "200", "--batch-size", "32"]
FRAMEWORKS = ["torch", "flax"]


def backend_factory(framework):
    if framework == "torch":
        from torch_reference.train import TorchBackend
        return TorchBackend
    from flax_expert.train import FlaxBackend
    return FlaxBackend


def train(framework, out, *extra):
    args = build_parser(framework).parse_args([*SHORT, "--out", str(out), *extra])
    return run(backend_factory(framework), framework, args)


# Every test here trains on the real data set (CIFAR10_PATH): skipped without it.
pytestmark = pytest.mark.usefixtures("cifar10")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_run_writes_every_run_file(framework, tmp_path):
    summary = train(framework, tmp_path, "--epochs", "2")
    for name in ("metrics.jsonl", "summary.json", "evaluation.npz", "curves.png", "confusion_matrix.png",
                 "attention_per_class.png", "checkpoint-00001.ckpt", "checkpoint-00002.ckpt",
                 "weights.safetensors"):
        assert (tmp_path / name).stat().st_size > 0, name
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    for key in ("framework", "preset", "device", "epochs", "test_accuracy", "train_wall_seconds",
                "images_per_second", "command", "git_commit"):
        assert key in summary, key
    assert summary["framework"] == framework and summary["epochs"] == 2 and summary["test_examples"] == 200
    history = runfiles.read_metrics(tmp_path)
    assert [row["epoch"] for row in history] == [1, 2]
    assert len(history[0]["expert_usage"]) == len(get_preset("tiny").model.blocks)
    assert np.allclose([sum(u) for u in history[0]["expert_usage"]], 1.0, atol=1e-5)
    assert_last_epoch_metrics_match_the_saved_evaluation(history[-1], runfiles.read_evaluation(tmp_path), summary)


def assert_last_epoch_metrics_match_the_saved_evaluation(row, saved, summary):
    """The tiny preset has no test-time translation, so the final evaluation is the last epoch's:
    its metrics, recomputed here from the saved logits and attention with plain numpy."""
    logits, labels = saved["logits"].astype(np.float64), saved["labels"]
    log_normaliser = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    assert row["test_loss"] == pytest.approx((log_normaliser - logits[np.arange(len(labels)), labels]).mean(), rel=1e-6)
    accuracy = 100 * (logits.argmax(1) == labels).mean()
    assert row["test_accuracy"] == pytest.approx(accuracy) and summary["test_accuracy"] == pytest.approx(accuracy)
    for b, attention in enumerate(saved["attention"]):
        np.testing.assert_allclose(row["expert_usage"][b], attention.mean(0), atol=1e-6)
        entropy = -(attention * np.log(np.maximum(attention, 1e-12))).sum(1).mean()  # 0 log 0 = 0
        assert row["attention_entropy"][b] == pytest.approx(entropy, rel=1e-5)


def test_eval_every_skips_epochs_but_never_the_last(tmp_path):
    summary = train("torch", tmp_path, "--epochs", "3", "--eval-every", "2")
    history = runfiles.read_metrics(tmp_path)
    assert [row["epoch"] for row in runfiles.evaluated_epochs(history)] == [2, 3]
    assert "test_accuracy" not in history[0] and "expert_usage" not in history[0]
    best = max(runfiles.evaluated_epochs(history), key=lambda row: row["test_accuracy"])
    assert summary["eval_every_epochs"] == 2 and summary["best_epoch"] == best["epoch"]
    assert summary["best_test_accuracy"] == best["test_accuracy"]
    assert summary["last_epoch_test_accuracy"] == history[-1]["test_accuracy"]
    assert (tmp_path / "curves.png").stat().st_size > 0
    for refused in ("0", "-1"):
        with pytest.raises(TrainingError, match="--eval-every of at least 1"):
            train("torch", tmp_path / "refused", "--eval-every", refused)


def test_out_of_range_flags_are_refused_together_before_the_data_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_PATH", str(tmp_path / "no-data-here"))  # loading would fail: it must not start
    with pytest.raises(TrainingError, match=r"--epochs of at least 1, found 0; --max-test-examples of at least 1, "
                       r"found -5; --lr above 0, found 0\.0; --weight-decay of at least 0, found -0\.1; "
                       r"--seed of at least 0, found -1"):
        train("torch", tmp_path / "run", "--epochs", "0", "--max-test-examples", "-5", "--lr", "0",
              "--weight-decay", "-0.1", "--seed", "-1")


def test_final_evaluation_adds_the_translated_views_and_the_weights_remember_them(tmp_path, monkeypatch, cifar10):
    tiny = get_preset("tiny")
    recipe = dataclasses.replace(tiny.train, test_time_flip=True, test_time_translate=1)
    monkeypatch.setitem(PRESETS, "tiny", dataclasses.replace(tiny, train=recipe))
    summary = train("flax", tmp_path)
    saved = np.load(tmp_path / "evaluation.npz")
    assert summary["test_accuracy"] == 100 * (saved["logits"].argmax(1) == saved["labels"]).mean()
    assert summary["last_epoch_test_accuracy"] == runfiles.read_metrics(tmp_path)[-1]["test_accuracy"]
    weights_path = tmp_path / "weights.safetensors"
    tensors, _, run_record = load_portable(weights_path)
    temperature, remembered = evaluation_settings(run_record, tiny.model, weights_path)
    assert remembered == recipe
    test_index = subset_index(len(cifar10.test_labels), summary["test_examples"])
    np.testing.assert_array_equal(saved["labels"], cifar10.test_labels[test_index])
    backend = backend_factory("flax").from_canonical(tensors, tiny.model, recipe)
    views = {translate: backend.predict(cifar10.test_images[test_index], temperature, translate).logits
             for translate in (0, 1)}
    np.testing.assert_allclose(saved["logits"], views[1], rtol=1e-5, atol=1e-5)
    assert np.abs(views[1] - views[0]).max() > 1e-3
    assert summary["final_evaluation_seconds"] > 0


def test_every_problem_of_a_config_is_reported_together():
    with pytest.raises(ValueError, match=r"invalid TrainConfig: optimizer must be one of .*, got 'adam'; "
                       r"test_time_translate must be >= 0 pixels, got -1\. Change those fields"):
        TrainConfig(optimizer="adam", test_time_translate=-1)
    with pytest.raises(ValueError, match=r"invalid ModelConfig: kernel_size must be odd .*, got 4; "
                       r"num_experts must be >= 1, got 0\. Change those fields"):
        ModelConfig(kernel_size=4, num_experts=0)
    with pytest.raises(ValueError, match=r"invalid AugmentConfig: brightness must be in \[0, 1\], got 1.5; "
                       r"crop_padding must be >= 0 pixels, got -1\. Change those fields"):
        AugmentConfig(brightness=1.5, crop_padding=-1)


def test_a_checkpoint_from_before_the_test_subset_sizes_and_segments_were_recorded_resumes(tmp_path):
    train("torch", tmp_path, "--epochs", "2")
    (tmp_path / "checkpoint-00002.ckpt").unlink()  # as if killed during epoch 2
    first = checkpoints.read_checkpoint(tmp_path / "checkpoint-00001.ckpt")
    del first.header["run"]["max_test_examples"], first.header["data_sizes"], first.header["segments"]
    checkpoints.write_checkpoint(tmp_path, 1, first.header, first.payload)
    summary = train("torch", tmp_path, "--epochs", "2", "--resume")
    assert summary["epochs"] == 2
    unknown, resumed = summary["segments"]
    assert (unknown["recorded"], unknown["epochs_trained"], resumed["start_epoch"]) == (False, 1, 1)
    assert "git_commit" not in unknown and resumed["git_commit"] == summary["git_commit"]


def test_a_checkpoint_that_recorded_a_cap_above_the_data_as_given_resumes(tmp_path):
    whole_test_set = ("--epochs", "2", "--max-test-examples", "10000")
    train("torch", tmp_path, *whole_test_set)
    (tmp_path / "checkpoint-00002.ckpt").unlink()  # as if killed during epoch 2
    first = checkpoints.read_checkpoint(tmp_path / "checkpoint-00001.ckpt")
    assert first.header["run"]["max_test_examples"] is None
    first.header["run"]["max_test_examples"] = 10000  # as written before a cap was recorded as it acts
    checkpoints.write_checkpoint(tmp_path, 1, first.header, first.payload)
    assert train("torch", tmp_path, *whole_test_set, "--resume")["test_examples"] == 10000


def test_a_cap_at_or_above_the_data_is_no_cap_so_resuming_without_it_matches():
    def spec(*flags):
        return run_spec(build_parser("torch").parse_args(["--preset", "tiny", *flags]), 50000, 10000)

    assert spec("--max-train-examples", "50000", "--max-test-examples", "20000") == spec()
    capped = spec("--max-train-examples", "49999", "--max-test-examples", "9999")
    assert (capped.max_train_examples, capped.max_test_examples) == (49999, 9999)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_resume_gives_the_same_run_as_no_interruption(framework, tmp_path):
    straight = train(framework, tmp_path / "straight", "--epochs", "2")
    train(framework, tmp_path / "resumed", "--epochs", "2")
    (tmp_path / "resumed" / "checkpoint-00002.ckpt").unlink()  # as if killed during epoch 2
    resumed = train(framework, tmp_path / "resumed", "--epochs", "2", "--resume")
    keys = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate")
    straight_rows = runfiles.read_metrics(tmp_path / "straight")
    resumed_rows = runfiles.read_metrics(tmp_path / "resumed")
    assert [[r[k] for k in keys] for r in resumed_rows] == [[r[k] for k in keys] for r in straight_rows]
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    # Each process's share is on record: epochs, commit, command, device, and its own speed.
    assert [(s["start_epoch"], s["epochs_trained"]) for s in straight["segments"]] == [(0, 2)]
    assert [(s["start_epoch"], s["epochs_trained"]) for s in resumed["segments"]] == [(0, 1), (1, 1)]
    for segment, row in zip(resumed["segments"], resumed_rows):
        assert segment["train_wall_seconds"] == round(row["epoch_seconds"], 2)
        assert segment["images_per_second"] == round(row["images_per_second"], 1)
        for key in ("git_commit", "command", "device", "cpu"):  # one process ran both segments here
            assert segment[key] == resumed[key], key


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_resume_keeps_the_lookahead_average(framework, tmp_path, monkeypatch):
    tiny = get_preset("tiny")
    monkeypatch.setitem(PRESETS, "tiny", dataclasses.replace(tiny, train=dataclasses.replace(
        tiny.train, lookahead_period=3)))
    test_resume_gives_the_same_run_as_no_interruption(framework, tmp_path)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_resume_is_exact_under_the_fast_recipe(framework, tmp_path, monkeypatch):
    """AdamW, the one-cycle schedule, the whitening stem (drawn once, never again on resume) and
    test-time views: what the fast preset's runs resume with."""
    tiny = get_preset("tiny")
    recipe = dataclasses.replace(get_preset("fast").train, epochs=tiny.train.epochs, batch_size=tiny.train.batch_size)
    monkeypatch.setitem(PRESETS, "tiny", dataclasses.replace(tiny, train=recipe))
    test_resume_gives_the_same_run_as_no_interruption(framework, tmp_path)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_same_seed_same_losses_and_other_seed_differs(framework, tmp_path):
    twenty_steps = ["--epochs", "1", "--max-train-examples", "640"]
    first = train(framework, tmp_path / "a", *twenty_steps)
    second = train(framework, tmp_path / "b", *twenty_steps)
    train(framework, tmp_path / "c", *twenty_steps, "--seed", "1")
    rows = [runfiles.read_metrics(tmp_path / name)[0]["train_loss"] for name in "abc"]
    assert rows[0] == rows[1] and rows[0] != rows[2]
    assert first["test_accuracy"] == second["test_accuracy"]


def test_recipe_flags_override_the_preset_and_are_recorded(tmp_path):
    summary = train("torch", tmp_path, "--epochs", "1", "--optimizer", "sgd_nesterov", "--lr", "0.05",
                    "--weight-decay", "0.001")
    recipe = summary["train"]
    assert (recipe["optimizer"], recipe["learning_rate"], recipe["weight_decay"]) == ("sgd_nesterov", 0.05, 0.001)
    assert get_preset("tiny").train.optimizer != "sgd_nesterov"


def test_refuses_non_empty_directory_and_mismatched_resume(tmp_path):
    train("torch", tmp_path, "--epochs", "1")
    with pytest.raises(TrainingError, match="--resume .* or --overwrite"):
        train("torch", tmp_path, "--epochs", "1")
    with pytest.raises(TrainingError, match=r"max_test_examples: 200 -> 100; precision: 'float32' -> 'float64'; "
                       r"train\.batch_size: 32 -> 16.*train\.learning_rate"):
        train("torch", tmp_path, "--epochs", "1", "--resume", "--batch-size", "16", "--lr", "0.5",
              "--precision", "float64", "--max-test-examples", "100")
    assert train("torch", tmp_path, "--epochs", "1", "--overwrite")["epochs"] == 1


def test_overwrite_refuses_a_directory_that_holds_no_run(tmp_path):
    (tmp_path / "runs" / "an-earlier-run").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")
    for out in (tmp_path, tmp_path / "runs"):  # a mistyped --out: the project's root, the runs' parent
        with pytest.raises(TrainingError, match="--overwrite deletes a run directory, and .* holds no metrics.jsonl"):
            train("torch", out, "--epochs", "1", "--overwrite")
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "runs" / "an-earlier-run").is_dir()


def test_resume_refuses_a_checkpoint_of_other_data_sizes_or_a_state_that_does_not_load(tmp_path):
    train("torch", tmp_path, "--epochs", "1")
    written = checkpoints.read_checkpoint(tmp_path / "checkpoint-00001.ckpt")
    header = {**written.header, "data_sizes": {**written.header["data_sizes"], "test_images": 150}}
    checkpoints.write_checkpoint(tmp_path, 1, header, written.payload)
    with pytest.raises(TrainingError, match=r"trained on data of .*'test_images': 150.*'test_images': 200"):
        train("torch", tmp_path, "--epochs", "1", "--resume")
    checkpoints.write_checkpoint(tmp_path, 1, written.header, b"not a torch state")
    with pytest.raises(TrainingError, match="passed its checksum but its state does not load here"):
        train("torch", tmp_path, "--epochs", "1", "--resume")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_non_finite_loss_stops_at_once_naming_the_step(framework, tmp_path):
    with pytest.raises(TrainingError, match=r"at optimiser step \d+ \(epoch 1\)"):
        train(framework, tmp_path, "--epochs", "2", "--lr", "1e30")
    assert checkpoints.list_checkpoints(tmp_path) == []  # a diverged epoch is never saved


def test_main_exits_non_zero_with_a_message(tmp_path, capsys):
    from torch_reference.train import TorchBackend

    assert main(TorchBackend, "torch", [*SHORT, "--out", str(tmp_path), "--epochs", "1", "--lr", "1e30"]) == 1
    assert "the loss became" in capsys.readouterr().err


def test_main_reports_missing_data_and_a_missing_gpu_as_messages(tmp_path, capsys, monkeypatch):
    import torch
    from torch_reference.train import TorchBackend

    with monkeypatch.context() as patch:
        patch.setenv("CIFAR10_PATH", str(tmp_path / "no-data-here"))
        assert main(TorchBackend, "torch", [*SHORT, "--out", str(tmp_path / "a")]) == 1
    assert "no-data-here: expected a CIFAR-10 archive" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(TorchBackend, "torch", [*SHORT, "--out", str(tmp_path / "b"), "--device", "cuda"]) == 1
        assert "--device cuda: expected a CUDA GPU, found none" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("not a directory")
    assert main(TorchBackend, "torch", [*SHORT, "--out", str(tmp_path / "a-file"), "--epochs", "1"]) == 1
    assert "could not write the run directory in" in capsys.readouterr().err
    too_long = tmp_path / ("x" * 300)  # listing it raises ENAMETOOLONG, an OSError, even as root
    assert main(TorchBackend, "torch", [*SHORT, "--out", str(too_long), "--epochs", "1"]) == 1
    assert "could not list the run directory" in capsys.readouterr().err


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_twenty_steps_twice_give_identical_losses(framework, cifar10):
    preset = get_preset("tiny")

    def losses():
        backend = backend_factory(framework)(preset.model, preset.train, steps_per_epoch=20, seed=7, device="cpu")
        batch = preset.train.batch_size
        return [float(backend.train_step(cifar10.train_images[i * batch:(i + 1) * batch],
                                         cifar10.train_labels[i * batch:(i + 1) * batch], i, 1.0)[0])
                for i in range(20)]

    first = losses()
    assert first == losses()
    assert len(set(first)) > 1


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_step_other_than_the_backends_own_count_is_refused(framework, cifar10):
    preset = get_preset("tiny")
    backend = backend_factory(framework)(preset.model, preset.train, steps_per_epoch=20, seed=0, device="cpu")
    images, labels = cifar10.train_images[:8], cifar10.train_labels[:8]
    backend.train_step(images, labels, 0, 1.0)
    with pytest.raises(RuntimeError, match="expected optimiser step 1, the driver asked for 0"):
        backend.train_step(images, labels, 0, 1.0)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bfloat16_trains_close_to_float32_and_keeps_float32_state(framework, cifar10):
    preset = get_preset("tiny")
    images, labels = cifar10.train_images[:32], cifar10.train_labels[:32]

    def first_losses(precision):
        backend = backend_factory(framework)(preset.model, preset.train, steps_per_epoch=20, seed=3,
                                             device="cpu", precision=precision)
        losses = [float(backend.train_step(images, labels, step, 1.0)[0]) for step in range(3)]
        return losses, backend.canonical_weights()

    full, _ = first_losses("float32")
    half, weights = first_losses("bfloat16")
    assert {str(w.dtype) for w in weights.values()} <= {"float32", "int64"}
    assert half != full  # the convolutions really ran in bfloat16
    np.testing.assert_allclose(half, full, rtol=2e-2)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_replace_weights_changes_the_named_tensors_only_and_refuses_strangers(framework):
    preset = get_preset("tiny")
    backend = backend_factory(framework)(preset.model, preset.train, steps_per_epoch=1, seed=0, device="cpu")
    before = backend.canonical_weights()
    stem = np.arange(before["stem.conv.weight"].size, dtype=np.float32).reshape(before["stem.conv.weight"].shape)
    backend.replace_weights({"stem.conv.weight": stem})
    after = backend.canonical_weights()
    np.testing.assert_array_equal(after.pop("stem.conv.weight"), stem)
    for key, value in after.items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    with pytest.raises(PortingError, match=r"unexpected: stem\.conv\.kernel[\s\S]*wrong shape: stem\.bn\.weight"):
        backend.replace_weights({"stem.conv.kernel": stem, "stem.bn.weight": np.ones(3, np.float32)})


def test_both_frameworks_draw_their_initial_weights_from_the_same_distributions():
    """Each backend draws its own initial weights; parity tests copy one side's, so only this sees the
    initialisers (a lost fan mode or expert axis scales a tensor's spread by sqrt(fan ratio) or sqrt(K))."""
    preset = get_preset("seed")
    weights = [backend_factory(framework)(preset.model, preset.train, steps_per_epoch=1, seed=0,
                                          device="cpu").canonical_weights() for framework in FRAMEWORKS]
    assert weights[0].keys() == weights[1].keys()
    for name, torch_value in weights[0].items():
        flax_value = weights[1][name]
        if torch_value.std() == 0:  # BatchNorm's ones and zeros
            np.testing.assert_array_equal(flax_value, torch_value, err_msg=name)
            continue
        if torch_value.size >= 32:  # the largest of 32 uniform draws tops 2/3 of their bound but at odds of 2e-6
            assert 2 / 3 < np.abs(flax_value).max() / np.abs(torch_value).max() < 1.5, name
        if torch_value.size >= 256:  # tolerances of 5 or more standard errors of the two estimates
            assert flax_value.std() == pytest.approx(torch_value.std(), rel=0.2), name
            assert abs(flax_value.mean() - torch_value.mean()) < 0.3 * torch_value.std(), name


def test_both_frameworks_start_from_the_same_stem_whitened_on_every_class(cifar10):
    preset = get_preset("tiny")
    train = dataclasses.replace(preset.train, stem_init="whitening")
    stems = []
    for framework in FRAMEWORKS:
        backend = backend_factory(framework)(preset.model, train, steps_per_epoch=1, seed=0, device="cpu")
        initialise_from_data(backend, train, preset.model, cifar10.train_images)
        stems.append(backend.canonical_weights()["stem.conv.weight"])
    np.testing.assert_array_equal(stems[0], stems[1])
    sample = subset_index(len(cifar10.train_images), PATCH_IMAGES)
    np.testing.assert_array_equal(stems[0], whitening_stem_kernel(cifar10.train_images[sample], 3, 8))
    # The shared copy is an image folder, read class by class: its first 1000 images are all airplanes.
    assert np.bincount(cifar10.train_labels[sample], minlength=10).min() >= 50


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_dirac_initialisation_changes_the_expert_kernels_and_nothing_else(framework, cifar10):
    preset = get_preset("tiny")
    train = dataclasses.replace(preset.train, expert_kernel_init="dirac")
    backend = backend_factory(framework)(preset.model, train, steps_per_epoch=1, seed=0, device="cpu")
    before = backend.canonical_weights()
    initialise_from_data(backend, train, preset.model, cifar10.train_images)
    after = backend.canonical_weights()
    for key, value in after.items():
        expected = dirac_expert_kernels(before[key]) if key.endswith(".kernels") else before[key]
        np.testing.assert_array_equal(value, expected, err_msg=key)


def test_a_checkpoint_written_before_a_recipe_field_existed_resumes_and_an_unknown_field_is_named():
    spec = RunSpec("tiny", get_preset("tiny").model, get_preset("tiny").train, seed=0, max_train_examples=None)
    older = spec.as_dict()
    del older["train"]["norm_bias_lr_scale"], older["train"]["expert_kernel_init"], older["precision"]
    assert recorded_spec(older) == spec.as_dict()
    newer = spec.as_dict()
    newer["train"]["lookahead"] = 0.5
    assert _differences(recorded_spec(newer), spec.as_dict()) == ["train.lookahead: 0.5 -> None"]


@pytest.mark.parametrize("recorded, now, warned", [
    ("imagefolder:/data/cifar10-jpeg", "tarball:/data/cifar-10-python.tar.gz", True),
    ("tarball:/data/cifar-10-python.tar.gz", "batches:/elsewhere/cifar-10-batches-py", False),
    ("batches:/data/cifar-10-batches-py", "tfds:cifar10", False),
    ("imagefolder:/data/cifar10-jpeg", "imagefolder:/moved/cifar10-jpeg", False)])
def test_resuming_on_another_kind_of_pixels_warns_and_a_moved_copy_does_not(recorded, now, warned):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_if_the_pixels_changed(recorded, now)
    assert [str(w.message).startswith(f"--resume: the checkpoint trained on {recorded}") for w in caught] == (
        [True] if warned else [])


def test_loading_a_whole_model_refuses_a_partial_one():
    preset = get_preset("tiny")
    tensors = backend_factory("torch")(preset.model, preset.train, steps_per_epoch=1, seed=0,
                                       device="cpu").canonical_weights()
    del tensors["blocks.1.kernels"]
    with pytest.raises(PortingError, match=r"missing: blocks\.1\.kernels"):
        backend_factory("flax").from_canonical(tensors, preset.model)


def test_the_recorded_command_has_the_environment_and_launcher_that_shaped_the_run(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["scripts/train_torch.py", "--preset", "tiny"])
    for name in (*runfiles.RUN_ENVIRONMENT, "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    assert runfiles.command_line() == f"{Path(sys.executable).name} scripts/train_torch.py --preset tiny"
    # torchrun on 2 nodes of 2 processes, with XLA flags that need quoting and thread count
    for name, value in (("XLA_FLAGS", "--a=1 --b=2"), ("OMP_NUM_THREADS", "1"), ("TORCHELASTIC_RUN_ID", "r"),
                        ("WORLD_SIZE", "4"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    assert runfiles.command_line() == ("XLA_FLAGS='--a=1 --b=2' OMP_NUM_THREADS=1 torchrun --nnodes=2 "
                                       "--nproc_per_node=2 scripts/train_torch.py --preset tiny")
