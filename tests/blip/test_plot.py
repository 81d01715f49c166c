"""The `python -m peft_cp.blip.plot` figures, from tiny random BLIPs and hand-made result files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib
import pytest
import torch
from matplotlib.figure import Figure
from peft import get_peft_model
from PIL import Image
from transformers import BertConfig, BertModel, BlipForImageTextRetrieval

from peft_cp import AuroraConfig
from peft_cp.blip.configs import small_blip_config
from peft_cp.blip.plot import (
    CHART_PANEL_SIZE,
    PANEL_SIZE,
    SUMMARY_PANEL_SIZE,
    BenchmarkRow,
    _draw_benchmark,
    collect_attention_weights,
    main,
    read_benchmark,
    read_result,
    relative_update,
)
from peft_cp.blip.recipe import RECIPE_MODULES, add_recipe_modules

matplotlib.use("Agg")

DPI = 40
NUM_LAYERS = 2


def save_model_and_adapter(model, folder):
    model.save_pretrained(folder / "base")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, AuroraConfig(rank=4, init_weights=False))
    peft_model.save_pretrained(folder / "adapter")
    return str(folder / "base"), str(folder / "adapter")


@pytest.fixture(scope="module")
def retrieval_folders(tmp_path_factory):
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(small_blip_config(num_layers=NUM_LAYERS))
    return save_model_and_adapter(model, tmp_path_factory.mktemp("retrieval"))


def png_size(path):
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def figure_pixels(width, height):
    return round(width * DPI), round(height * DPI)


def test_qkv_is_split_into_thirds_of_rows():
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(small_blip_config(num_layers=2))

    weights = collect_attention_weights(model)

    assert sorted(weights) == ["cross", "text_self", "vision"]
    assert all(sorted(layers) == [0, 1] for layers in weights.values())
    fused = model.vision_model.encoder.layers[1].self_attn.qkv.weight.detach()
    width = fused.shape[1]
    for index, projection in enumerate("qkv"):
        expected = fused[index * width : (index + 1) * width]
        torch.testing.assert_close(weights["vision"][1][projection], expected, rtol=0, atol=0)
    cross_key = model.text_encoder.encoder.layer[0].crossattention.self.key.weight
    torch.testing.assert_close(weights["cross"][0]["k"], cross_key.detach(), rtol=0, atol=0)


def test_relative_update_is_the_frobenius_ratio():
    before = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    after = before + torch.tensor([[0.0, 1.0], [0.0, 0.0]])

    assert relative_update(before, after) == pytest.approx(1 / 5)
    assert relative_update(torch.zeros(2, 2), after) == 0.0


def test_weights_draws_one_figure_per_modality_with_a_row_per_layer(retrieval_folders, tmp_path):
    base, adapter = retrieval_folders
    argv = ["weights", "--base", base, "--adapter", adapter, "--full", base]
    argv += ["--out", str(tmp_path / "figures"), "--dpi", str(DPI), "--max-values", "500"]

    assert main(argv) == 0

    figures = tmp_path / "figures"
    names = ["weights_cross.png", "weights_text_self.png", "weights_vision.png"]
    assert sorted(p.name for p in figures.iterdir()) == ["relative_update.png", *names]
    for name in names:
        assert png_size(figures / name) == figure_pixels(
            3 * PANEL_SIZE[0], NUM_LAYERS * PANEL_SIZE[1]
        )
    assert png_size(figures / "relative_update.png") == figure_pixels(
        3 * SUMMARY_PANEL_SIZE[0], SUMMARY_PANEL_SIZE[1]
    )


def test_weights_of_an_adapter_trained_with_the_recipe_modules(tmp_path):
    # The recipes save the gated query and the temperature, modules without a `weight`, with the
    # adapter; merging must keep them and draw the same matrices as without them.
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(small_blip_config(num_layers=NUM_LAYERS))
    model.save_pretrained(tmp_path / "base")
    modules = add_recipe_modules(model, RECIPE_MODULES)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model, AuroraConfig(rank=4, init_weights=False, modules_to_save=modules)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "figures"

    argv = ["weights", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    assert main([*argv, "--out", str(out), "--dpi", str(DPI)]) == 0

    assert sorted(p.name for p in out.glob("weights_*.png")) == [
        "weights_cross.png",
        "weights_text_self.png",
        "weights_vision.png",
    ]


def test_weights_of_question_answering_include_the_decoder(tiny_vqa, tmp_path):
    base, adapter = save_model_and_adapter(tiny_vqa, tmp_path)
    out = tmp_path / "figures"

    main(["weights", "--base", base, "--adapter", adapter, "--out", str(out), "--dpi", str(DPI)])

    modalities = ["cross", "decoder_cross", "decoder_self", "text_self", "vision"]
    assert sorted(p.name for p in out.glob("weights_*.png")) == [
        f"weights_{m}.png" for m in modalities
    ]
    layers = tiny_vqa.config.text_config.num_hidden_layers
    size = png_size(out / "weights_decoder_self.png")
    assert size == figure_pixels(3 * PANEL_SIZE[0], layers * PANEL_SIZE[1])


def run_weights(base, adapter, tmp_path, *extra):
    return main(["weights", "--base", base, "--adapter", adapter, "--out", str(tmp_path), *extra])


def test_weights_rejects_a_missing_base_or_adapter(retrieval_folders, tmp_path):
    base, adapter = retrieval_folders
    missing = str(tmp_path / "nowhere")

    with pytest.raises(FileNotFoundError, match=r"--base '.*nowhere': no such"):
        run_weights(missing, adapter, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"--adapter '.*nowhere': no such"):
        run_weights(base, missing, tmp_path)
    with pytest.raises(FileNotFoundError, match="--adapter .* has no adapter_config.json"):
        run_weights(base, base, tmp_path)


def test_weights_rejects_an_adapter_of_another_model(retrieval_folders, tmp_path):
    base, _ = retrieval_folders
    torch.manual_seed(0)
    other = BlipForImageTextRetrieval(small_blip_config(text_width=16, num_layers=NUM_LAYERS))
    _, other_adapter = save_model_and_adapter(other, tmp_path)

    with pytest.raises(ValueError, match=r"--adapter '.*adapter' does not fit --base"):
        run_weights(base, other_adapter, tmp_path / "figures")


def test_weights_rejects_a_full_model_of_other_shapes(retrieval_folders, tmp_path):
    base, adapter = retrieval_folders
    other = BlipForImageTextRetrieval(small_blip_config(vision_width=32, num_layers=NUM_LAYERS))
    other.save_pretrained(tmp_path / "other")

    with pytest.raises(ValueError, match=r"--full '.*other' does not match --base"):
        run_weights(base, adapter, tmp_path / "figures", "--full", str(tmp_path / "other"))


def test_weights_rejects_a_model_that_is_not_blip(retrieval_folders, tmp_path):
    _, adapter = retrieval_folders
    config = BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertModel(config).save_pretrained(tmp_path / "bert")

    with pytest.raises(ValueError, match="is a 'bert' model; expected a BLIP model"):
        run_weights(str(tmp_path / "bert"), adapter, tmp_path / "figures")


# --------------------------------------------------------------------------------------------------
# Chart
# --------------------------------------------------------------------------------------------------


def write_result(folder, name, task, dataset, method, params, **metrics):
    path = folder / f"{name}.json"
    record = {
        "task": task,
        "dataset": dataset,
        "method": method,
        "trainable_params": params,
        "metrics": metrics,
    }
    path.write_text(json.dumps(record))
    return str(path)


@pytest.fixture
def result_files(tmp_path):
    return [
        write_result(tmp_path, "a", "retrieval", "msrvtt", "aurora", 100_000, r_mean=41.5),
        write_result(tmp_path, "b", "retrieval", "msrvtt", "full", 220_000_000, r_mean=43.0),
        write_result(tmp_path, "c", "retrieval", "msrvtt", "zero-shot", 0, r_mean=30.0),
        write_result(tmp_path, "d", "vqa", "vqav2", "aurora", 150_000, accuracy=77.1),
    ]


def test_chart_has_a_panel_per_task_and_dataset(result_files, tmp_path):
    out = tmp_path / "chart.png"

    assert main(["chart", *result_files, "--out", str(out), "--dpi", str(DPI)]) == 0

    width, height = CHART_PANEL_SIZE
    assert png_size(out) == figure_pixels(2 * width, height)


def test_chart_adds_a_benchmark_panel(result_files, tmp_path):
    benchmark = tmp_path / "bench.json"
    rows = [
        {"method": "full", "tunable": 220_000_000, "time": 1.0, "memory": 1.0},
        {"config": "aurora r=64", "tunable": 100_000, "time": 0.7, "memory": 0.5, "extra": 1},
    ]
    benchmark.write_text(json.dumps(rows))
    out = tmp_path / "chart.png"

    main(["chart", *result_files, "--benchmark", str(benchmark), "--out", str(out)])

    assert [row.name for row in read_benchmark(benchmark)] == ["full", "aurora r=64"]
    width, height = CHART_PANEL_SIZE
    assert png_size(out) == (round(3 * width * 100), round(height * 100))


def test_benchmark_panel_gives_each_configuration_a_colour_and_a_legend_entry():
    rows = [
        BenchmarkRow("lora64", 10_616_832, 1.16, 1.18),
        BenchmarkRow("lora128", 21_233_664, 1.22, 1.28),
        BenchmarkRow("uni512", 18_800_000, 1.13, 1.13),
    ]
    axis = Figure().subplots()

    _draw_benchmark(axis, rows)

    labels = [text.get_text() for text in axis.get_legend().get_texts()]
    assert labels == [
        "lora64",
        "lora128",
        "uni512",
        "reference",
        "relative time",
        "relative memory",
    ]
    # Time (circle) and memory (square) of a configuration share its colour; no text beside points.
    colors = [tuple(c.get_facecolor()[0][:3]) for c in axis.collections]
    assert colors[0] == colors[1] and colors[2] == colors[3] and colors[0] != colors[2]
    assert not axis.texts


def test_chart_reads_what_the_benchmark_writes(tmp_path):
    benchmarks = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    import train_step

    args = train_step.parse_args(["--configs", "floor,aurora128,uni512"])
    times = {"floor": 2.0, "aurora128": 2.2, "uni512": 2.5}
    tunable = {"floor": 2, "aurora128": 210_560, "uni512": 18_908_160}
    memory = {name: {"peak_mib": 1000.0 * t, "step_mib": 100.0 * t} for name, t in times.items()}

    result, _ = train_step.report(args, times, tunable, memory, inference={})
    path = tmp_path / "results.json"
    path.write_text(json.dumps(result))
    rows = read_benchmark(path)

    assert [(row.name, row.tunable) for row in rows] == list(tunable.items())
    for row in rows:
        assert row.time == pytest.approx(times[row.name] / times["uni512"])
        assert row.memory == pytest.approx(times[row.name] / times["uni512"])  # memory ~ time here


def test_read_result_takes_the_task_metric(result_files):
    result = read_result(result_files[3])

    assert (result.task, result.dataset, result.method) == ("vqa", "vqav2", "aurora")
    assert (result.trainable_params, result.accuracy) == (150_000, 77.1)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"task": "vqa", "dataset": "d", "method": "m", "trainable_params": 1}, "'metrics'"),
        (
            {"task": "vqa", "dataset": "d", "method": "m", "trainable_params": 1, "metrics": {}},
            r"'metrics': missing key 'accuracy'",
        ),
        (
            {"task": "caption", "dataset": "d", "method": "m", "trainable_params": 1},
            "'task' must be one of",
        ),
        (
            {"task": "vqa", "dataset": "d", "method": "m", "trainable_params": "many"},
            "'trainable_params' must be an integer",
        ),
        ({"task": "retrieval", "dataset": "d", "trainable_params": 1}, "missing key 'method'"),
    ],
)
def test_read_result_names_file_and_key(tmp_path, record, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(record))

    with pytest.raises(ValueError, match=f"bad.json: .*{message}"):
        read_result(path)


def test_chart_errors_name_the_file(result_files, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    benchmark = tmp_path / "bench.json"
    benchmark.write_text(json.dumps([{"method": "full", "tunable": 10, "time": 1.0}]))
    out = str(tmp_path / "chart.png")

    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        main(["chart", str(broken), "--out", out])
    with pytest.raises(FileNotFoundError, match="absent.json: no such file"):
        main(["chart", str(tmp_path / "absent.json"), "--out", out])
    with pytest.raises(ValueError, match=r"bench.json: row 0: missing key one of \['memory'"):
        main(["chart", *result_files, "--benchmark", str(benchmark), "--out", out])
