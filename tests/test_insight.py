"""scripts/report.py, scripts/predict.py and scripts/evaluate.py on small real runs of both frameworks,
written by the test."""

import json
import re
import shutil
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from expert_core import checkpoints, runfiles
from expert_core.config import CLASS_NAMES
from expert_core.portable import load_portable, save_portable
from expert_core.report import Run, evaluated_images, load_runs, probabilities, read_image, worst_mistakes
from expert_core.training import build_parser, run
from scripts_as_modules import load_script

SMALL = ["--preset", "tiny", "--max-train-examples", "512", "--max-test-examples", "200"]

report_cli, predict_cli, evaluate_cli = load_script("report"), load_script("predict"), load_script("evaluate")
check_parity_cli = load_script("check_parity")


@pytest.fixture(scope="module")
def runs(cifar10, tmp_path_factory):
    """A 2-epoch Flax run and a 1-epoch PyTorch run of the tiny preset on 200 of the test images."""
    from flax_expert.train import FlaxBackend
    from torch_reference.train import TorchBackend

    root = tmp_path_factory.mktemp("runs")
    for framework, factory, epochs in (("flax", FlaxBackend, "2"), ("torch", TorchBackend, "1")):
        args = build_parser(framework).parse_args([*SMALL, "--epochs", epochs, "--out", str(root / framework)])
        run(factory, framework, args)
    return {"flax": root / "flax", "torch": root / "torch"}


