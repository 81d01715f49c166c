"""Fine-tune BLIP for image/video-text retrieval with Aurora.

With no arguments: an offline demo (synthetic shapes, a small random BLIP, a few minutes on a
laptop CPU) that logs recall before and after training and saves the adapter:

    python examples/retrieval.py
    accelerate launch examples/retrieval.py
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/retrieval.py

(the last: two processes on a machine without GPUs). On a benchmark (paper settings in
examples/configs/), one or several GPUs:

    accelerate launch examples/retrieval.py --config examples/configs/retrieval_coco.json \\
        --model Salesforce/blip-itm-base-coco --train-file coco_karpathy_train.json \\
        --test-file coco_karpathy_test.json --media-root /data/coco --output-dir runs/coco
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from peft import get_peft_model
from transformers import AutoTokenizer, BlipForImageTextRetrieval

import peft_cp
from peft_cp.blip.configs import read_settings, small_blip_config
from peft_cp.blip.data import RetrievalEvalDataset, RetrievalTrainDataset, collate_retrieval_train
from peft_cp.blip.demo import demo_vocabulary, word_tokenizer, write_shapes_dataset
from peft_cp.blip.files import check_model_path
from peft_cp.blip.gated_query import add_gated_query
from peft_cp.blip.metrics import write_retrieval_results
from peft_cp.blip.report import MediaCandidate, TextToMediaCase, write_retrieval_cases_html
from peft_cp.blip.retrieval import (
    add_temperature,
    chance_recall,
    evaluate_retrieval,
    retrieval_losses,
    tokenize_captions,
)
from peft_cp.blip.training import TrainingArguments, finish_run, fit
from peft_cp.blip.video import ImageLoader, ImageTransform, VideoLoader

logger = get_logger(__name__)
# Raised by PEFT's own call into transformers on every get_peft_model; nothing to change here.
warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)

HEADS = ["vision_proj", "text_proj", "itm_head"]
# Settings a --config file or the command line may override: the paper's MSCOCO ones, and the
# demo's (a small model trained from scratch wants a higher learning rate).
DEFAULTS = {
    "image_size": 384,
    "batch_size": 16,
    "epochs": 6,
    "learning_rate": 1e-5,
    "k_test": 256,
    "max_text_length": 35,
    "train_frames": 8,
    "test_frames": 16,
    "rank": 128,
}
DEMO = {
    "benchmark": "coco",
    "image_size": 64,
    "batch_size": 16,
    "epochs": 15,
    "learning_rate": 2e-3,
    "k_test": 8,
    "max_text_length": 16,
    "rank": 16,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="JSON file of defaults (examples/configs/*.json).")
    parser.add_argument("--model", help="Hub name or folder of a BlipForImageTextRetrieval.")
    parser.add_argument("--benchmark", choices=["coco", "flickr30k", "msrvtt", "didemo"])
    parser.add_argument("--train-file", help="Training annotations (JSON list or JSON lines).")
    parser.add_argument("--test-file", help="Test annotations: recall before and after training.")
    parser.add_argument(
        "--val-file",
        help="Validation annotations (the test file's format) that pick the best epoch. Without "
        "it, the best epoch is picked on the test file.",
    )
    parser.add_argument("--media-root", help="Folder the annotation paths are relative to.")
    parser.add_argument("--output-dir", default=None, help="Checkpoints, adapter and results.")
    parser.add_argument("--rank", type=int, help="Aurora rank R (default 128; demo 16).")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--train-frames", type=int, help="Frames per training video (8).")
    parser.add_argument("--test-frames", type=int, help="Frames per test video (16).")
    parser.add_argument("--batch-size", type=int, help="Per process.")
    parser.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=1,
        help="Batches per optimizer step (under DeepSpeed, its config's value wins).",
    )
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--k-test", type=int, help="Candidates re-ranked by the matching head.")
    parser.add_argument("--max-text-length", type=int, help="Caption tokens (35).")
    parser.add_argument(
        "--train-heads",
        nargs="*",
        default=HEADS,
        help="Modules trained fully and saved with the adapter (default: the three heads).",
    )
    parser.add_argument("--no-gated-query", action="store_true", help="Disable GQT.")
    parser.add_argument("--no-context", action="store_true", help="Disable ICE in the ITM loss.")
    parser.add_argument("--skip-bad", action="store_true", help="Skip unreadable items.")
    parser.add_argument("--resume", action="store_true", help="Continue from the last checkpoint.")
    parser.add_argument("--max-steps", type=int, help="Stop after this many optimizer steps.")
    parser.add_argument(
        "--save-every-steps",
        type=int,
        metavar="N",
        help="Also checkpoint every N optimizer steps (--resume continues inside the epoch).",
    )
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cases", type=int, default=12, help="Text queries shown in cases.html (0: none)."
    )
    args = parser.parse_args(argv)
    if args.config:
        # The file's settings replace the built-in defaults; the command line still wins.
        options = {action.dest for action in parser._actions} - {"help", "config"}
        parser.set_defaults(**read_settings(args.config, options))
        args = parser.parse_args(argv)

    args.demo = args.model is None and args.train_file is None
    defaults = {**DEFAULTS, **DEMO} if args.demo else dict(DEFAULTS)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if not args.demo:
        missing = [
            f"--{k.replace('_', '-')}"
            for k in ("model", "train_file", "test_file", "media_root", "benchmark")
            if getattr(args, k) is None
        ]
        if missing:
            parser.error(
                f"a benchmark run needs {', '.join(missing)} (or no arguments for the demo)"
            )
        try:
            check_model_path(args.model, "--model")
        except FileNotFoundError as error:
            parser.error(str(error))
    return args


def build_demo(args: argparse.Namespace, data_dir: Path):
    files = write_shapes_dataset(data_dir, image_size=args.image_size, seed=args.seed)
    args.train_file, args.test_file, args.media_root = files["train"], files["test"], data_dir
    torch.manual_seed(args.seed)
    config = small_blip_config(
        vision_width=64,
        text_width=64,
        num_layers=2,
        num_heads=4,
        image_size=args.image_size,
        patch_size=16,
        vocab_size=len(demo_vocabulary()) + 4,
        projection_dim=32,
        init_std=0.125,
    )
    return BlipForImageTextRetrieval(config), word_tokenizer(demo_vocabulary())


def media_loaders(args: argparse.Namespace):
    if args.benchmark in ("msrvtt", "didemo"):
        return (
            VideoLoader(args.train_frames, args.image_size, mode="random"),
            VideoLoader(args.test_frames, args.image_size, mode="uniform"),
        )
    return (
        ImageLoader(ImageTransform(args.image_size, train=not args.demo)),
        ImageLoader(ImageTransform(args.image_size)),
    )


def write_cases(path: Path, test_set: RetrievalEvalDataset, top5: dict, args) -> None:
    """An HTML page of text-to-media queries (spread over the test set) and their top 5."""
    step = max(1, len(test_set.texts) // args.cases)
    cases = []
    for text in range(0, len(test_set.texts), step)[: args.cases]:
        candidates = [
            MediaCandidate(
                Path(args.media_root) / test_set.media[media],
                score,
                ground_truth=test_set.text_to_media[text] == media,
            )
            for media, score in zip(top5["indices"][text], top5["scores"][text], strict=True)
        ]
        cases.append(TextToMediaCase(test_set.texts[text], candidates))
    write_retrieval_cases_html(path, cases, title=f"Aurora r={args.rank}: text-to-media retrieval")


def log_recall_table(before: dict, after: dict, chance: float) -> None:
    """The before/after recall table, one log line per row."""
    logger.info(f"{'recall (%)':<12}{'before':>9}{'after':>9}   chance R@1 = {chance:.1f}")
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean"):
        logger.info(f"{key:<12}{before[key]:>9.1f}{after[key]:>9.1f}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        # Each process would otherwise train alone, all of them writing the same output folder.
        raise RuntimeError(
            f"launched as {launched} processes, but Accelerate formed a group of "
            f"{accelerator.num_processes} (no GPU per process?). On a machine without GPUs, "
            "set ACCELERATE_USE_CPU=true for `accelerate launch --multi_gpu`."
        )

    report = run(args, accelerator)
    finish_run(accelerator)  # after `run` returns, so that no wrapped model is left
    return report


def run(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    """Train and evaluate one retrieval run; returns the results written to results.json."""
    output_dir = Path(
        args.output_dir or ("outputs/retrieval_demo" if args.demo else "runs/retrieval")
    )

    if args.demo:
        model, tokenizer = build_demo(args, output_dir / "data")
        model.save_pretrained(output_dir / "base_model")  # the random base the adapter belongs to
    else:
        model = BlipForImageTextRetrieval.from_pretrained(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model)

    modules_to_save = list(args.train_heads) + add_temperature(model)
    if not args.no_gated_query:
        modules_to_save += add_gated_query(model)
    model = get_peft_model(
        model, peft_cp.AuroraConfig(rank=args.rank, modules_to_save=modules_to_save)
    )
    trainable, total = model.get_nb_trainable_parameters()
    store = sum(p.numel() for p in model.base_model.factor_store().parameters())
    logger.info(
        f"trainable: {trainable:,} of {total:,} ({store:,} in the Aurora factor store)",
        main_process_only=True,
    )

    train_loader, test_loader = media_loaders(args)
    common = {"benchmark": args.benchmark, "skip_bad": args.skip_bad}
    train_set = RetrievalTrainDataset(args.train_file, args.media_root, train_loader, **common)
    test_set = RetrievalEvalDataset(args.test_file, args.media_root, test_loader, **common)
    val_set = (
        RetrievalEvalDataset(args.val_file, args.media_root, test_loader, **common)
        if args.val_file
        else test_set
    )

    def collate(batch):
        samples = collate_retrieval_train(batch)
        # A fixed length on every process: the ITM loss gathers the token ids of all of them.
        samples.update(
            tokenize_captions(
                tokenizer, samples.pop("text"), args.max_text_length, padding="max_length"
            )
        )
        return samples

    def loss_fn(model, batch):
        losses = retrieval_losses(
            model,
            batch["pixel_values"],
            batch["input_ids"],
            batch["attention_mask"],
            batch["media_index"],
            context_enhancement=not args.no_context,
        )
        return losses.total

    def evaluate(model, dataset=test_set):
        """Recall metrics and the top 5 candidates of every query, over all processes."""
        return evaluate_retrieval(
            model,
            dataset,
            tokenizer,
            args.k_test,
            accelerator.device,
            max_length=args.max_text_length,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )

    model.to(accelerator.device)
    before, _ = evaluate(model)
    training = TrainingArguments.from_command_line(args, accelerator, output_dir)
    result = fit(
        model,
        train_set,
        collate,
        loss_fn,
        training,
        accelerator,
        lambda model: evaluate(model, val_set)[0],
        "r_mean",
        restore_best=True,  # the results below are those of the saved best adapter
    )

    model = accelerator.unwrap_model(model)
    after, top5 = evaluate(model)
    chance = chance_recall(len(test_set), 1)
    report = {
        "task": "retrieval",
        "dataset": "shapes (demo)" if args.demo else args.benchmark,
        "method": f"Aurora r={args.rank}",
        "trainable_params": trainable,
        "metrics": after,
        "before_training": before,
        "chance_r1": chance,
        "best_epoch": result.best_epoch,
        "best_epoch_picked_on": "validation" if args.val_file else "test",
    }
    log_recall_table(before, after, chance)
    if accelerator.is_main_process:
        write_retrieval_results(output_dir / "results.json", report, top5)
        if args.cases:
            write_cases(output_dir / "cases.html", test_set, top5["text_to_media"], args)
    logger.info(f"adapter: {output_dir / 'best_adapter'}  results: {output_dir / 'results.json'}")
    return report


if __name__ == "__main__":
    main()
