"""Figures for judging a tuning method by eye: weight distributions and cost/accuracy charts.

Two commands::

    python -m peft_cp.blip.plot weights --base MODEL --adapter FOLDER [--full MODEL] --out FOLDER
    python -m peft_cp.blip.plot chart RESULT.json [...] [--benchmark BENCH.json] --out PNG

`weights` draws, for every attention layer of a BLIP model, the distribution of the query, key and
value weights before (base) and after merging an Aurora adapter (W + dW), optionally next to a
fully fine-tuned model, plus a summary of the relative update size ||dW||_F / ||W||_F.
`chart` places each method's accuracy against its number of trainable parameters (see
`read_result` for the result file format) and, with `--benchmark`, its training cost.

Figures are drawn on `matplotlib.figure.Figure` objects, never through pyplot, so importing this
module neither selects a backend nor keeps figures alive.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter
from torch import Tensor, nn

from .files import check_model_path

logger = logging.getLogger(__name__)

__all__ = [
    "MODALITIES",
    "BenchmarkRow",
    "MethodResult",
    "collect_attention_weights",
    "load_blip",
    "load_weight_sets",
    "main",
    "plot_cost_accuracy",
    "plot_relative_updates",
    "plot_weight_distributions",
    "read_benchmark",
    "read_result",
    "relative_update",
]

Projection = Literal["q", "k", "v"]
PROJECTIONS: tuple[Projection, ...] = ("q", "k", "v")

# Attention blocks drawn by `weights`, as (modality, regex on parameter names). The layer index is
# the regex's first group; the second is the projection, or None for the fused vision `qkv`
# whose rows stack the query, key and value matrices in thirds. The decoder entries only match
# BLIP question answering.
MODALITIES: dict[str, str] = {
    "vision": r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv()\.weight",
    "text_self": (
        r"text_encoder\.encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.weight"
    ),
    "cross": (
        r"text_encoder\.encoder\.layer\.(\d+)\.crossattention\.self\.(query|key|value)\.weight"
    ),
    "decoder_self": (
        r"text_decoder\.bert\.encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.weight"
    ),
    "decoder_cross": (
        r"text_decoder\.bert\.encoder\.layer\.(\d+)\.crossattention\.self\.(query|key|value)"
        r"\.weight"
    ),
}
_PROJECTION_NAMES: dict[str, Projection] = {"query": "q", "key": "k", "value": "v"}

# BLIP heads `weights` can load, by `config.architectures` entry; anything else is read as
# retrieval, whose modules cover every modality above except the decoder.
_BLIP_CLASSES = ("BlipForImageTextRetrieval", "BlipForQuestionAnswering")

# Size of one histogram panel in inches; figures are a grid of these at `dpi` dots per inch, with
# no tight bounding box, so their pixel size is predictable: (3 * width, layers * height) * dpi.
PANEL_SIZE: tuple[float, float] = (3.2, 2.0)
SUMMARY_PANEL_SIZE: tuple[float, float] = (4.0, 3.0)
CHART_PANEL_SIZE: tuple[float, float] = (5.0, 4.0)

# (modality, layer, projection) -> matrix
AttentionWeights = dict[str, dict[int, dict[Projection, Tensor]]]


# --------------------------------------------------------------------------------------------------
# Weight distributions
# --------------------------------------------------------------------------------------------------


def collect_attention_weights(model: nn.Module) -> AttentionWeights:
    """Copy the query, key and value matrices of every attention layer, as float32 on the CPU.

    Returns:
        {modality: {layer: {"q" | "k" | "v": (d_out, d_in) tensor}}} for the modalities of
        `MODALITIES` the model has; the vision encoder's fused `qkv` is split into thirds of rows.
    """
    patterns = {modality: re.compile(pattern) for modality, pattern in MODALITIES.items()}
    weights: AttentionWeights = {}
    for name, parameter in model.named_parameters():
        for modality, pattern in patterns.items():
            match = pattern.fullmatch(name)
            if match is None:
                continue

            layer = int(match.group(1))
            matrix = parameter.detach().to("cpu", torch.float32, copy=True)
            projections = weights.setdefault(modality, {}).setdefault(layer, {})
            if match.group(2):
                projections[_PROJECTION_NAMES[match.group(2)]] = matrix
            else:
                for projection, part in zip(PROJECTIONS, matrix.chunk(3, dim=0), strict=True):
                    projections[projection] = part

    return {modality: dict(sorted(layers.items())) for modality, layers in weights.items()}


def load_blip(name_or_path: str, argument: str = "--base") -> nn.Module:
    """Load a BLIP model with the head named in its `config.architectures` (retrieval otherwise).

    Raises:
        FileNotFoundError: a local path that does not exist, or a folder without a config.
        ValueError: the config is not a BLIP config.
    """
    import transformers
    from transformers import AutoConfig

    check_model_path(name_or_path, argument)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as error:
        raise FileNotFoundError(
            f"{argument} {name_or_path!r}: cannot load a config ({error})."
        ) from None
    if config.model_type != "blip":
        raise ValueError(
            f"{argument} {name_or_path!r} is a {config.model_type!r} model; expected a BLIP model "
            f"(model_type 'blip', e.g. {', '.join(_BLIP_CLASSES)})."
        )

    architectures = list(config.architectures or [])
    names = [name for name in architectures if name in _BLIP_CLASSES] or [_BLIP_CLASSES[0]]
    if architectures and names[0] not in architectures:
        warnings.warn(
            f"{argument} {name_or_path!r}: architectures {architectures} has no "
            f"{' or '.join(_BLIP_CLASSES)}; loading it as {names[0]}.",
            stacklevel=2,
        )
    model_class = getattr(transformers, names[0])
    return model_class.from_pretrained(name_or_path).eval()


def load_weight_sets(
    base: str, adapter: str, full: str | None = None
) -> dict[str, AttentionWeights]:
    """Attention weights of the base model, the base with the adapter merged, and optionally a
    fully fine-tuned model, keyed "base", "merged" and "full".

    The base weights are copied before the adapter is injected, so the model is loaded once; the
    adapter is then merged into it (W + dW) with `merge_and_unload`.

    Raises:
        FileNotFoundError: a missing model or adapter folder.
        ValueError: a non-BLIP model, an adapter saved for a model of other shapes, or a full model
            whose attention matrices differ in shape from the base model's.
    """
    from .recipe import load_recipe_adapter

    adapter_path = Path(adapter)
    check_model_path(adapter, "--adapter")
    if adapter_path.is_dir() and not (adapter_path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"--adapter {adapter!r}: folder has no adapter_config.json; pass the folder that "
            "`PeftModel.save_pretrained` wrote."
        )

    model = load_blip(base, "--base")
    sets = {"base": collect_attention_weights(model)}
    if not sets["base"]:
        raise ValueError(f"--base {base!r}: the model has no BLIP attention layers to draw.")

    try:
        peft_model = load_recipe_adapter(model, adapter)
    except ValueError as error:
        raise ValueError(f"--adapter {adapter!r} does not fit --base {base!r}: {error}") from error
    except RuntimeError as error:  # size mismatches reported by load_state_dict
        raise ValueError(f"--adapter {adapter!r} does not fit --base {base!r}: {error}") from error
    sets["merged"] = collect_attention_weights(peft_model.merge_and_unload())
    del model, peft_model

    if full is not None:
        sets["full"] = collect_attention_weights(load_blip(full, "--full"))
        _check_same_shapes(sets["base"], sets["full"], base, full)
    return sets


def _check_same_shapes(
    reference: AttentionWeights, other: AttentionWeights, reference_name: str, other_name: str
) -> None:
    for modality, layers in reference.items():
        for layer, projections in layers.items():
            for projection, matrix in projections.items():
                found = other.get(modality, {}).get(layer, {}).get(projection)
                shape = None if found is None else tuple(found.shape)
                if shape != tuple(matrix.shape):
                    raise ValueError(
                        f"--full {other_name!r} does not match --base {reference_name!r}: "
                        f"{modality} layer {layer} {projection} has shape {shape}, expected "
                        f"{tuple(matrix.shape)}."
                    )


_SET_STYLES: dict[str, dict[str, Any]] = {
    "base": {"label": "base", "color": "tab:gray"},
    "merged": {"label": "Aurora (merged)", "color": "tab:blue"},
    "full": {"label": "full fine-tune", "color": "tab:red"},
}


def _sample_indices(numel: int, max_values: int, seed: int) -> Tensor | None:
    """Indices of at most `max_values` entries, the same for every set so that they compare."""
    if numel <= max_values:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=generator)[:max_values]


def relative_update(before: Tensor, after: Tensor) -> float:
    """||after - before||_F / ||before||_F (0 when `before` is all zeros)."""
    norm = torch.linalg.matrix_norm(before).item()
    return torch.linalg.matrix_norm(after - before).item() / norm if norm > 0 else 0.0


def plot_weight_distributions(
    sets: Mapping[str, AttentionWeights],
    out_dir: str | Path,
    max_values: int = 20_000,
    bins: int = 80,
    dpi: int = 100,
    seed: int = 0,
) -> dict[str, Path]:
    """Draw one PNG per modality, `weights_<modality>.png`: a grid of layers x {q, k, v} with the
    overlaid weight histograms (density) of every set in `sets` (see `load_weight_sets`).

    Each panel histograms at most `max_values` entries of each matrix (the same entries in every
    set) over shared bins, and its title gives ||dW||_F / ||W||_F against the "base" set. A figure
    measures (3 * PANEL_SIZE[0], layers * PANEL_SIZE[1]) inches at `dpi`.

    Returns:
        {modality: path of its PNG}.
    """
    if "base" not in sets:
        raise ValueError(f"sets must contain 'base', got {sorted(sets)}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    paths = {}
    for modality, layers in sets["base"].items():
        width, height = PANEL_SIZE
        figure = Figure(figsize=(3 * width, len(layers) * height), dpi=dpi)
        axes = figure.subplots(len(layers), 3, squeeze=False)
        _fix_margins(figure, len(layers), 3)

        for row, (layer, projections) in enumerate(layers.items()):
            for column, projection in enumerate(PROJECTIONS):
                base = projections[projection]
                matrices = {name: s[modality][layer][projection] for name, s in sets.items()}
                _draw_histograms(axes[row, column], matrices, max_values, bins, seed)
                updates = [
                    f"{_SET_STYLES.get(name, {}).get('label', name)} {relative_update(base, m):.2g}"
                    for name, m in matrices.items()
                    if name != "base"
                ]
                title = f"layer {layer} {projection}"
                axes[row, column].set_title(
                    "\n".join([title, "|dW|/|W|: " + ", ".join(updates)]) if updates else title,
                    fontsize=7,
                )

        axes[0, 0].legend(fontsize=6)
        figure.suptitle(f"{modality} attention weights", fontsize=9)
        paths[modality] = out / f"weights_{modality}.png"
        figure.savefig(paths[modality], dpi=dpi)
        logger.info("wrote %s", paths[modality])
    return paths


def _fix_margins(figure: Figure, rows: int, columns: int) -> None:
    # Margins in inches sized for two-line titles at 7 pt, set once: a layout engine measures
    # every text of every panel and would double the drawing time of a 36-panel figure.
    width, height = figure.get_size_inches()
    panel_width, panel_height = width / columns, height / rows
    figure.subplots_adjust(
        left=0.35 / width,
        right=1 - 0.1 / width,
        top=1 - 0.65 / height,
        bottom=0.25 / height,
        wspace=0.4 / (panel_width - 0.4),
        hspace=0.6 / (panel_height - 0.6),
    )


def _draw_histograms(
    axis: Any, matrices: Mapping[str, Tensor], max_values: int, bins: int, seed: int
) -> None:
    first = next(iter(matrices.values()))
    indices = _sample_indices(first.numel(), max_values, seed)
    values = {
        name: (m.flatten() if indices is None else m.flatten()[indices]).numpy()
        for name, m in matrices.items()
    }
    low = min(float(v.min()) for v in values.values())
    high = max(float(v.max()) for v in values.values())
    edges = torch.linspace(low, high if high > low else low + 1.0, bins + 1).numpy()

    for name, sample in values.items():
        style = _SET_STYLES.get(name, {"label": name})
        axis.hist(sample, bins=edges, density=True, histtype="step", linewidth=1.0, **style)
    axis.tick_params(labelsize=6)


def plot_relative_updates(
    sets: Mapping[str, AttentionWeights], path: str | Path, dpi: int = 100
) -> Path:
    """Draw ||dW||_F / ||W||_F per layer for q, k and v, one panel per modality, for every set
    other than "base" (solid: merged adapter, dashed: full fine-tune). Returns `path`."""
    compared = [name for name in sets if name != "base"]
    if "base" not in sets or not compared:
        raise ValueError(f"sets must contain 'base' and another set, got {sorted(sets)}.")

    modalities = list(sets["base"])
    width, height = SUMMARY_PANEL_SIZE
    figure = Figure(figsize=(len(modalities) * width, height), dpi=dpi, layout="constrained")
    axes = figure.subplots(1, len(modalities), squeeze=False)[0]
    colors = {"q": "tab:blue", "k": "tab:orange", "v": "tab:green"}

    for axis, modality in zip(axes, modalities, strict=True):
        layers = list(sets["base"][modality])
        for name in compared:
            line = "-" if name == "merged" else "--"
            for projection in PROJECTIONS:
                ratios = [
                    relative_update(
                        sets["base"][modality][layer][projection],
                        sets[name][modality][layer][projection],
                    )
                    for layer in layers
                ]
                label = f"{projection} ({_SET_STYLES.get(name, {}).get('label', name)})"
                axis.plot(layers, ratios, line, marker="o", color=colors[projection], label=label)
        axis.set_title(modality, fontsize=9)
        axis.set_xlabel("layer")
        axis.set_xticks(layers)
        axis.set_ylabel("||dW||_F / ||W||_F")
    axes[0].legend(fontsize=7)

    path = Path(path)
    figure.savefig(path, dpi=dpi)
    logger.info("wrote %s", path)
    return path


# --------------------------------------------------------------------------------------------------
# Cost / accuracy chart
# --------------------------------------------------------------------------------------------------

Task = Literal["retrieval", "vqa"]
# The metric each task is ranked by, in percent.
ACCURACY_KEY: dict[str, str] = {"retrieval": "r_mean", "vqa": "accuracy"}


@dataclass(frozen=True)
class MethodResult:
    """One method's score on one task and dataset, as read by `read_result`."""

    task: Task
    dataset: str
    method: str
    trainable_params: int
    accuracy: float


