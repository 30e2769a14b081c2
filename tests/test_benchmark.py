"""The benchmark script runs end to end and writes what its table shows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from expert_core.runfiles import git_commit
from scripts_as_modules import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_measures_both_frameworks_and_both_ratios(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "scripts/benchmark.py", "--presets", "tiny", "--merges", "branches",
                             "aggregated", "--batch-size", "16", "--repeats", "1", "--processes", "1",
                             "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    benchmark = json.loads(out.read_text())
    assert benchmark["git_commit"].startswith(git_commit().removesuffix("-dirty"))
    assert "scripts/benchmark.py --presets tiny" in benchmark["command"]
    rows = benchmark["rows"]
    assert {(r["framework"], r["merge"]) for r in rows} == {(f, m) for f in ("flax", "torch")
                                                           for m in ("branches", "aggregated")}
    for row in rows:
        assert len(row["train_images_per_second_each_process"]) == 1
        assert row["train_images_per_second"] > 0 and row["eval_images_per_second"] > 0 and row["merge_ms"] > 0
        assert (row["compile_seconds"] is None) == (row["framework"] == "torch")  # eager PyTorch compiles nothing
    assert "tiny / aggregated: Flax / PyTorch train-step ratio" in result.stdout
    assert "tiny / torch: aggregated / branches train-step ratio" in result.stdout
    assert "merges alone (forward + backward)" in result.stdout


def test_benchmark_refuses_every_count_below_one_together(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script("benchmark").main(["--repeats", "0", "--processes", "-1"])
    assert exit_info.value.code == 2
    assert "expected --repeats of at least 1, found 0; --processes of at least 1, found -1." in capsys.readouterr().err


def test_ratios_are_flax_over_torch_and_each_merge_over_branches(capsys):
    def row(framework, merge, images_per_second, merge_ms):
        return {"preset": "p", "framework": framework, "merge": merge, "train_images_per_second": images_per_second,
                "merge_ms": merge_ms}

    rows = [row("flax", "branches", 100, 40.0), row("flax", "aggregated", 300, 10.0),
            row("torch", "branches", 200, 20.0), row("torch", "aggregated", 250, 8.0), row("torch", "stacked", 1, 1.0)]
    load_script("benchmark").print_ratios(rows, "p")
    assert capsys.readouterr().out.splitlines() == [
        "p / branches: Flax / PyTorch train-step ratio 0.50",
        "p / aggregated: Flax / PyTorch train-step ratio 1.20",
        "p / flax: aggregated / branches train-step ratio 3.00, merges alone (forward + backward) 4.00",
        "p / torch: aggregated / branches train-step ratio 1.25, merges alone (forward + backward) 2.50",
        "p / torch: stacked / branches train-step ratio 0.01, merges alone (forward + backward) 20.00"]


def test_the_peak_counts_hyperthreads_of_one_core_once():
    benchmark = load_script("benchmark")
    core_cpus = {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3", 4: "4"}
    assert benchmark.physical_cores([0, 1, 2, 3], core_cpus.get) == 2
    assert benchmark.physical_cores([0, 4], core_cpus.get) == 2
    assert benchmark.physical_cores([0, 2, 7, 8], core_cpus.get) == 3  # CPUs without a known topology count alone
    assert benchmark.sysfs_core(10 ** 6) is None  # no such CPU: no topology, no error
