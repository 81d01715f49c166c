"""Question answering with Hugging Face BLIP: weighted answer loss, answer ranking, generation.

BLIP answers a question in three stages. The vision encoder turns the image (or each video frame)
into patch tokens; the text encoder reads the question and cross-attends to those tokens, giving
one fused state per question token; the answer decoder generates the answer while cross-attending
to the fused question states. Following BLIP (Li et al., ICML 2022) and Aurora (Wang et al.,
NeurIPS 2023):

- training maximises the likelihood of every human answer, weighted by its share of the votes:
  loss = sum_a w_a * NLL(a | image, question) / B, the question states repeated once per answer;
- VQAv2 is evaluated by ranking a fixed answer list: the k candidates whose first token is most
  probable are re-scored by their full log-likelihood and the best one wins;
- video QA (MSRVTT-QA) is evaluated by greedy generation.

A video (B, T, 3, H, W) is encoded frame by frame and the frames' patch tokens are concatenated,
so the text encoder cross-attends to T x L tokens.

Over a whole test set, `answer_questions` answers every question (split over the processes),
`reference_answers` and `answer_accuracy` score the answers, `majority_answer` gives the baseline
and `sample_qa_cases` picks questions for a case page (`peft_cp.blip.report`).

Every function takes a `transformers.BlipForQuestionAnswering`, bare or wrapped (`PeftModel`,
`DistributedDataParallel`), and uses the decoder's start token (`bos_token_id` of the text config,
``[DEC]`` on BLIP-base) in place of the first token of every answer: pass answers tokenised as
``[CLS] answer [SEP]``, the way a BERT tokenizer writes them.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import BlipForQuestionAnswering, PreTrainedTokenizerBase

from peft_cp.blip.data import QAItem, VQATestDataset, collate_vqa_test
from peft_cp.blip.metrics import exact_match_accuracy, vqa_accuracy_dataset
from peft_cp.blip.report import QACase

logger = logging.getLogger(__name__)

# Question ids a missing-reference error lists before summarising the rest.
_REPORTED_IDS = 5

# Wrappers (PeftModel, LoraModel-like tuners, DistributedDataParallel) are peeled at most this deep.
_MAX_WRAPPERS = 6

# Candidate answers re-scored in one decoder pass by `rank_answers`.
_RESCORE_ROWS = 1024


def unwrap_blip_vqa(model: nn.Module) -> BlipForQuestionAnswering:
    """The `BlipForQuestionAnswering` inside `model` (itself, a `PeftModel` or a DDP wrapper).

    Adapted layers are replaced in place by PEFT, so calling the submodules of the returned model
    runs the adapter.
    """
    current = model
    for _ in range(_MAX_WRAPPERS):
        if isinstance(current, BlipForQuestionAnswering):
            return current
        if hasattr(current, "get_base_model"):
            current = current.get_base_model()
        elif isinstance(getattr(current, "module", None), nn.Module):
            current = current.module
        else:
            break
    raise TypeError(
        f"model must be a transformers.BlipForQuestionAnswering or wrap one (PeftModel, DDP), got "
        f"{type(model).__name__}."
    )


def encode_media(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """Patch tokens of images (B, 3, H, W) or videos (B, T, 3, H, W): (B, L, D) or (B, T * L, D).

    Frames are encoded independently (one batch of B * T images) and concatenated in time order.
    Media of another size than the vision config's `image_size` (VQAv2 at 480 px on a checkpoint
    trained at 384 px) get the position embeddings interpolated to their patch grid.
    """
    blip = unwrap_blip_vqa(model)
    if pixel_values.dim() not in (4, 5):
        raise ValueError(
            f"pixel_values must have shape (B, 3, H, W) for images or (B, T, 3, H, W) for videos, "
            f"got {tuple(pixel_values.shape)}."
        )

    images = pixel_values if pixel_values.dim() == 4 else pixel_values.flatten(0, 1)
    native = blip.config.vision_config.image_size
    tokens = blip.vision_model(
        pixel_values=images, interpolate_pos_encoding=tuple(images.shape[-2:]) != (native, native)
    ).last_hidden_state  # (B or B * T, L, D)
    if pixel_values.dim() == 4:
        return tokens

    batch, frames = pixel_values.shape[:2]
    return tokens.reshape(batch, frames * tokens.shape[1], tokens.shape[2])  # (B, T * L, D)


def encode_questions(
    model: nn.Module, pixel_values: Tensor, question_ids: Tensor, question_mask: Tensor
) -> Tensor:
    """Fused question states (B, Lq, D): the text encoder reading the question over the media."""
    blip = unwrap_blip_vqa(model)
    media = encode_media(blip, pixel_values)
    media_mask = torch.ones(media.shape[:2], dtype=torch.long, device=media.device)
    return blip.text_encoder(
        input_ids=question_ids,
        attention_mask=question_mask,
        encoder_hidden_states=media,
        encoder_attention_mask=media_mask,
    ).last_hidden_state


def answer_token_nll(
    model: nn.Module,
    question_states: Tensor,
    question_mask: Tensor,
    answer_ids: Tensor,
    answer_mask: Tensor,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Negative log-likelihood of each answer, summed over its tokens: (N,).

    Args:
        question_states: (N, Lq, D) fused states, one row per answer (already repeated).
        question_mask: (N, Lq) attention mask of the questions.
        answer_ids: (N, La) answers as ``[CLS] answer [SEP] [PAD]...``; the first token is
            replaced by the decoder start token and never scored.
        answer_mask: (N, La) attention mask of the answers; padding is not scored.
        label_smoothing: As in `torch.nn.functional.cross_entropy` (BLIP trains with 0.1); with
            0 the result is the exact negative log-likelihood.
    """
    blip = unwrap_blip_vqa(model)
    decoder_ids = answer_ids.clone()
    decoder_ids[:, 0] = blip.decoder_start_token_id

    logits = blip.text_decoder(
        input_ids=decoder_ids,
        attention_mask=answer_mask,
        encoder_hidden_states=question_states,
        encoder_attention_mask=question_mask,
    ).logits  # (N, La, V)

    # Position t predicts token t + 1; padding (by mask or by id) is left out with -100.
    targets = decoder_ids[:, 1:]
    ignored = (answer_mask[:, 1:] == 0) | (targets == blip.decoder_pad_token_id)
    targets = targets.masked_fill(ignored, -100)
    nll = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(),  # (N, V, La - 1)
        targets,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    return nll.sum(dim=1)


