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

Every function takes a `transformers.BlipForQuestionAnswering`, bare or wrapped (`PeftModel`,
`DistributedDataParallel`), and uses the decoder's start token (`bos_token_id` of the text config,
``[DEC]`` on BLIP-base) in place of the first token of every answer: pass answers tokenised as
``[CLS] answer [SEP]``, the way a BERT tokenizer writes them.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BlipForQuestionAnswering, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

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
