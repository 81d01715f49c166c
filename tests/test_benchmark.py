"""The training-step benchmark runs end to end at its smoke-test size and reports its figures."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_step  # noqa: E402


@pytest.mark.slow
def test_quick_run_writes_every_configuration_and_the_inference_rows(tmp_path):
    configs = ["floor", "aurora128", "aurora128-per-token", "uni512"]
    train_step.main(
        ["--quick", "--no-memory", "--configs", ",".join(configs), "--out", str(tmp_path)]
    )

    result = json.loads((tmp_path / "results.json").read_text())
    rows = {row["config"]: row for row in result["training"]}
    assert list(rows) == configs
    assert rows["aurora128"]["tunable"] == 210_560  # 108 matrices of 768 x 768 at rank 128
    assert rows["floor"]["time_vs_floor"] == 1.0 and rows["uni512"]["time_vs_uni512"] == 1.0
    assert all(row["step_s"] > 0 for row in rows.values())
    # 64 px images give 2 x 17 tokens: no layer reaches twice its width, so both run per token.
    assert rows["aurora128"]["matmul_gflop"] == rows["aurora128-per-token"]["matmul_gflop"]
    assert rows["aurora128"]["flops_vs_floor"] > 1.0

    inference = {row["model"]: row for row in result["inference"]}
    assert inference["aurora128 merged"]["matmul_gflop"] == inference["base"]["matmul_gflop"]
    assert inference["aurora128 unmerged"]["flops_vs_base"] > 1.0
    assert (tmp_path / "results.md").read_text().startswith("`python ")


def test_unknown_configurations_are_named(capsys):
    with pytest.raises(SystemExit):
        train_step.parse_args(["--configs", "floor,aurora7x"])
    assert "--configs: unknown ['aurora7x']" in capsys.readouterr().err
