"""Fine-tune BLIP for question answering (VQAv2, MSRVTT-QA) with Aurora.

With no arguments: an offline demo on synthetic data (coloured shapes; sliding-shape videos) with a
small random BLIP. It prints accuracy before and after training next to the majority-answer
baseline, and writes results, the VQAv2 submission file and the adapter; a few minutes on CPU:

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
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from peft import get_peft_model
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import AutoProcessor, BlipForQuestionAnswering

import peft_cp
from peft_cp.blip.configs import read_settings, small_blip_config
from peft_cp.blip.data import (
    VQATestDataset,
    VQATrainDataset,
    collate_vqa_test,
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
from peft_cp.blip.gated_query import add_gated_query
from peft_cp.blip.metrics import exact_match_accuracy, vqa_accuracy_dataset, write_vqa_submission
from peft_cp.blip.training import TrainingArguments, fit
from peft_cp.blip.video import ImageLoader, ImageTransform, VideoLoader
from peft_cp.blip.vqa import answer_loss, generate_answers, rank_answers

logger = get_logger(__name__)

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
    parser.add_argument("--media-root", help="Folder the annotation paths are relative to.")
    parser.add_argument(
        "--vg-root", help="VQAv2: folder of the Visual Genome images (default: --media-root)."
    )
    parser.add_argument("--output-dir", help="Checkpoints, adapter, results and submission.")
    parser.add_argument("--rank", type=int, help="Aurora rank R (benchmarks: 128).")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--train-frames", type=int, help="Benchmarks: 8.")
    parser.add_argument("--test-frames", type=int, help="Benchmarks: 16.")
    parser.add_argument("--batch-size", type=int, help="Per process.")
    parser.add_argument("--test-batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, help="Benchmarks: 0.1, as BLIP.")
    parser.add_argument("--k-test", type=int, default=128, help="VQAv2: candidates re-scored.")
    parser.add_argument("--max-question-length", type=int, default=35)
    parser.add_argument("--max-answer-length", type=int, default=10)
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
    parser.add_argument("--quick", action="store_true", help="Demo: tiny data, a few steps.")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.config:
        # The file's settings replace the built-in defaults; the command line still wins.
        options = {action.dest for action in parser._actions} - {"help", "config"}
        parser.set_defaults(**read_settings(args.config, options))
        args = parser.parse_args(argv)

    args.demo = args.model is None and args.train_file is None
    defaults = dict(DEMO) if args.demo else {**PAPER_COMMON, **PAPER.get(args.dataset, {})}
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.train_modules is None:
        args.train_modules = DEMO_MODULES if args.demo else []
    if args.quick and not args.demo:
        parser.error("--quick only applies to the demo (no --model / --train-file)")
    if not args.demo:
        needed = ["model", "dataset", "train_file", "test_file", "media_root"]
        if args.dataset == "vqav2":
            needed.append("answer_list")
        missing = [f"--{k.replace('_', '-')}" for k in needed if getattr(args, k) is None]
        if missing:
            parser.error(
                f"a benchmark run needs {', '.join(missing)} (or no arguments for the demo)"
            )
    return args


# ---------------------------------------------------------------------------------------------
# Data


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


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer(
        texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return encoded.input_ids, encoded.attention_mask


def majority_answer(train_set: VQATrainDataset) -> str:
    """The answer with the largest total weight over the training questions."""
    votes: Counter[str] = Counter()
    for item in train_set.items:
        for answer, weight in zip(item.answers, item.weights, strict=True):
            votes[answer] += weight
    return votes.most_common(1)[0][0]


def references(args: argparse.Namespace, test_set: VQATestDataset) -> dict | None:
    """Ground truth per question id: human answer lists (VQAv2) or one answer (MSRVTT-QA)."""
    if args.dataset == "msrvtt_qa":
        return {item.question_id: item.answers[0] for item in test_set.items}
    if not args.test_answers:
        return None
    answers = json.loads(Path(args.test_answers).read_text())
    return {int(qid): answers[str(qid)] for qid in (item.question_id for item in test_set.items)}


def score(args: argparse.Namespace, predictions: dict, truth: dict | None) -> dict[str, float]:
    if truth is None:
        return {}
    if args.dataset == "msrvtt_qa":
        return {"accuracy": exact_match_accuracy(predictions, truth)}
    return {"accuracy": vqa_accuracy_dataset(predictions, truth)}


# ---------------------------------------------------------------------------------------------
# Evaluation


def predict(model, test_set, tokenizer, args, accelerator, candidates=None) -> dict[int, str]:
    """Answer every test question: rank `candidates` (VQAv2) or generate (MSRVTT-QA).

    Each process answers every world_size-th question; the answers are gathered on all.
    """
    shard = Subset(
        test_set, range(accelerator.process_index, len(test_set), accelerator.num_processes)
    )
    loader = DataLoader(
        shard,
        batch_size=args.test_batch_size,
        collate_fn=collate_vqa_test,
        num_workers=0 if args.demo else args.num_workers,
    )
    if candidates is not None:
        answer_ids, answer_mask = tokenize(tokenizer, candidates, args.max_answer_length)
        answer_ids, answer_mask = (
            answer_ids.to(accelerator.device),
            answer_mask.to(accelerator.device),
        )

    model.eval()
    answers: list[tuple[int, str]] = []
    for batch in tqdm(loader, desc="answering", disable=not accelerator.is_local_main_process):
        pixels = batch["pixel_values"].to(accelerator.device)
        question_ids, question_mask = tokenize(
            tokenizer, batch["question"], args.max_question_length
        )
        question_ids, question_mask = (
            question_ids.to(pixels.device),
            question_mask.to(pixels.device),
        )
        with accelerator.autocast():
            if candidates is None:
                texts = generate_answers(
                    model, pixels, question_ids, question_mask, tokenizer, args.max_answer_length
                )
            else:
                best = rank_answers(
                    model, pixels, question_ids, question_mask, answer_ids, answer_mask, args.k_test
                )
                texts = [candidates[i] for i in best.tolist()]
        answers += zip(batch["question_id"].tolist(), texts, strict=True)
    return dict(gather_object(answers))


# ---------------------------------------------------------------------------------------------
# Model


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
        f"fully trained: {modules_to_save})",
        main_process_only=True,
    )

    train_loader, test_loader = media_loaders(args)
    common = {"benchmark": args.dataset, "skip_bad": args.skip_bad}
    train_set = VQATrainDataset(
        args.train_file, args.media_root, train_loader, vg_root=args.vg_root, **common
    )
    test_set = VQATestDataset(args.test_file, args.media_root, test_loader, **common)
    candidates = read_answer_list(args.answer_list) if args.dataset == "vqav2" else None
    truth = references(args, test_set)

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

    def evaluate(model):
        return score(
            args, predict(model, test_set, tokenizer, args, accelerator, candidates), truth
        )

    model.to(accelerator.device)
    before = evaluate(model)
    training = TrainingArguments(
        output_dir=str(output_dir),
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        seed=args.seed,
        resume=args.resume,
        max_steps=args.max_steps,
        num_workers=0 if args.demo else args.num_workers,
        mixed_precision=accelerator.mixed_precision,
    )
    metric_key = "accuracy" if truth is not None else None
    result = fit(
        model,
        train_set,
        collate,
        loss_fn,
        training,
        accelerator,
        evaluate if metric_key else None,
        metric_key,
    )

    model = accelerator.unwrap_model(model)
    predictions = predict(model, test_set, tokenizer, args, accelerator, candidates)
    after = score(args, predictions, truth)
    majority = majority_answer(train_set)
    baseline = score(args, dict.fromkeys(predictions, majority), truth)
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
        "steps": result.steps,
    }
    if accelerator.is_main_process:
        model.save_pretrained(output_dir / "adapter")
        if args.dataset == "vqav2":
            write_vqa_submission(output_dir / "vqa_submission.json", predictions)
        (output_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_report(report: dict, output_dir: Path, seconds: float) -> None:
    before = report["before_training"].get("accuracy")
    after = report["metrics"].get("accuracy")
    baseline = report["majority_baseline"]
    print(f"\n{report['dataset']}: {report['method']}, {report['trainable_params']:,} trainable")
    if after is None:
        print("no ground truth given (--test-answers): accuracy not computed")
    else:
        print(f"{'accuracy (%)':<14}{'before':>8}{'after':>8}{'majority':>10}")
        print(f"{'':<14}{before:>8.1f}{after:>8.1f}{baseline['accuracy']:>10.1f}")
        print(f"(majority baseline answers {baseline['answer']!r} to every question)")
    print(f"outputs in {output_dir} ({seconds:.0f} s)")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO
    )
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    if args.demo and accelerator.device.type == "cpu":
        # The demo model is too small to gain from intra-op threads; on a shared machine extra
        # threads only wait on each other (a training step is then several times slower).
        torch.set_num_threads(1)
    root = Path(args.output_dir or ("outputs/vqa_demo" if args.demo else "runs/vqa"))

    if not args.demo:
        args.output_dir = str(root)
        start = time.perf_counter()
        report = run(args, accelerator)
        if accelerator.is_main_process:
            print_report(report, root, time.perf_counter() - start)
        accelerator.end_training()
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
        if accelerator.is_main_process:
            print_report(reports[-1], Path(args.output_dir), time.perf_counter() - start)
    accelerator.end_training()
    return reports


if __name__ == "__main__":
    main()