def _load_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error}).") from None


def _field(record: Mapping[str, Any], keys: Sequence[str], where: str) -> Any:
    for key in keys:
        if key in record:
            return record[key]
    expected = repr(keys[0]) if len(keys) == 1 else f"one of {list(keys)}"
    raise ValueError(f"{where}: missing key {expected}; found {sorted(record)}.")


def _number(value: Any, where: str, integer: bool = False) -> float:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        expected = "an integer" if integer else "a finite number"
        raise ValueError(f"{where} must be {expected}, got {value!r}.")
    return value


def read_result(path: str | Path) -> MethodResult:
    """Read one result file, the contract between the example scripts and `chart`::

        {"task": "retrieval" | "vqa", "dataset": str, "method": str,
         "trainable_params": int, "metrics": {...}}

    The accuracy is ``metrics["r_mean"]`` (mean recall, percent, as from
    `peft_cp.blip.metrics.retrieval_recall`) for retrieval and ``metrics["accuracy"]`` (percent)
    for VQA. Other keys are ignored.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: invalid JSON, or a missing or ill-typed key (the message names file and key).
    """
    record = _load_json(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}.")

    task = _field(record, ["task"], str(path))
    if task not in ACCURACY_KEY:
        raise ValueError(f"{path}: 'task' must be one of {list(ACCURACY_KEY)}, got {task!r}.")
    strings = {key: _field(record, [key], str(path)) for key in ("dataset", "method")}
    for key, value in strings.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"{path}: {key!r} must be a non-empty string, got {value!r}.")
    params = _number(
        _field(record, ["trainable_params"], str(path)), f"{path}: 'trainable_params'", True
    )
    if params < 0:
        raise ValueError(f"{path}: 'trainable_params' must be >= 0, got {params}.")

    metrics = _field(record, ["metrics"], str(path))
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: 'metrics' must be an object, got {type(metrics).__name__}.")
    key = ACCURACY_KEY[task]
    accuracy = _number(_field(metrics, [key], f"{path}: 'metrics'"), f"{path}: 'metrics.{key}'")
    return MethodResult(task, strings["dataset"], strings["method"], int(params), float(accuracy))