def answer_loss(
    model: nn.Module,
    pixel_values: Tensor,
    question_ids: Tensor,
    question_mask: Tensor,
    answer_ids: Tensor,
    answer_mask: Tensor,
    weights: Tensor,
    answer_counts: Tensor,
    label_smoothing: float = 0.0,
) -> Tensor:
    """BLIP's weighted answer loss: sum over answers of w_a * NLL(a | media, question) / B.

    Each question's fused states are computed once and repeated for each of its answers.

    Args:
        pixel_values: (B, 3, H, W) images or (B, T, 3, H, W) videos.
        question_ids, question_mask: (B, Lq) tokenised questions.
        answer_ids, answer_mask: (A, La) the answers of all questions, question by question
            (``collate_vqa_train`` order), tokenised as ``[CLS] answer [SEP]``.
        weights: (A,) weight of each answer (its share of the human votes).
        answer_counts: (B,) how many consecutive answers belong to each question; sums to A.
        label_smoothing: See `answer_token_nll`.

    Returns:
        The scalar loss.
    """
    batch = question_ids.shape[0]
    if answer_counts.shape != (batch,):
        raise ValueError(
            f"answer_counts must have shape ({batch},), one count per question, got "
            f"{tuple(answer_counts.shape)}."
        )
    total = int(answer_counts.sum())
    if total != answer_ids.shape[0] or weights.shape != (total,):
        raise ValueError(
            f"answer_counts sums to {total}, but answer_ids has {answer_ids.shape[0]} rows and "
            f"weights has shape {tuple(weights.shape)}; all three must describe the same answers."
        )

    states = encode_questions(model, pixel_values, question_ids, question_mask)
    counts = answer_counts.to(states.device)
    states = states.repeat_interleave(counts, dim=0)  # (A, Lq, D)
    mask = question_mask.repeat_interleave(counts, dim=0)

    nll = answer_token_nll(model, states, mask, answer_ids, answer_mask, label_smoothing)
    return (weights.to(nll.dtype) * nll).sum() / batch


