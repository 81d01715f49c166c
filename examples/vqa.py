"""Fine-tune BLIP for question answering (VQAv2, MSRVTT-QA) with Aurora.

With no arguments: an offline demo on synthetic data (coloured shapes; sliding-shape videos) with a
small random BLIP. It logs accuracy before and after training next to the majority-answer
baseline, and writes results, the VQAv2 submission file, a page of answered questions
(cases.html) and the adapter; a few minutes on CPU:

    python examples/vqa.py

On a benchmark (paper settings: VQAv2 480 px, batch 16 per GPU, 10 epochs; MSRVTT-QA 384 px,
8 training / 16 test frames, batch 4, 10 epochs; AdamW, weight decay 0.05, cosine decay):

    accelerate launch examples/vqa.py --dataset vqav2 --model Salesforce/blip-vqa-base \\
        --train-file vqa_train.json vqa_val.json --test-file vqa_test.json \\
        --answer-list answer_list.json --media-root /data/coco --output-dir runs/vqav2
    accelerate launch examples/vqa.py --dataset msrvtt_qa --model Salesforce/blip-vqa-base \\
        --train-file msrvtt_qa_train.jsonl --test-file msrvtt_qa_test.jsonl \\
        --media-root /data/msrvtt/videos --output-dir runs/msrvtt_qa

VQAv2 answers are chosen by ranking `--answer-list`; accuracy is reported when `--test-answers`
(JSON object {question_id: [human answers]}, e.g. for the val split) is given, otherwise only the
submission file is written. MSRVTT-QA answers are generated greedily and scored by exact match.

The adapter kept (`adapter/`, and the one `results.json` reports) is the epoch with the best
accuracy on `--val-file` (with `--val-answers` for VQAv2) when one is given, else the last epoch;
the test split never chooses it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from peft import get_peft_model
from transformers import AutoProcessor, BlipForQuestionAnswering

import peft_cp
from peft_cp.blip.configs import read_settings, small_blip_config
from peft_cp.blip.data import (
    VG_ANSWER_WEIGHT,
    VQATestDataset,
    VQATrainDataset,
    collate_vqa_train,
    read_answer_list,
)
from peft_cp.blip.demo_vqa import (
    build_demo_tokenizer,
    demo_video_qa_files,
    demo_vqa_files,
    write_demo_video_qa,
    write_demo_vqa,
)
from peft_cp.blip.files import check_model_path, write_text_atomic
from peft_cp.blip.gated_query import add_gated_query
from peft_cp.blip.metrics import write_vqa_submission
from peft_cp.blip.report import write_qa_cases_html
from peft_cp.blip.training import TrainingArguments, finish_run, fit
from peft_cp.blip.video import ImageLoader, ImageTransform, VideoLoader
from peft_cp.blip.vqa import (
    answer_accuracy,
    answer_loss,
    answer_questions,
    majority_answer,
    reference_answers,
    sample_qa_cases,
    tokenize,
)

logger = get_logger(__name__)
# Raised by PEFT's own call into transformers on every get_peft_model; nothing to change here.
warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)

PAPER = {
    "vqav2": {"image_size": 480, "batch_size": 16, "epochs": 10, "learning_rate": 1e-4},
    "msrvtt_qa": {"image_size": 384, "batch_size": 4, "epochs": 10, "learning_rate": 1e-4},
}
PAPER_COMMON = {"rank": 128, "train_frames": 8, "test_frames": 16, "label_smoothing": 0.1}
# The demo's random BLIP knows no words, so besides the Aurora factors and the gates it trains the
# word embeddings of the text encoder and decoder and the decoder head's transform (dense +
# LayerNorm before the output matrix). The output matrix itself stays frozen: it is tied to the
# decoder's original embedding, and training `cls` (tied bias) breaks the trainer's checkpoints.
DEMO = {
    "image_size": 32,
    "batch_size": 16,
    "epochs": 15,
    "learning_rate": 1e-2,
    "rank": 16,
    "train_frames": 4,
    "test_frames": 4,
    "label_smoothing": 0.0,
}
DEMO_MODULES = ["transform", "word_embeddings"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="JSON file of settings (examples/configs/vqa_*.json).")
    parser.add_argument("--model", help="Hub name or folder of a BlipForQuestionAnswering.")
    parser.add_argument("--dataset", choices=["vqav2", "msrvtt_qa"])
    parser.add_argument("--train-file", nargs="+", help="Training annotations (one or more).")
    parser.add_argument("--test-file", help="Test annotations (VQAv2 test format or MSRVTT-QA).")
    parser.add_argument("--answer-list", help="VQAv2: JSON list of candidate answers.")
    parser.add_argument("--test-answers", help="VQAv2: JSON {question_id: [human answers]}.")
    parser.add_argument(
        "--val-file",
        help="Validation questions, in the --test-file format, whose accuracy after each epoch "
        "picks the adapter kept. Without it the last epoch's adapter is kept.",
    )
    parser.add_argument("--val-answers", help="VQAv2: the --val-file questions' human answers.")
    parser.add_argument("--media-root", help="Folder the annotation paths are relative to.")
    parser.add_argument(
        "--vg-root", help="VQAv2: folder of the Visual Genome images (default: --media-root)."
    )
    parser.add_argument(
        "--vg-answer-weight",
        type=float,
        default=VG_ANSWER_WEIGHT,
        help="VQAv2: loss weight of a Visual Genome answer (BLIP: %(default)s).",
    )
    parser.add_argument("--output-dir", help="Checkpoints, adapter, results and submission.")
    parser.add_argument("--rank", type=int, help="Aurora rank R (benchmarks: 128).")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--train-frames", type=int, help="Benchmarks: 8.")
    parser.add_argument("--test-frames", type=int, help="Benchmarks: 16.")
    parser.add_argument("--batch-size", type=int, help="Per process.")
    parser.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=1,
        help="Batches per optimizer step (under DeepSpeed, its config's value wins).",
    )
    parser.add_argument("--test-batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, help="Benchmarks: 0.1, as BLIP.")
    parser.add_argument("--k-test", type=int, default=128, help="VQAv2: candidates re-scored.")
    parser.add_argument("--max-question-length", type=int, default=35)
    parser.add_argument("--max-answer-length", type=int, default=10)
    parser.add_argument(
        "--cases",
        type=int,
        default=12,
        help="Test questions shown in <output-dir>/cases.html with their media, predicted and "
        "reference answers (0: no page; needs reference answers).",
    )
    parser.add_argument(
        "--train-modules",
        nargs="*",
        help="Modules trained fully and saved with the adapter (demo default: "
        f"{' '.join(DEMO_MODULES)}; benchmark default: none).",
    )
    parser.add_argument("--no-gated-query", action="store_true", help="Disable GQT.")
    parser.add_argument("--skip-bad", action="store_true", help="Skip unreadable items.")
    parser.add_argument("--resume", action="store_true", help="Continue from the last checkpoint.")
    parser.add_argument("--max-steps", type=int, help="Stop after this many optimizer steps.")
    parser.add_argument(
        "--save-every-steps",
        type=int,
        metavar="N",
        help="Also checkpoint every N optimizer steps (--resume continues inside the epoch).",
    )
    parser.add_argument("--quick", action="store_true", help="Demo: tiny data, a few steps.")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.config:
        # The file's settings replace the built-in defaults; the command line still wins.
        options = set(vars(parser.parse_args([]))) - {"config"}
        parser.set_defaults(**read_settings(args.config, options))
        args = parser.parse_args(argv)

    args.demo = args.model is None and args.train_file is None
    defaults = dict(DEMO) if args.demo else {**PAPER_COMMON, **PAPER.get(args.dataset, {})}
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.train_modules is None:
        args.train_modules = DEMO_MODULES if args.demo else []
    if args.cases < 0:
        parser.error(f"--cases must be >= 0 (0 writes no page), got {args.cases}")
    if args.quick and not args.demo:
        parser.error("--quick only applies to the demo (no --model / --train-file)")
    if not args.demo:
        needed = ["model", "dataset", "train_file", "test_file", "media_root"]
        if args.dataset == "vqav2":
            needed.append("answer_list")
            if args.val_file:
                needed.append("val_answers")
        missing = [f"--{k.replace('_', '-')}" for k in needed if getattr(args, k) is None]
        if missing:
            parser.error(
                f"a benchmark run needs {', '.join(missing)} (or no arguments for the demo)"
            )
        try:
            check_model_path(args.model, "--model")
        except FileNotFoundError as error:
            parser.error(str(error))
    return args


# ---------------------------------------------------------------------------------------------
# Data and model


def media_loaders(args: argparse.Namespace):
    if args.dataset == "msrvtt_qa":
        return (
            VideoLoader(args.train_frames, args.image_size, mode="random"),
            VideoLoader(args.test_frames, args.image_size, mode="uniform"),
        )
    return (
        ImageLoader(ImageTransform(args.image_size, train=not args.demo)),
        ImageLoader(ImageTransform(args.image_size)),
    )


def build_model(args: argparse.Namespace, tokenizer_vocab_size: int | None):
    if args.demo:
        torch.manual_seed(args.seed)
        config = small_blip_config(
            vision_width=64,
            text_width=64,
            num_layers=2,
            num_heads=4,
            image_size=args.image_size,
            patch_size=8,
            vocab_size=tokenizer_vocab_size,
        )
        return BlipForQuestionAnswering(config)
    return BlipForQuestionAnswering.from_pretrained(args.model)


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def run(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    """Train and evaluate on one dataset; returns the results written to results.json."""
    output_dir = Path(args.output_dir)
    if args.demo:
        tokenizer = build_demo_tokenizer()
    else:
        tokenizer = AutoProcessor.from_pretrained(args.model).tokenizer
    model = build_model(args, len(tokenizer))
    if args.demo and accelerator.is_main_process:
        model.save_pretrained(output_dir / "base_model")  # the random base the adapter belongs to

    modules_to_save = list(args.train_modules)
    if not args.no_gated_query:
        modules_to_save += add_gated_query(model)
    model = get_peft_model(
        model, peft_cp.AuroraConfig(rank=args.rank, modules_to_save=modules_to_save or None)
    )
    trainable, total = model.get_nb_trainable_parameters()
    store = sum(p.numel() for p in model.base_model.factor_store().parameters())
    logger.info(
        f"trainable: {trainable:,} of {total:,} ({store:,} in the Aurora factor store; "
        f"fully trained: {modules_to_save})"
    )

    train_loader, test_loader = media_loaders(args)
    common = {"benchmark": args.dataset, "skip_bad": args.skip_bad}
    train_set = VQATrainDataset(
        args.train_file,
        args.media_root,
        train_loader,
        vg_root=args.vg_root,
        vg_answer_weight=args.vg_answer_weight,
        **common,
    )
    test_set = VQATestDataset(args.test_file, args.media_root, test_loader, **common)
    truth = reference_answers(test_set, args.test_answers)
    val_set = val_truth = None
    if args.val_file:
        val_set = VQATestDataset(args.val_file, args.media_root, test_loader, **common)
        val_truth = reference_answers(val_set, args.val_answers)
    candidates = read_answer_list(args.answer_list) if args.dataset == "vqav2" else None

    def collate(batch):
        samples = collate_vqa_train(batch)
        samples["question_ids"], samples["question_mask"] = tokenize(
            tokenizer, samples.pop("question"), args.max_question_length
        )
        samples["answer_ids"], samples["answer_mask"] = tokenize(
            tokenizer, samples.pop("answers"), args.max_answer_length
        )
        return samples

    def loss_fn(model, batch):
        return answer_loss(
            model,
            batch["pixel_values"],
            batch["question_ids"],
            batch["question_mask"],
            batch["answer_ids"],
            batch["answer_mask"],
            batch["weights"],
            batch["answer_counts"],
            label_smoothing=args.label_smoothing,
        )

    def answer(model, dataset):
        return answer_questions(
            model,
            dataset,
            tokenizer,
            accelerator,
            candidates,
            batch_size=args.test_batch_size,
            max_question_length=args.max_question_length,
            max_answer_length=args.max_answer_length,
            k=args.k_test,
            num_workers=0 if args.demo else args.num_workers,
        )

    def validate(model):
        return {"accuracy": answer_accuracy(answer(model, val_set), val_truth, args.dataset)}

    model.to(accelerator.device)
    before = {}
    if truth is not None:  # answering VQAv2 test-dev without answers would only cost time
        before = {"accuracy": answer_accuracy(answer(model, test_set), truth, args.dataset)}

    training = TrainingArguments.from_command_line(args, accelerator, output_dir)
    result = fit(
        model,
        train_set,
        collate,
        loss_fn,
        training,
        accelerator,
        validate if val_set is not None else None,
        "accuracy" if val_set is not None else None,
        # The chosen epoch's adapter (best on validation, else the last) is loaded back, so the
        # test metrics, the submission and `adapter/` all come from the one reported.
        restore_best=True,
    )

    model = accelerator.unwrap_model(model)
    predictions = answer(model, test_set)
    after, baseline = {}, {}
    majority = majority_answer(train_set.items)
    if truth is not None:
        after = {"accuracy": answer_accuracy(predictions, truth, args.dataset)}
        baseline = {
            "accuracy": answer_accuracy(dict.fromkeys(predictions, majority), truth, args.dataset)
        }
    report = {
        "task": "vqa",
        "dataset": f"{args.dataset} (demo)" if args.demo else args.dataset,
        "method": f"Aurora r={args.rank}",
        "trainable_params": trainable,
        "trained_modules": ["aurora factor store", *modules_to_save],
        "metrics": after,
        "before_training": before,
        "majority_baseline": {"answer": majority, **baseline},
        "best_epoch": result.best_epoch,
        "epoch_chosen_by": "validation accuracy" if val_set is not None else "last epoch",
        "steps": result.steps,
    }

    if accelerator.is_main_process:
        model.save_pretrained(output_dir / "adapter")
        if args.dataset == "vqav2":
            write_vqa_submission(output_dir / "vqa_submission.json", predictions)
        write_text_atomic(output_dir / "results.json", json.dumps(report, indent=2) + "\n")
        write_cases(args, output_dir, test_set, predictions, truth)
    return report


def write_cases(args, output_dir: Path, test_set, predictions: dict, truth: dict | None) -> None:
    if args.cases == 0:
        return
    if truth is None:
        logger.info("cases.html not written: the test questions have no reference answers")
        return
    cases = sample_qa_cases(test_set, predictions, truth, args.cases)
    title = f"{args.dataset}{' (demo)' if args.demo else ''}: {len(cases)} test questions"
    write_qa_cases_html(output_dir / "cases.html", cases, title)


def log_report(report: dict, output_dir: Path, seconds: float) -> None:
    before = report["before_training"].get("accuracy")
    after = report["metrics"].get("accuracy")
    baseline = report["majority_baseline"]
    lines = [f"{report['dataset']}: {report['method']}, {report['trainable_params']:,} trainable"]
    if after is None:
        lines.append("no ground truth given (--test-answers): accuracy not computed")
    else:
        lines += [
            f"{'accuracy (%)':<14}{'before':>8}{'after':>8}{'majority':>10}",
            f"{'':<14}{before:>8.1f}{after:>8.1f}{baseline['accuracy']:>10.1f}",
            f"(majority baseline answers {baseline['answer']!r} to every question)",
        ]
    lines.append(
        f"adapter of epoch {report['best_epoch']} ({report['epoch_chosen_by']}); outputs in "
        f"{output_dir} ({seconds:.0f} s)"
    )
    logger.info("\n".join(lines))


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
    )
    if args.demo and accelerator.device.type == "cpu":
        # The demo model is too small to gain from intra-op threads; on a shared machine extra
        # threads only wait on each other (a training step is then several times slower).
        torch.set_num_threads(1)
    root = Path(args.output_dir or ("outputs/vqa_demo" if args.demo else "runs/vqa"))

    if not args.demo:
        args.output_dir = str(root)
        start = time.perf_counter()
        report = run(args, accelerator)
        log_report(report, root, time.perf_counter() - start)
        finish_run(accelerator)
        return [report]

    # The demo: both datasets, each in its own folder, with data written by the main process.
    images, videos = (
        demo_vqa_files(root / "data" / "vqav2"),
        demo_video_qa_files(root / "data" / "msrvtt_qa"),
    )
    if args.quick:
        args.epochs, args.max_steps = 1, args.max_steps or 3
    if accelerator.is_main_process:
        image_sizes = {"num_train_images": 40, "num_test_images": 10} if args.quick else {}
        video_sizes = {"num_train_videos": 8, "num_test_videos": 4} if args.quick else {}
        write_demo_vqa(images.root, image_size=args.image_size, seed=args.seed, **image_sizes)
        write_demo_video_qa(videos.root, size=args.image_size, seed=args.seed, **video_sizes)
    accelerator.wait_for_everyone()

    reports = []
    for dataset, files in (("vqav2", images), ("msrvtt_qa", videos)):
        args.dataset, args.output_dir = dataset, str(root / dataset)
        args.train_file, args.test_file = [files.train_file], files.test_file
        args.media_root, args.answer_list = files.media_root, files.answer_list_file
        args.test_answers = files.test_answers_file
        start = time.perf_counter()
        reports.append(run(args, accelerator))
        log_report(reports[-1], Path(args.output_dir), time.perf_counter() - start)
    finish_run(accelerator)
    return reports


if __name__ == "__main__":
    main()