class Page(HTMLParser):
    """The images and the worst-mistakes tables of a report page."""

    def __init__(self):
        super().__init__()
        self.images, self.mistakes, self.headings = [], {}, []
        self._table, self._row, self._cell, self._heading = None, None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "table" and "mistakes" in attrs.get("class", ""):
            self._table = self.mistakes.setdefault(attrs["data-run"], [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "h2":
            self._heading = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._heading is not None:
            self._heading += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row[0] != "rank":
                self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "h2":
            self.headings.append(self._heading)
            self._heading = None


def parse_report(out: Path) -> Page:
    page = Page()
    page.feed((out / "report.html").read_text())
    page.close()
    assert page.images
    for src in page.images:
        path = (out / src).resolve()
        assert path.parent == out.resolve() and path.suffix == ".png", src  # relative, next to report.html
        with Image.open(path) as image:
            assert image.format == "PNG", src
            image.verify()
    return page


def check_mistakes(rows, run_dir: Path, cifar10):
    """Rows are wrong answers, most confident first, and no mistake left out is more confident."""
    evaluation = runfiles.read_evaluation(run_dir)
    probs = probabilities(evaluation["logits"])
    position = {int(t): p for p, t in enumerate(evaluation["test_index"])}
    confidences = []
    for rank, (shown_rank, test_index, true, predicted, p_predicted, p_true) in enumerate(rows, 1):
        p = position[int(test_index)]
        assert int(shown_rank) == rank
        assert true == CLASS_NAMES[cifar10.test_labels[int(test_index)]] != predicted
        assert predicted == CLASS_NAMES[probs[p].argmax()]
        assert float(p_predicted) == pytest.approx(probs[p].max(), abs=1e-4)
        assert float(p_true) == pytest.approx(probs[p, evaluation["labels"][p]], abs=1e-4)
        confidences.append(float(p_predicted))
    assert confidences == sorted(confidences, reverse=True)
    wrong = probs.argmax(1) != evaluation["labels"]
    assert min(len(rows), 40) == min(wrong.sum(), 40)
    shown = {position[int(row[1])] for row in rows}
    left_out = [probs[p].max() for p in np.flatnonzero(wrong) if p not in shown]
    assert not left_out or max(left_out) <= confidences[-1] + 1e-4


def test_report_on_both_runs(runs, cifar10, tmp_path, capsys):
    out = tmp_path / "both"
    assert report_cli.main([str(runs["flax"]), str(runs["torch"]), "--out", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    page = parse_report(out)
    assert page.headings == ["Runs", "Training curves", "Accuracy per class and confusion",
                             "What the experts attend to", "Expert usage over training", "Worst mistakes"]
    assert len(page.images) == 1 + 1 + 4 * 2  # curves, per-class accuracy; 4 figures per run
    final_row = re.search(r"<th>final test accuracy, every test-time view</th>(.*?)</tr>",
                          (out / "report.html").read_text()).group(1)
    assert re.findall("<td>(.*?)</td>", final_row) == [
        f"{json.loads((runs[framework] / 'summary.json').read_text())['test_accuracy']:.2f} %"
        for framework in ("flax", "torch")]
    segments_row = re.search(r"<th>trained by \(epochs: commit, device\)</th>(.*?)</tr>",
                             (out / "report.html").read_text()).group(1)
    assert [cell.split(":")[0] for cell in re.findall("<td>(.*?)</td>", segments_row)] == ["epochs 1-2", "epochs 1-1"]
    assert set(page.mistakes) == {"flax", "torch"}
    for framework, rows in page.mistakes.items():
        check_mistakes(rows, runs[framework], cifar10)


def test_report_on_one_run_defaults_to_its_directory(runs, tmp_path):
    run_dir = tmp_path / "flax-copy"
    shutil.copytree(runs["flax"], run_dir)
    assert report_cli.main([str(run_dir)]) == 0
    page = parse_report(run_dir / "report")
    assert list(page.mistakes) == ["flax-copy"] and len(page.images) == 6


def test_report_on_a_run_still_training_shows_what_its_metrics_allow(runs, tmp_path):
    run_dir = tmp_path / "unfinished"
    run_dir.mkdir()
    shutil.copy(runs["flax"] / runfiles.METRICS_FILE, run_dir)
    assert report_cli.main([str(run_dir), "--out", str(tmp_path / "out")]) == 0
    page = parse_report(tmp_path / "out")
    assert page.headings == ["Runs", "Training curves", "Expert usage over training"]
    assert "no summary.json yet" in (tmp_path / "out" / "report.html").read_text()


def test_report_draws_only_the_evaluated_epochs_and_refuses_a_run_without_one(runs, tmp_path, capsys):
    run_dir = tmp_path / "sparse"
    run_dir.mkdir()
    history = runfiles.read_metrics(runs["flax"])
    unevaluated = {key: value for key, value in history[0].items() if key in ("epoch", "train_loss",
                   "train_accuracy", "learning_rate", "temperature", "train_seconds", "images_per_second")}
    runfiles.write_metrics(run_dir, [unevaluated, *history[1:]])
    assert report_cli.main([str(run_dir), "--out", str(tmp_path / "out")]) == 0
    assert parse_report(tmp_path / "out").headings == ["Runs", "Training curves", "Expert usage over training"]
    runfiles.write_metrics(run_dir, [unevaluated])
    assert report_cli.main([str(run_dir), "--out", str(tmp_path / "out")]) == 1
    assert "none evaluated" in capsys.readouterr().err


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert report_cli.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "expected a run directory" in error and "metrics.jsonl" in error


def test_report_refuses_a_damaged_metrics_file_with_one_clear_error(runs, tmp_path, capsys):
    run_dir = tmp_path / "damaged"
    shutil.copytree(runs["flax"], run_dir)
    (run_dir / runfiles.METRICS_FILE).write_bytes(b'{"epoch": 1, "train_lo')
    assert report_cli.main([str(run_dir), "--out", str(tmp_path / "out")]) == 1
    assert "metrics.jsonl: expected one JSON object per line, found a damaged file" in capsys.readouterr().err


def test_runs_named_alike_never_share_a_figure_name(runs, tmp_path):
    copies = [tmp_path / "x" / "a", tmp_path / "y" / "a", tmp_path / "z" / "a-2"]
    for copy in copies:
        shutil.copytree(runs["flax"], copy)
    assert [run.slug for run in load_runs(copies)] == ["a", "a-2", "a-2-2"]
    cased = [tmp_path / "u" / "Seed", tmp_path / "v" / "seed"]  # one file name on macOS and Windows
    for copy in cased:
        shutil.copytree(runs["flax"], copy)
    assert [run.slug for run in load_runs(cased)] == ["Seed", "seed-2"]


def test_a_class_missing_from_the_test_subset_has_no_mean_attention_rather_than_a_warning():
    attention = [np.array([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        per_class = runfiles.attention_per_class(attention, np.array([0, 0, 2]), 3)
    np.testing.assert_array_equal(per_class[0, 0], [0.375, 0.625])
    assert np.isnan(per_class[0, 1]).all()
    np.testing.assert_array_equal(per_class[0, 2], [1.0, 0.0])


def test_worst_mistakes_most_confident_wrong_answer_first():
    logits = np.log(np.array([[0.7, 0.2, 0.1],  # right
                              [0.2, 0.6, 0.2],  # wrong, 0.6
                              [0.1, 0.1, 0.8],  # wrong, 0.8
                              [0.5, 0.5, 0.0001]]) + 1e-12)  # wrong? argmax 0 = label 0: right
    assert worst_mistakes(logits, np.array([0, 0, 1, 0]), 10).tolist() == [2, 1]
    assert worst_mistakes(logits, np.array([0, 0, 1, 0]), 1).tolist() == [2]


def test_grid_needs_to_know_which_test_images_were_evaluated(cifar10):
    def fake_run(labels, index=None):
        evaluation = {"labels": labels} if index is None else {"labels": labels, "test_index": index}
        return Run("r", "r", Path("r"), [], None, evaluation)

    images, _ = evaluated_images(fake_run(cifar10.test_labels), cifar10)  # an old full-test-set run
    assert images is cifar10.test_images or np.array_equal(images, cifar10.test_images)
    images, problem = evaluated_images(fake_run(cifar10.test_labels[:200]), cifar10)
    assert images is None and "does not record which" in problem
    images, problem = evaluated_images(fake_run((cifar10.test_labels[:5] + 1) % 10, np.arange(5)), cifar10)
    assert images is None and "--data" in problem
    wrapped = np.array([-1])  # numpy would read the last test image, whose label this one matches
    images, problem = evaluated_images(fake_run(cifar10.test_labels[wrapped], wrapped), cifar10)
    assert images is None and "--data" in problem


@pytest.fixture(scope="module")
def image_files(runs, cifar10, tmp_path_factory):
    """Exact test images of the runs' evaluation as PNG, and files that must each fail on their own."""
    root = tmp_path_factory.mktemp("images")
    index = runfiles.read_evaluation(runs["flax"])["test_index"][:3]
    exact = []
    for i in index:
        exact.append(root / f"test-{i}.png")
        Image.fromarray(cifar10.test_images[i]).save(exact[-1])
    picture = Image.fromarray(cifar10.test_images[index[0]])
    picture.resize((96, 64)).save(root / "wide.jpg")
    picture.convert("RGBA").save(root / "opaque-rgba.png")
    picture.convert("L").save(root / "grayscale.png")
    picture.convert("CMYK").save(root / "cmyk.jpg")
    translucent = picture.convert("RGBA")
    translucent.putalpha(128)
    translucent.save(root / "translucent.png")
    (root / "corrupt.png").write_bytes(exact[0].read_bytes()[:200])
    files = {"exact": exact, "ok": [root / "wide.jpg", root / "opaque-rgba.png"],
             "failing": {"grayscale.png": "grayscale", "cmyk.jpg": "CMYK", "translucent.png": "transparent",
                         "corrupt.png": "cannot read", "missing.png": "found nothing there"}}
    return files, root, index


@pytest.mark.parametrize("framework, checkpoint", [("flax", "checkpoint-00002.ckpt"),
                                                   ("torch", "checkpoint-00001.ckpt"),
                                                   ("flax", "")])  # a run directory: its portable weights
def test_predict_matches_the_runs_own_evaluation(runs, image_files, framework, checkpoint, tmp_path, capsys):
    files, root, _ = image_files
    paths = [*files["exact"], *files["ok"], *(root / name for name in files["failing"])]
    out = tmp_path / "predictions.json"
    status = predict_cli.main(["--checkpoint", str(runs[framework] / checkpoint), *map(str, paths),
                               "--json", str(out)])
    assert status == 1  # some files failed
    records = json.loads(out.read_text())
    assert [r["file"] for r in records] == list(map(str, paths))
    evaluation = runfiles.read_evaluation(runs[framework])
    for i, record in enumerate(records[:len(files["exact"])]):
        np.testing.assert_allclose(record["logits"], evaluation["logits"][i], atol=1e-4)
        for b, attention in enumerate(record["attention"]):
            np.testing.assert_allclose(attention, evaluation["attention"][b][i], atol=1e-5)
    for record in records[:len(files["exact"]) + len(files["ok"])]:
        check_prediction_structure(record)
    assert records[3]["notes"] == ["resized from 96x64 to 32x32, centre 64x64 square"]
    assert records[4]["notes"] == ["fully opaque alpha channel dropped"]
    np.testing.assert_allclose(records[4]["logits"], evaluation["logits"][0], atol=1e-4)  # the first test image
    failed = records[len(files["exact"]) + len(files["ok"]):]
    for record, (name, words) in zip(failed, files["failing"].items()):
        assert not record["ok"] and record["error"].startswith(str(root / name)) and words in record["error"]
    printed = capsys.readouterr()
    assert printed.out.count(": 1. ") == 5 and printed.err.count("error: ") == 5


def test_read_image_crops_the_centre_square_of_a_wide_image(tmp_path):
    wide = np.zeros((64, 96, 3), np.uint8)
    wide[:, :16], wide[:, 16:80], wide[:, 80:] = (0, 0, 255), (200, 40, 10), (0, 255, 0)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    pixels, notes = read_image(tmp_path / "wide.png")
    assert notes == ["resized from 96x64 to 32x32, centre 64x64 square"]
    # Lanczos reaches a few source pixels past the box: the outer columns may ring faintly, never show a band.
    assert np.abs(pixels.astype(int) - [200, 40, 10]).max() <= 16  # 13 at the edge; a band would be 200 off
    np.testing.assert_array_equal(pixels[:, 3:-3], np.broadcast_to([200, 40, 10], (32, 26, 3)))


def test_read_image_converts_a_palette_image_and_follows_its_exif_orientation(tmp_path):
    picture = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    palette = Image.fromarray(picture).quantize(256)
    palette.save(tmp_path / "palette.png")
    pixels, notes = read_image(tmp_path / "palette.png")
    assert notes == ["palette image converted to RGB"]
    np.testing.assert_array_equal(pixels, np.asarray(palette.convert("RGB")))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned, show the picture rotated 90 degrees clockwise
    Image.fromarray(picture).save(tmp_path / "turned.png", exif=exif)
    pixels, notes = read_image(tmp_path / "turned.png")
    np.testing.assert_array_equal(pixels, np.rot90(picture, k=-1))
    assert notes == []


def check_prediction_structure(record):
    assert record["ok"] and len(record["probabilities"]) == len(CLASS_NAMES)
    assert sum(record["probabilities"].values()) == pytest.approx(1, abs=1e-6)
    top = [t["probability"] for t in record["top3"]]
    assert len(top) == 3 and top == sorted(top, reverse=True)
    assert top[0] == max(record["probabilities"].values())
    assert record["top3"][0]["class"] == CLASS_NAMES[int(np.argmax(record["logits"]))]
    assert len(record["attention"]) == 2  # the tiny preset's blocks
    for attention in record["attention"]:
        assert len(attention) == 2 and sum(attention) == pytest.approx(1, abs=1e-5)


def test_predict_all_good_files_exit_zero_and_help_states_the_policy(runs, image_files, capsys):
    files, _, _ = image_files
    assert predict_cli.main(["--checkpoint", str(runs["torch"]), str(files["exact"][0])]) == 0
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main(["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Grayscale, CMYK, translucent RGBA" in help_text and "resized to 32x32" in help_text


def test_predict_unusable_checkpoint_is_one_clear_error(tmp_path, image_files, capsys):
    files, _, _ = image_files
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    assert predict_cli.main(["--checkpoint", str(bogus), str(files["exact"][0])]) == 1
    assert "not an expert-cnn checkpoint" in capsys.readouterr().err
    assert predict_cli.main(["--checkpoint", str(tmp_path), str(files["exact"][0])]) == 1
    assert "found neither" in capsys.readouterr().err


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_evaluate_scores_a_run_alike_in_both_frameworks_as_the_run_did(runs, framework, tmp_path):
    out = tmp_path / "evaluate.json"
    assert evaluate_cli.main(["--checkpoint", str(runs[framework]), "--json", str(out)]) == 0  # its 200 images
    result = json.loads(out.read_text())
    assert result["written_by"] == "portable" and result["predictions_differing"] == 0
    evaluation = runfiles.read_evaluation(runs[framework])  # the run's own evaluation of the same 200 images
    run_correct = int((evaluation["logits"].argmax(1) == evaluation["labels"]).sum())
    assert result["torch"] == result["flax"] == {"correct": run_correct, "test_accuracy": run_correct / 2}


def test_evaluate_unusable_checkpoint_is_one_clear_error(tmp_path, capsys):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    assert evaluate_cli.main(["--checkpoint", str(bogus)]) == 1
    assert "not an expert-cnn checkpoint" in capsys.readouterr().err
    assert evaluate_cli.main(["--checkpoint", str(tmp_path)]) == 1
    assert "found neither" in capsys.readouterr().err


def test_a_run_directory_without_portable_weights_gives_its_newest_checkpoint_read_once(runs, tmp_path,
                                                                                       monkeypatch):
    from parity.convert import load_for_evaluation

    run_dir = shutil.copytree(runs["flax"], tmp_path / "run")
    (run_dir / "weights.safetensors").unlink()
    reads, read = [], checkpoints.read_checkpoint
    monkeypatch.setattr(checkpoints, "read_checkpoint", lambda path: reads.append(path) or read(path))
    weights = load_for_evaluation(run_dir)
    assert reads == [run_dir / "checkpoint-00002.ckpt"] == [weights.path]
    assert (weights.origin, weights.max_test_examples) == ("flax", 200)


def test_evaluate_a_checkpoint_whose_model_is_from_another_version_is_one_clear_error(runs, tmp_path, capsys):
    checkpoint = checkpoints.latest_checkpoint(runs["torch"])
    run = checkpoint.header["run"]
    newer = {**checkpoint.header, "run": {**run, "model": {**run["model"], "expert_groups": 2}}}
    path = checkpoints.write_checkpoint(tmp_path, 1, newer, checkpoint.payload)
    assert evaluate_cli.main(["--checkpoint", str(path)]) == 1
    assert f"{path}: expected a model config with the fields of expert_core.config.ModelConfig, found one this " \
           "code cannot read" in capsys.readouterr().err


def test_evaluate_a_recipe_from_another_version_is_one_clear_error(runs, tmp_path, capsys):
    tensors, config, extra = load_portable(runs["flax"] / "weights.safetensors")
    newer = tmp_path / "newer.safetensors"
    save_portable(newer, tensors, config, {**extra, "train": {**extra["train"], "lookahead_sync": 3}})
    assert evaluate_cli.main(["--checkpoint", str(newer)]) == 1
    assert f"{newer} records a recipe this code cannot read" in capsys.readouterr().err


def test_check_parity_on_a_trained_checkpoint_passes_and_writes_its_table(runs, tmp_path, capsys):
    out = tmp_path / "parity.json"
    assert check_parity_cli.main(["--checkpoint", str(runs["torch"]), "--images", "32", "--steps", "2",
                                  "--batch-size", "16", "--json", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["weights"].startswith("portable checkpoint") and table["images"] == 32
    assert table["checks"] and all(check["passed"] for check in table["checks"])
    judged = [c["quantity"] for c in table["checks"] if c["tolerance"] is not None]
    assert "eval logits" in judged and any(q.endswith("after 2 steps, float64") for q in judged), judged
    assert f"{len(judged)} passed, 0 failed" in capsys.readouterr().out


@pytest.mark.parametrize("script, arguments", [("benchmark", []), ("check_parity", []),
                                               ("evaluate", ["--checkpoint", "run"]),
                                               ("predict", ["--checkpoint", "run", "cat.png"])])
def test_a_json_path_that_cannot_be_written_is_refused_before_any_work(script, arguments, tmp_path, capsys):
    for path, problem in ((tmp_path / "missing" / "out.json", "does not exist"), (tmp_path, "is a directory")):
        with pytest.raises(SystemExit) as exit_info:
            load_script(script).main([*arguments, "--json", str(path)])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert f"expected --json to name a file that can be written, found {path}: " in error and problem in error