@torch.no_grad()
def rank_answers(
    model: nn.Module,
    pixel_values: Tensor,
    question_ids: Tensor,
    question_mask: Tensor,
    answer_ids: Tensor,
    answer_mask: Tensor,
    k: int = 128,
) -> Tensor:
    """Pick the best answer of a candidate list for each question: indices (B,).

    The decoder's first step gives the probability of every candidate's first token; the k
    candidates with the highest are re-scored by their full log-likelihood (sum of token
    log-probabilities) and the highest scoring one is returned. With k >= the number of
    candidates this is exact maximum-likelihood ranking.

    Args:
        pixel_values: (B, 3, H, W) or (B, T, 3, H, W).
        question_ids, question_mask: (B, Lq).
        answer_ids, answer_mask: (N, La) the candidate list, tokenised as ``[CLS] answer [SEP]``.
        k: Candidates re-scored per question (BLIP uses 128); capped at N.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    if answer_ids.shape[1] < 2:
        raise ValueError(
            f"answer_ids must hold at least a start token and one answer token per row, got "
            f"shape {tuple(answer_ids.shape)}."
        )

    blip = unwrap_blip_vqa(model)
    states = encode_questions(blip, pixel_values, question_ids, question_mask)
    batch, num_candidates = states.shape[0], answer_ids.shape[0]
    k = min(k, num_candidates)

    # First step: the start token alone; the candidates' first tokens are read from its output.
    start = torch.full((batch, 1), blip.decoder_start_token_id, device=states.device)
    first_logits = blip.text_decoder(
        input_ids=start, encoder_hidden_states=states, encoder_attention_mask=question_mask
    ).logits[:, 0]  # (B, V)
    first_probs = first_logits.float().softmax(dim=-1)[:, answer_ids[:, 1]]  # (B, N)
    top = first_probs.topk(k, dim=1).indices  # (B, k)

    # B * k rows of full logits (B * k * La * V values) are re-scored a few questions at a time:
    # 32 questions x 128 candidates would need 5 GB of logits at once on BLIP-base.
    questions_per_chunk = max(1, _RESCORE_ROWS // k)
    scores = []
    for first in range(0, batch, questions_per_chunk):
        rows = slice(first, first + questions_per_chunk)
        flat = top[rows].flatten()
        nll = answer_token_nll(
            blip,
            states[rows].repeat_interleave(k, dim=0),
            question_mask[rows].repeat_interleave(k, dim=0),
            answer_ids[flat],
            answer_mask[flat],
        )
        scores.append(-nll.view(-1, k))
    best = torch.cat(scores).argmax(dim=1)
    return top.gather(1, best[:, None]).squeeze(1)


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    pixel_values: Tensor,
    question_ids: Tensor,
    question_mask: Tensor,
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int = 10,
) -> list[str]:
    """Greedy decoding of one answer per question, stopping at ``[SEP]``: B strings.

    Unlike `BlipForQuestionAnswering.generate`, the decoder does not attend to question padding,
    as in training and `rank_answers`.
    """
    blip = unwrap_blip_vqa(model)
    states = encode_questions(blip, pixel_values, question_ids, question_mask)
    start = torch.full((states.shape[0], 1), blip.decoder_start_token_id, device=states.device)

    text_config = blip.config.text_config
    tokens = blip.text_decoder.generate(
        input_ids=start,
        encoder_hidden_states=states,
        encoder_attention_mask=question_mask,
        eos_token_id=text_config.sep_token_id,
        pad_token_id=text_config.pad_token_id,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
    )
    answers = tokenizer.batch_decode(tokens[:, 1:], skip_special_tokens=True)
    return [answer.strip() for answer in answers]


# ---------------------------------------------------------------------------------------------
# Evaluation of a whole test set


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask (B, L) of `texts`: padded to the longest, cut at `max_length`.

    A BERT tokenizer writes ``[CLS] text [SEP]``, the form every function above expects.
    """
    encoded = tokenizer(
        list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return encoded.input_ids, encoded.attention_mask


@torch.no_grad()
def answer_questions(
    model: nn.Module,
    dataset: VQATestDataset,
    tokenizer: PreTrainedTokenizerBase,
    accelerator: Accelerator,
    candidates: Sequence[str] | None = None,
    *,
    batch_size: int = 32,
    max_question_length: int = 35,
    max_answer_length: int = 10,
    k: int = 128,
    num_workers: int = 0,
) -> dict[int, str]:
    """Answer every question of `dataset`: {question_id: answer}, the same on every process.

    With `candidates` (VQAv2) each answer is the best of that list by `rank_answers` (top `k`
    first tokens re-scored); without, it is generated greedily (`generate_answers`, MSRVTT-QA).
    Process p answers questions p, p + world_size, ...; the answers are then gathered.
    """
    device = accelerator.device
    shard = Subset(
        dataset, range(accelerator.process_index, len(dataset), accelerator.num_processes)
    )
    loader = DataLoader(
        shard, batch_size=batch_size, collate_fn=collate_vqa_test, num_workers=num_workers
    )
    if candidates is not None:
        answer_ids, answer_mask = tokenize(tokenizer, candidates, max_answer_length)
        answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)

    model.eval()
    answers: list[tuple[int, str]] = []
    for batch in tqdm(loader, desc="answering", disable=not accelerator.is_local_main_process):
        pixels = batch["pixel_values"].to(device)
        question_ids, question_mask = tokenize(tokenizer, batch["question"], max_question_length)
        question_ids, question_mask = question_ids.to(device), question_mask.to(device)

        with accelerator.autocast():
            if candidates is None:
                texts = generate_answers(
                    model, pixels, question_ids, question_mask, tokenizer, max_answer_length
                )
            else:
                best = rank_answers(
                    model, pixels, question_ids, question_mask, answer_ids, answer_mask, k
                )
                texts = [candidates[i] for i in best.tolist()]
        answers += zip(batch["question_id"].tolist(), texts, strict=True)

    return dict(gather_object(answers))