@dataclass(frozen=True)
class BenchmarkRow:
    """One configuration of `benchmarks/train_step.py`, with time and memory relative to the
    reference configuration."""

    name: str
    tunable: int
    time: float
    memory: float


# Accepted spellings of each benchmark field, first one preferred.
_BENCHMARK_KEYS: dict[str, tuple[str, ...]] = {
    "name": ("method", "config", "name"),
    "tunable": ("tunable", "tunable_params", "trainable_params"),
    "time": ("time", "time_vs_uni512", "relative_time"),
    "memory": ("memory", "memory_vs_uni512", "relative_memory"),
}


def read_benchmark(path: str | Path) -> list[BenchmarkRow]:
    """Read the JSON written by `benchmarks/train_step.py` ({"training": [...], ...}), or a plain
    list of rows: each with a name ("method" or "config"), a "tunable" parameter count, and the
    training "time" and peak "memory" relative to the reference configuration (the benchmark's
    "time_vs_uni512" and "memory_vs_uni512").

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: invalid JSON, no rows, or a row missing a field (naming file, row and key).
    """
    payload = _load_json(path)
    rows = payload.get("training") if isinstance(payload, dict) else payload
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty list of rows (or {{'training': [...]}}).")

    parsed = []
    for index, row in enumerate(rows):
        where = f"{path}: row {index}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object, got {type(row).__name__}.")
        values = {field: _field(row, keys, where) for field, keys in _BENCHMARK_KEYS.items()}
        parsed.append(
            BenchmarkRow(
                name=str(values["name"]),
                tunable=int(_number(values["tunable"], f"{where}: 'tunable'", integer=True)),
                time=float(_number(values["time"], f"{where}: 'time'")),
                memory=float(_number(values["memory"], f"{where}: 'memory'")),
            )
        )
    return parsed


