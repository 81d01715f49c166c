"""Training-step time and peak memory of Aurora against LoRA, UniAdapter, full tuning and the floor.

Builds full-size BLIP-base image-text retrieval (`BlipConfig()`, random weights) and times one
training step per configuration: the vision encoder once, the contrastive head (image and text
[CLS] features, cosine similarities) and the matching head (text encoder cross-attending to the
image tokens, `itm_head`), a cross-entropy loss on each, backward and an AdamW step. The
configurations run interleaved in one process, one step of each per round in a new order every
round, and each reports the median over the measured rounds, so background load hits all of them
alike. Peak memory is measured for each configuration in a fresh subprocess (peak RSS on CPU,
`torch.cuda.max_memory_allocated` on CUDA). Each configuration's matrix-multiply FLOPs per step
(forward and backward, counted by `torch.utils.flop_counter`) are reported relative to the floor's:
the time ratio a configuration would reach if its extra work ran as fast as the backbone's.

Configurations:
    floor      no weight gradient at all: one trainable scalar multiplies the vision embeddings and
               one the text embeddings, so backward still crosses every layer. The cost any
               adapter of these layers must at least pay.
    aurora64, aurora128     `peft_cp.AuroraConfig(rank=r)` on BLIP's default targets.
    aurora64-per-token, aurora128-per-token     the same with every layer computed per token
               (`merge_when_cheaper` off); only when named in --configs.
    lora64, lora128         PEFT LoRA of rank r (alpha = r) on the same targets.
    uni128, uni512          UniAdapter of bottleneck r (`benchmarks/uniadapter.py`).
    full       every weight trained.

Inference (forward of both heads under `torch.no_grad`) compares the base model with Aurora
rank 128 unmerged (by default, layers with at least as many tokens as input features run on their
weight plus its update, materialised per call; also shown with that turned off, "per token") and
merged into the weights (`merge_and_unload`).

    python benchmarks/train_step.py --out benchmarks/results            # CPU default
    python benchmarks/train_step.py --quick                             # smoke test
    python benchmarks/train_step.py --device cuda --dtype bf16 --image-size 384 --batch 16
    python benchmarks/train_step.py --flops-only --image-size 384 --batch 16   # its arithmetic
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import BlipConfig, BlipForImageTextRetrieval

import peft_cp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from uniadapter import add_uniadapter  # noqa: E402

logger = logging.getLogger("train_step")

TARGETS = ["qkv", "query", "key", "value"]
ALL_CONFIGS = ["floor", "aurora64", "aurora128", "lora64", "lora128", "uni128", "uni512", "full"]
QUICK_CONFIGS = ["floor", "aurora128", "lora128", "uni512"]
# On request only: Aurora with every layer computed per token (`merge_when_cheaper` off).
PER_TOKEN_CONFIGS = ["aurora64-per-token", "aurora128-per-token"]
KNOWN_CONFIGS = ALL_CONFIGS + PER_TOKEN_CONFIGS
REFERENCE = "uni512"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Setup:
    """A model ready to train: the BLIP module to call, its optimizer and its tunable count."""

    model: BlipForImageTextRetrieval
    optimizer: torch.optim.Optimizer
    tunable: int


# --- models -------------------------------------------------------------------------------------


def build_base(args: argparse.Namespace) -> BlipForImageTextRetrieval:
    config = BlipConfig()
    config.vision_config.image_size = args.image_size
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(config)
    return model.to(device=args.device, dtype=DTYPES[args.dtype])


def _scale_output(scalar: nn.Parameter) -> Callable:
    def hook(_: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * scalar.to(output.dtype)

    return hook


def build_setup(name: str, base: BlipForImageTextRetrieval, lr: float = 1e-4) -> Setup:
    """Adapt `base` (in place) as configuration `name` and make its optimizer."""
    base.requires_grad_(False)
    owner = base  # the module whose parameters include the tunable ones

    if name == "floor":
        scalars = nn.ParameterList(
            [nn.Parameter(torch.ones((), device=base.device)) for _ in range(2)]
        )
        base.floor_scalars = scalars
        base.vision_model.embeddings.register_forward_hook(_scale_output(scalars[0]))
        base.text_encoder.embeddings.register_forward_hook(_scale_output(scalars[1]))
    elif name.startswith("aurora"):
        # The factor store belongs to the PEFT wrapper, not to the adapted BLIP modules.
        rank = int(name[6:].removesuffix("-per-token"))
        owner = get_peft_model(base, peft_cp.AuroraConfig(rank=rank))
        owner.base_model.factor_store().merge_when_cheaper = not name.endswith("-per-token")
    elif name.startswith("lora"):
        rank = int(name[4:])
        lora = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS)
        owner = get_peft_model(base, lora)
    elif name.startswith("uni"):
        adapter = add_uniadapter(base, rank=int(name[3:]))
        adapter.to(device=base.device, dtype=base.dtype)
    elif name == "full":
        base.requires_grad_(True)
    else:
        raise ValueError(f"unknown configuration {name!r}; choose from {KNOWN_CONFIGS}.")

    params = [p for p in owner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    owner.train()
    return Setup(base, optimizer, sum(p.numel() for p in params))


# --- one step -----------------------------------------------------------------------------------


def make_batch(args: argparse.Namespace, config: BlipConfig) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    size = (args.batch, 3, args.image_size, args.image_size)
    ids = torch.randint(
        3, config.text_config.vocab_size, (args.batch, args.text_len), generator=generator
    )
    return {
        "pixel_values": torch.randn(size, generator=generator).to(args.device, DTYPES[args.dtype]),
        "input_ids": ids.to(args.device),
        "attention_mask": torch.ones_like(ids).to(args.device),
    }


def heads(model: BlipForImageTextRetrieval, batch: dict[str, torch.Tensor]) -> tuple:
    """Cosine similarities (B, B) and matching logits (B, 2), with one vision pass.

    The same computations as `model(..., use_itm_head=False)` and `model(...)`, except that the
    vision encoder runs once for both heads, as in BLIP's own training loop.
    """
    image_embeds = model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)

    text_embeds = model.text_encoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)
    text_feat = F.normalize(model.text_proj(text_embeds[:, 0]), dim=-1)
    sims = image_feat @ text_feat.T  # (B, B)

    fused = model.text_encoder(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_mask,
    ).last_hidden_state
    return sims, model.itm_head(fused[:, 0])  # (B, 2)


def train_step(setup: Setup, batch: dict[str, torch.Tensor]) -> None:
    sims, itm_logits = heads(setup.model, batch)
    targets = torch.arange(sims.shape[0], device=sims.device)
    contrastive = F.cross_entropy(sims.float() / 0.07, targets)
    matching = F.cross_entropy(itm_logits.float(), torch.ones_like(targets))

    (contrastive + matching).backward()
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


# --- measurements -------------------------------------------------------------------------------


def interleaved_medians(
    jobs: dict[str, Callable[[], None]], args: argparse.Namespace, what: str
) -> dict[str, float]:
    """Run every job once per round for warmup + steps rounds; median seconds of the measured ones.

    Each round runs the jobs in a new (seeded) order, so that no configuration always follows the
    same one: a step that frees or allocates much memory (full fine-tuning's gradients and AdamW
    state) slows whichever step comes next.
    """
    times: dict[str, list[float]] = {name: [] for name in jobs}
    order = list(jobs)
    shuffler = random.Random(0)
    for round_index in range(args.warmup + args.steps):
        shuffler.shuffle(order)
        for name in order:
            job = jobs[name]
            seconds = timed(job, args.device)
            if round_index >= args.warmup:
                times[name].append(seconds)
        logger.info("%s round %d/%d done", what, round_index + 1, args.warmup + args.steps)
    return {name: statistics.median(values) for name, values in times.items()}


def _addmm_flops(bias: torch.Size, a: torch.Size, b: torch.Size, *_, **__) -> int:
    """FLOPs of bias + a @ b for a (m, k) and b (k, n): one multiply and one add per term."""
    (m, k), (_, n) = a, b
    return 2 * m * k * n


def count_flops(job: Callable[[], None]) -> int:
    """Matrix-multiply FLOPs of one call of `job` (forward and backward), as torch counts them.

    The in-place `addmm_` of Aurora's fast path is counted like `addmm`, which torch's counter
    does not list.
    """
    in_place = {torch.ops.aten.addmm_: _addmm_flops}
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        job()
    return counter.get_total_flops()


def measure_training(
    args: argparse.Namespace,
) -> tuple[dict[str, float], dict[str, int], dict[str, int]]:
    """Median step seconds, tunable values and matmul FLOPs per step, by configuration.

    With `--flops-only` the configurations are built one at a time and nothing is timed, so that
    large settings fit in memory.
    """
    base = build_base(args)
    batch = make_batch(args, base.config)
    if args.flops_only:
        tunable, flops = {}, {}
        for name in args.configs:
            setup = build_setup(name, copy.deepcopy(base))
            tunable[name] = setup.tunable
            flops[name] = count_flops(functools.partial(train_step, setup, batch))
            logger.info("%s: %.1f GFLOP", name, flops[name] / 1e9)
            del setup
        return {}, tunable, flops

    setups = {name: build_setup(name, copy.deepcopy(base)) for name in args.configs}
    del base
    jobs = {name: (lambda s=setup: train_step(s, batch)) for name, setup in setups.items()}
    flops = {name: count_flops(job) for name, job in jobs.items()}
    medians = interleaved_medians(jobs, args, "training")
    return medians, {name: setup.tunable for name, setup in setups.items()}, flops


def measure_inference(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, int]]:
    """Median forward seconds and matmul FLOPs: base, Aurora rank 128 unmerged and merged.

    "unmerged" is the default (layers with at least as many tokens as features run on their
    weight plus its update, materialised per call); "unmerged, per token" turns that off.
    """
    base = build_base(args).eval()
    batch = make_batch(args, base.config)
    unmerged = get_peft_model(
        copy.deepcopy(base), peft_cp.AuroraConfig(rank=128, init_weights=False)
    )
    per_token = copy.deepcopy(unmerged)
    per_token.base_model.factor_store().merge_when_cheaper = False
    merged = copy.deepcopy(unmerged).merge_and_unload()
    models = {
        "base": base,
        "aurora128 unmerged": unmerged.get_base_model().eval(),
        "aurora128 unmerged, per token": per_token.get_base_model().eval(),
        "aurora128 merged": merged.eval(),
    }

    def forward(model: BlipForImageTextRetrieval) -> None:
        with torch.no_grad():
            heads(model, batch)

    jobs = {name: (lambda m=model: forward(m)) for name, model in models.items()}
    flops = {name: count_flops(job) for name, job in jobs.items()}
    medians = {} if args.flops_only else interleaved_medians(jobs, args, "inference")
    return medians, flops


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe_memory(args: argparse.Namespace) -> dict[str, float]:
    """Peak memory of `args.memory_probe` over 2 steps (this process only).

    On CPU: peak resident set size (VmHWM, reset once the model is built) and its rise above the
    resident size just before the first step. On CUDA: `max_memory_allocated` and its rise above
    `memory_allocated` before the first step.
    """
    base = build_base(args)
    batch = make_batch(args, base.config)
    setup = build_setup(args.memory_probe, base)

    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _rss_kib("VmRSS") * 1024
    # The first step allocates the gradients and optimizer state; the second shows the steady state.
    for _ in range(2):
        train_step(setup, batch)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kib("VmHWM") * 1024
    return {"peak_mib": peak / 2**20, "step_mib": (peak - before) / 2**20}


def measure_memory(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    results = {}
    for name in args.configs:
        command = [
            sys.executable,
            __file__,
            "--memory-probe",
            name,
            *("--image-size", str(args.image_size), "--batch", str(args.batch)),
            *("--text-len", str(args.text_len), "--device", args.device, "--dtype", args.dtype),
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
        logger.info("memory %s: %s", name, results[name])
    return results


# --- report -------------------------------------------------------------------------------------


def relative(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value / reference


def cell(value: float | int | None, spec: str = ".3f") -> str:
    """A table cell: `value` formatted with `spec`, or "n/a" where it was not measured."""
    return "n/a" if value is None else format(value, spec)


def report(
    args: argparse.Namespace,
    times: dict[str, float],
    tunable: dict[str, int],
    memory: dict[str, dict[str, float]],
    inference: dict[str, float],
    flops: dict[str, int] | None = None,
    inference_flops: dict[str, int] | None = None,
) -> tuple[dict, str]:
    """The JSON result and the Markdown tables; a missing time or memory figure reads "n/a"."""
    flops, inference_flops = flops or {}, inference_flops or {}

    def peak(name: str, field: str = "peak_mib") -> float | None:
        return memory.get(name, {}).get(field)

    rows = []
    for name in args.configs:
        rows.append(
            {
                "config": name,
                "tunable": tunable[name],
                "step_s": times.get(name),
                "time_vs_floor": relative(times.get(name), times.get("floor")),
                "time_vs_uni512": relative(times.get(name), times.get(REFERENCE)),
                "matmul_gflop": flops[name] / 1e9 if name in flops else None,
                "flops_vs_floor": relative(flops.get(name), flops.get("floor")),
                "flops_vs_uni512": relative(flops.get(name), flops.get(REFERENCE)),
                **memory.get(name, {}),
                "memory_vs_floor": relative(peak(name), peak("floor")),
                "memory_vs_uni512": relative(peak(name), peak(REFERENCE)),
                "step_memory_vs_floor": relative(peak(name, "step_mib"), peak("floor", "step_mib")),
            }
        )
    lines = _training_table(rows) if times else _flops_table(rows)

    inference_rows = []
    for name in inference_flops or inference:
        seconds, forward_flops = inference.get(name), inference_flops.get(name)
        inference_rows.append(
            {
                "model": name,
                "forward_s": seconds,
                "time_vs_base": relative(seconds, inference.get("base")),
                "matmul_gflop": forward_flops / 1e9 if forward_flops is not None else None,
                "flops_vs_base": relative(forward_flops, inference_flops.get("base")),
            }
        )
    if inference_rows:
        lines += [
            "",
            "| inference | forward (median s) | time / base | matmul FLOPs / base |",
            "|---|---:|---:|---:|",
        ]
        for row in inference_rows:
            lines.append(
                f"| {row['model']} | {cell(row['forward_s'])} | {cell(row['time_vs_base'])} "
                f"| {cell(row['flops_vs_base'])} |"
            )

    settings = {
        k: v for k, v in vars(args).items() if k not in ("out", "memory_probe", "quick", "verbose")
    }
    result = {"settings": settings, "training": rows, "inference": inference_rows}
    return result, "\n".join(lines)


def _training_table(rows: list[dict]) -> list[str]:
    lines = [
        "| config | #tunable | step (median s) | time / floor | matmul FLOPs / floor "
        "| time / UniAdapter-512 | peak memory (MiB) | memory / floor | memory / UniAdapter-512 "
        "| step peak above model (MiB) | step peak / floor's |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['tunable']:,} | {cell(row['step_s'])} "
            f"| {cell(row['time_vs_floor'])} | {cell(row['flops_vs_floor'])} "
            f"| {cell(row['time_vs_uni512'])} | {cell(row.get('peak_mib'), '.0f')} "
            f"| {cell(row['memory_vs_floor'])} | {cell(row['memory_vs_uni512'])} "
            f"| {cell(row.get('step_mib'), '.0f')} | {cell(row['step_memory_vs_floor'])} |"
        )
    return lines


def _flops_table(rows: list[dict]) -> list[str]:
    lines = [
        "| config | #tunable | matmul GFLOP per step | FLOPs / floor | FLOPs / UniAdapter-512 |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['tunable']:,} | {cell(row['matmul_gflop'], '.1f')} "
            f"| {cell(row['flops_vs_floor'])} | {cell(row['flops_vs_uni512'])} |"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=16, help="tokens per caption")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--steps", type=int, default=5, help="measured rounds (median)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument(
        "--configs", default=None, help=f"comma-separated; default: {','.join(ALL_CONFIGS)}"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--no-inference", action="store_true", help="skip the inference timing")
    parser.add_argument(
        "--flops-only",
        action="store_true",
        help="count FLOPs (one step per configuration) without timing or memory: the arithmetic "
        "of a configuration too slow to time here, e.g. the GPU one on a CPU",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 64 px, batch 2, 1 + 1 rounds, 4 configs unless --configs names others",
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json/.md")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.configs is None:
        args.configs = ",".join(QUICK_CONFIGS if args.quick else ALL_CONFIGS)
    if args.quick:
        args.warmup, args.steps = 1, 1
        args.image_size, args.batch = 64, 2
    args.configs = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = sorted(set(args.configs) - set(KNOWN_CONFIGS))
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {KNOWN_CONFIGS}.")
    return args


def main(argv: list[str] | None = None) -> None:
    # Randomly initialised BLIP produces subnormal floats (softmax and GELU tails, gradients
    # through twelve layers); x86 CPUs compute on them up to 10 x slower, by amounts that drift
    # from step to step and differ between configurations, which swamps every difference measured
    # here. They are flushed to zero before the first parallel op: the intra-op worker threads
    # inherit the floating-point mode of the thread that starts them, and `set_flush_denormal`
    # sets only the calling thread's.
    torch.set_flush_denormal(True)

    args = parse_args(argv)
    if args.memory_probe is not None:
        print(json.dumps(probe_memory(args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    times, tunable, flops = measure_training(args)
    inference, inference_flops = ({}, {}) if args.no_inference else measure_inference(args)
    memory = {} if args.no_memory or args.flops_only else measure_memory(args)
    result, table = report(args, times, tunable, memory, inference, flops, inference_flops)

    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2))
        command = "python " + " ".join(
            [Path(__file__).name if a == __file__ else a for a in sys.argv]
        )
        (args.out / "results.md").write_text(f"`{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