def majority_answer(items: Iterable[QAItem]) -> str:
    """The answer with the largest total weight over `items`: the answer-everything baseline.

    Ties go to the answer met first.
    """
    votes: Counter[str] = Counter()
    for item in items:
        for answer, weight in zip(item.answers, item.weights, strict=True):
            votes[answer] += weight
    if not votes:
        raise ValueError("majority_answer: `items` hold no answers; pass training questions.")
    return votes.most_common(1)[0][0]


def read_reference_answers(path: str | Path, question_ids: Iterable[int]) -> dict[int, list[str]]:
    """The human answers of `question_ids` from a JSON object {"question_id": [answers, ...]}.

    Raises:
        ValueError: if the file is not such an object, or lacks some of `question_ids` (the
            error names the file and the first missing ids).
    """
    path = Path(path)
    answers = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(answers, dict):
        raise ValueError(
            f"{path}: expected a JSON object {{question_id: [human answers]}}, got a "
            f"{type(answers).__name__}."
        )

    question_ids = list(question_ids)
    missing = [qid for qid in question_ids if str(qid) not in answers]
    if missing:
        shown = ", ".join(map(str, missing[:_REPORTED_IDS]))
        more = f" and {len(missing) - _REPORTED_IDS} more" if len(missing) > _REPORTED_IDS else ""
        raise ValueError(
            f"{path}: no reference answers for {len(missing)} of {len(question_ids)} questions, "
            f"question_id {shown}{more}. Pass the answers file of the same split as the questions."
        )
    references = {}
    for qid in question_ids:
        entry = answers[str(qid)]
        if not isinstance(entry, list) or not all(isinstance(a, str) for a in entry) or not entry:
            raise ValueError(
                f"{path}: question_id {qid} must map to a non-empty list of answer strings, got "
                f"{entry!r}."
            )
        references[qid] = entry
    return references


def reference_answers(
    dataset: VQATestDataset, answers_file: str | Path | None = None
) -> dict[int, list[str]] | None:
    """Ground truth of each question of `dataset`: {question_id: [answers]}, or None if unknown.

    MSRVTT-QA test files carry their answer (one per question); VQAv2 ones do not, and their
    human answers come from `answers_file` (`read_reference_answers`) when it is given.
    """
    if dataset.items and all(item.answers for item in dataset.items):
        return {item.question_id: list(item.answers) for item in dataset.items}
    if answers_file is None:
        return None
    return read_reference_answers(answers_file, (item.question_id for item in dataset.items))


def answer_accuracy(
    predictions: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    benchmark: Literal["vqav2", "msrvtt_qa"],
) -> float:
    """Accuracy in percent: VQAv2 accuracy over the human answers, or MSRVTT-QA exact match."""
    if benchmark == "vqav2":
        return vqa_accuracy_dataset(predictions, references)
    if benchmark == "msrvtt_qa":
        return exact_match_accuracy(predictions, {qid: refs[0] for qid, refs in references.items()})
    raise ValueError(f"benchmark must be 'vqav2' or 'msrvtt_qa', got {benchmark!r}.")


def sample_qa_cases(
    dataset: VQATestDataset,
    predictions: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    count: int,
) -> list[QACase]:
    """`count` questions spread evenly over `dataset` as `QACase`s for `write_qa_cases_html`."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}.")
    count = min(count, len(dataset))
    if count == 0:
        return []

    # Evenly spaced indices, first and last included, so that every part of the set is shown.
    step = (len(dataset) - 1) / max(count - 1, 1)
    items = [dataset.items[round(i * step)] for i in range(count)]
    return [
        QACase(
            media=dataset.media_root / item.media,
            question=item.question,
            prediction=predictions[item.question_id],
            references=list(references[item.question_id]),
        )
        for item in items
    ]