def _bubble_areas(params: Sequence[int], smallest: float = 30.0, largest: float = 600.0) -> list:
    # Parameter counts span orders of magnitude (1e5 .. 1e8), so the area follows their logarithm.
    logs = [math.log10(max(p, 1)) for p in params]
    low, high = min(logs), max(logs)
    if high == low:
        return [(smallest + largest) / 4] * len(params)
    return [smallest + (largest - smallest) * (x - low) / (high - low) for x in logs]


def plot_cost_accuracy(
    results: Sequence[MethodResult],
    path: str | Path,
    benchmark: Sequence[BenchmarkRow] | None = None,
    dpi: int = 100,
) -> Path:
    """Draw accuracy against trainable parameters (log x axis, bubble area by parameter count),
    one panel per (task, dataset) with one colour per method, plus a panel of relative training
    time and memory against tunable parameters when `benchmark` is given.

    A method with no trainable parameters (zero-shot) is drawn as a dashed horizontal line. The
    figure has one row of panels, each CHART_PANEL_SIZE inches at `dpi`. Returns `path`.
    """
    if not results:
        raise ValueError("results is empty; pass at least one result file.")

    groups: dict[tuple[str, str], list[MethodResult]] = {}
    for result in results:
        groups.setdefault((result.task, result.dataset), []).append(result)
    methods = sorted({result.method for result in results})
    palette = [f"C{i % 10}" for i in range(len(methods))]
    colors = dict(zip(methods, palette, strict=True))

    panels = len(groups) + (benchmark is not None)
    width, height = CHART_PANEL_SIZE
    figure = Figure(figsize=(panels * width, height), dpi=dpi, layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]

    # Bubble areas share one scale across panels, so equal sizes mean equal parameter counts.
    trained = [r for r in results if r.trainable_params > 0]
    areas = dict(zip(trained, _bubble_areas([r.trainable_params for r in trained]), strict=True))

    for axis, ((task, dataset), group) in zip(axes, groups.items(), strict=False):
        for result in group:
            if result.trainable_params == 0:
                # Zero-shot: no position on a log axis, drawn as a labelled level instead.
                axis.axhline(result.accuracy, linestyle="--", color=colors[result.method])
                axis.annotate(
                    f"{result.method} (0 trainable)",
                    (0.02, result.accuracy),
                    xycoords=("axes fraction", "data"),
                    xytext=(0, 3),
                    textcoords="offset points",
                    fontsize=8,
                )
                continue
            axis.scatter(
                result.trainable_params,
                result.accuracy,
                s=areas[result],
                color=colors[result.method],
                alpha=0.6,
                edgecolors="black",
            )
            axis.annotate(
                result.method,
                (result.trainable_params, result.accuracy),
                xytext=(6, 6),
                textcoords="offset points",
                fontsize=8,
            )
        _log_axis(axis, "trainable parameters")
        axis.set_ylabel(f"{ACCURACY_KEY[task]} (%)")
        axis.set_title(f"{task}: {dataset}", fontsize=10)

    if benchmark is not None:
        _draw_benchmark(axes[-1], benchmark)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    logger.info("wrote %s", path)
    return path


def _log_axis(axis: Any, label: str) -> None:
    axis.set_xscale("log")
    # Minor tick labels (2x10^5, 3x10^5, ...) overlap within a decade; keep the decades only.
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.margins(x=0.25, y=0.15)
    axis.set_xlabel(label)
    axis.grid(True, which="both", alpha=0.3)


def _draw_benchmark(axis: Any, rows: Sequence[BenchmarkRow]) -> None:
    drawn = [row for row in rows if row.tunable > 0]
    if len(drawn) < len(rows):
        # A log axis cannot show 0; the reference (relative cost 1) is the horizontal line anyway.
        skipped = [row.name for row in rows if row.tunable <= 0]
        warnings.warn(
            f"benchmark rows with 0 tunable parameters not drawn: {skipped}.", stacklevel=3
        )

    # One colour per configuration, named in the legend: several sit within a factor of 2 in
    # parameters and 10 % in cost, where text labels beside the points would overlap.
    for index, row in enumerate(drawn):
        color = f"C{index % 10}"
        axis.scatter(row.tunable, row.time, marker="o", color=color, alpha=0.8, label=row.name)
        axis.scatter(row.tunable, row.memory, marker="s", color=color, alpha=0.8)
    kinds = [
        Line2D(
            [],
            [],
            marker=marker,
            linestyle="",
            color="black",
            fillstyle="none",
            label=f"relative {field}",
        )
        for marker, field in (("o", "time"), ("s", "memory"))
    ]
    axis.axhline(1.0, color="black", linewidth=0.8, linestyle=":", label="reference")
    _log_axis(axis, "tunable parameters")
    axis.set_ylabel("relative to reference")
    axis.set_title("training step cost", fontsize=10)
    handles, _ = axis.get_legend_handles_labels()
    axis.legend(handles=handles + kinds, fontsize=7, ncols=2)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m peft_cp.blip.plot", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    weights = commands.add_parser("weights", help="q/k/v weight distributions, base vs merged.")
    weights.add_argument("--base", required=True, help="Base BLIP model: hub name or folder.")
    weights.add_argument("--adapter", required=True, help="Aurora adapter folder.")
    weights.add_argument("--full", help="Optional fully fine-tuned BLIP model to compare with.")
    weights.add_argument("--out", required=True, help="Folder for the PNG files.")
    weights.add_argument("--max-values", type=int, default=20_000, help="Values per histogram.")
    weights.add_argument("--dpi", type=int, default=100)

    chart = commands.add_parser("chart", help="Accuracy against trainable parameters.")
    chart.add_argument("results", nargs="+", help="Result JSON files (see read_result).")
    chart.add_argument("--benchmark", help="JSON written by benchmarks/train_step.py.")
    chart.add_argument("--out", required=True, help="PNG file to write.")
    chart.add_argument("--dpi", type=int, default=100)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success)."""
    args = _parser().parse_args(argv)

    if args.command == "weights":
        if args.max_values < 1:
            raise ValueError(f"--max-values must be >= 1, got {args.max_values}.")
        sets = load_weight_sets(args.base, args.adapter, args.full)
        plot_weight_distributions(sets, args.out, args.max_values, dpi=args.dpi)
        plot_relative_updates(sets, Path(args.out) / "relative_update.png", args.dpi)
    else:
        results = [read_result(path) for path in args.results]
        benchmark = read_benchmark(args.benchmark) if args.benchmark else None
        plot_cost_accuracy(results, args.out, benchmark, dpi=args.dpi)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        sys.exit(main())
    except (ValueError, OSError) as error:
        # A user mistake: show the message, not a traceback.
        sys.exit(f"error: {error}")
