"""Image/video-text retrieval with BLIP: contrastive and matching losses, evaluation protocol.

The functions take a `BlipForImageTextRetrieval` (plain or wrapped by PEFT) and use its vision
encoder, text encoder, projections and matching head directly:

- ITC: contrastive loss between normalised projected [CLS] features, with a learnable temperature,
  positives by media id (several captions per image) and negatives from every process.
- ITM: matching loss on the fused [CLS] of positive pairs and of hard negatives sampled from the
  ITC similarities (never a pair with the same id). Informative Context Enhancement adds
  0.1 x the mean text [CLS] of the batch (over all processes) to the positive pairs' fused [CLS]
  before the matching head.
- Evaluation: ITC similarities between every medium and every caption; each query's top k
  candidates re-scored by the matching head (plus their similarity), then recall at 1, 5, 10.

Videos are (B, T, 3, H, W): frames are encoded separately, the contrastive embedding is the
mean of the frames' [CLS], and the matching head cross-attends to all frames' tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

CONTEXT_WEIGHT = 0.1
TEMPERATURE_MODULE_NAME = "itc_temperature"


class Temperature(nn.Module):
    """The learnable contrastive temperature tau of BLIP's ITC loss: tau = clamp(t, 0.001, 0.5).

    Similarities are divided by tau before the softmax (see `contrastive_loss`), so a small tau
    sharpens the distribution over candidates. `t` starts at BLIP's 0.07 and is trained like any
    other parameter; the clamp keeps the logits finite and the softmax from going flat.
    `forward()` returns tau as a 0-d tensor.
    """

    def __init__(self, initial: float = 0.07) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(initial))

    def forward(self) -> torch.Tensor:
        return self.value.clamp(0.001, 0.5)


def add_temperature(model: nn.Module) -> list[str]:
    """Give `model` a learnable ITC temperature; returns the name to list in `modules_to_save`."""
    if not hasattr(model, TEMPERATURE_MODULE_NAME):
        device = next(model.parameters()).device
        model.add_module(TEMPERATURE_MODULE_NAME, Temperature().to(device))
    return [TEMPERATURE_MODULE_NAME]


def blip_of(model: nn.Module) -> nn.Module:
    """The `BlipForImageTextRetrieval` inside PEFT, DDP or FSDP wrappers (or `model` itself).

    Raises:
        TypeError: if no wrapper level has a BLIP `text_encoder`.
    """
    current = model
    while not hasattr(current, "text_encoder"):
        inner = getattr(current, "module", None)  # DDP, FSDP, the trainer's loss module
        if inner is None and hasattr(current, "get_base_model"):
            inner = current.get_base_model()  # PEFT
        if not isinstance(inner, nn.Module) or inner is current:
            raise TypeError(
                "model must be a BlipForImageTextRetrieval (plain, or wrapped by PEFT, DDP or "
                f"FSDP) with a `text_encoder`; got {type(model).__name__}, in which no wrapped "
                "module has one."
            )
        current = inner
    return current


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (same shape on every process) from every process along dim 0, keeping
    the autograd graph."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward hands each process its rows of the summed gradient.

    Every process computes its loss over the gathered rows, so the gradient of a process's own
    rows is the sum of what every process's loss sends back to them.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total.narrow(0, dist.get_rank() * ctx.rows, ctx.rows)


@dataclass
class MediaFeatures:
    """embeds: (B, T*tokens, D) tokens for matching; features: (B, proj) normalised for ITC."""

    embeds: torch.Tensor
    features: torch.Tensor


def encode_media(model: nn.Module, pixel_values: torch.Tensor) -> MediaFeatures:
    """Images (B, 3, H, W) or videos (B, T, 3, H, W) -> tokens and contrastive features.

    Frames of another size than the vision config's `image_size` (224 px video frames on a 384 px
    checkpoint) get the position embeddings bicubically resized to their patch grid; without that,
    BLIP would silently use the first positions of the larger grid.
    """
    blip = blip_of(model)
    video = pixel_values.dim() == 5
    frames = pixel_values.flatten(0, 1) if video else pixel_values

    native = blip.vision_model.config.image_size
    resize = tuple(frames.shape[-2:]) != (native, native)
    tokens = blip.vision_model(
        pixel_values=frames, interpolate_pos_encoding=resize
    ).last_hidden_state  # (B*T, tokens, D)
    if video:
        tokens = tokens.unflatten(0, pixel_values.shape[:2])  # (B, T, tokens, D)
        cls = tokens[:, :, 0].mean(dim=1)
        tokens = tokens.flatten(1, 2)  # (B, T*tokens, D)
    else:
        cls = tokens[:, 0]
    return MediaFeatures(tokens, F.normalize(blip.vision_proj(cls), dim=-1))


def encode_text(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unimodal text [CLS] (B, D) and its normalised projection (B, proj)."""
    blip = blip_of(model)
    hidden = blip.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    cls = hidden[:, 0]
    return cls, F.normalize(blip.text_proj(cls), dim=-1)


def fused_cls(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    media_embeds: torch.Tensor,
) -> torch.Tensor:
    """The text encoder's [CLS] when cross-attending to `media_embeds`: (B, D)."""
    blip = blip_of(model)
    media_mask = torch.ones(media_embeds.shape[:2], dtype=torch.long, device=media_embeds.device)
    hidden = blip.text_encoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_hidden_states=media_embeds,
        encoder_attention_mask=media_mask,
    ).last_hidden_state
    return hidden[:, 0]


def match_logits(model: nn.Module, fused: torch.Tensor) -> torch.Tensor:
    """ITM logits (B, 2) from fused [CLS] (B, D); column 1 is "matches"."""
    return blip_of(model).itm_head(fused)


def temperature(model: nn.Module) -> torch.Tensor:
    """The ITC temperature tau of `model` as a 0-d tensor: its `Temperature` module's value when
    `add_temperature` gave it one, else BLIP's fixed 0.07."""
    blip = blip_of(model)
    module = getattr(blip, TEMPERATURE_MODULE_NAME, None)
    if module is None:
        return torch.tensor(0.07, device=next(blip.parameters()).device)
    return module()


def contrastive_loss(
    media_features: torch.Tensor,
    text_features: torch.Tensor,
    media_ids: torch.Tensor,
    temp: torch.Tensor,
    all_media_features: torch.Tensor | None = None,
    all_text_features: torch.Tensor | None = None,
    all_media_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """ITC: mean of the media->text and text->media soft-target cross-entropies.

        L = 1/2 mean_i [ -sum_j y_ij log softmax_j(m_i . t_j / tau)
                         -sum_j y_ij log softmax_j(t_i . m_j / tau) ],
        y_ij = [id_i = id_j] / #{j : id_j = id_i}

    Each local item i is scored against the candidates j of every process (`all_*`, default: the
    local ones); the targets y spread evenly over the candidates with the same media id.

    Args:
        media_features: (B, P) normalised media embeddings m of this process.
        text_features: (B, P) normalised caption embeddings t, pair i with media i.
        media_ids: (B,) media id of each pair.
        temp: 0-d temperature tau (see `temperature`).
        all_media_features: (B_all, P) media embeddings of every process.
        all_text_features: (B_all, P) caption embeddings of every process.
        all_media_ids: (B_all,) their media ids.

    Returns:
        The 0-d loss.
    """
    all_media_features = media_features if all_media_features is None else all_media_features
    all_text_features = text_features if all_text_features is None else all_text_features
    all_media_ids = media_ids if all_media_ids is None else all_media_ids

    positives = (media_ids[:, None] == all_media_ids[None, :]).float()  # (B, B_all)
    targets = positives / positives.sum(dim=1, keepdim=True)

    media_to_text = media_features @ all_text_features.T / temp
    text_to_media = text_features @ all_media_features.T / temp
    loss_m2t = -(F.log_softmax(media_to_text, dim=1) * targets).sum(dim=1).mean()
    loss_t2m = -(F.log_softmax(text_to_media, dim=1) * targets).sum(dim=1).mean()
    return (loss_m2t + loss_t2m) / 2


def negative_weights(
    similarity: torch.Tensor, ids: torch.Tensor, candidate_ids: torch.Tensor
) -> torch.Tensor:
    """Sampling weights of hard negatives: w_ic = softmax_c(s_ic) over the c with id_c != id_i.

    The same-id pairs are masked to -inf before the softmax, not zeroed after it: with a small
    temperature the positives would otherwise take all the mass and the negatives underflow to 0.

    Args:
        similarity: (B, C) similarities s (already divided by the temperature).
        ids: (B,) media id of each query.
        candidate_ids: (C,) media id of each candidate.

    Returns:
        (B, C) float32 weights, each row summing to 1 and zero on same-id candidates.

    Raises:
        ValueError: if a row has no candidate with another id.
    """
    same = ids[:, None] == candidate_ids[None, :]
    empty = same.all(dim=1)
    if empty.any():
        raise ValueError(
            f"{int(empty.sum())} item(s) of the batch have no negative: every candidate shares "
            "their media id. Use batches with at least two different media."
        )

    return F.softmax(similarity.float().masked_fill(same, float("-inf")), dim=1)


def pick_negatives(
    weights: torch.Tensor, mode: Literal["sample", "hardest"], generator: torch.Generator | None
) -> torch.Tensor:
    """One negative candidate per row of `weights` (B, C) (from `negative_weights`): (B,) indices.

    "sample" draws c ~ Categorical(w_i) (BLIP's hard-negative mining), "hardest" takes
    argmax_c w_ic, the most similar candidate with another id. Zero-weight candidates are never
    picked by either.
    """
    if mode == "hardest":
        return weights.argmax(dim=1)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


@dataclass
class RetrievalLosses:
    itc: torch.Tensor
    itm: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.itc + self.itm


def retrieval_losses(
    model: nn.Module,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    media_ids: torch.Tensor,
    context_enhancement: bool = True,
    negatives: Literal["sample", "hardest"] = "sample",
    generator: torch.Generator | None = None,
) -> RetrievalLosses:
    """ITC and ITM losses of a batch of (medium, caption) pairs, across all processes."""
    media = encode_media(model, pixel_values)
    text_cls, text_features = encode_text(model, input_ids, attention_mask)

    all_media_features = gather_with_grad(media.features)
    all_text_features = gather_with_grad(text_features)
    all_ids = gather_with_grad(media_ids)
    itc = contrastive_loss(
        media.features,
        text_features,
        media_ids,
        temperature(model),
        all_media_features,
        all_text_features,
        all_ids,
    )

    # Positive pairs, with the text context of the whole (all-process) batch when enhancing.
    batch = len(media_ids)
    fused_positive = fused_cls(model, input_ids, attention_mask, media.embeds)
    if context_enhancement:
        context = gather_with_grad(text_cls).mean(dim=0, keepdim=True)
        fused_positive = fused_positive + CONTEXT_WEIGHT * context

    # Hard negatives from every process: a caption for each medium, a medium for each caption.
    with torch.no_grad():
        temp = temperature(model)
        text_weights = negative_weights(
            media.features @ all_text_features.T / temp, media_ids, all_ids
        )
        media_weights = negative_weights(
            text_features @ all_media_features.T / temp, media_ids, all_ids
        )
        negative_text = pick_negatives(text_weights, negatives, generator)
        negative_media = pick_negatives(media_weights, negatives, generator)
    all_embeds = gather_with_grad(media.embeds)
    all_input_ids = gather_with_grad(input_ids)
    all_attention = gather_with_grad(attention_mask)

    fused_negative = fused_cls(
        model,
        torch.cat([input_ids, all_input_ids[negative_text]]),
        torch.cat([attention_mask, all_attention[negative_text]]),
        torch.cat([all_embeds[negative_media], media.embeds]),
    )
    logits = match_logits(model, torch.cat([fused_positive, fused_negative]))
    labels = torch.cat(
        [torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)]
    ).to(logits.device)
    return RetrievalLosses(itc, F.cross_entropy(logits, labels))


@torch.no_grad()
def similarity_matrix(
    model: nn.Module,
    media_loader,
    text_input_ids: torch.Tensor,
    text_attention_mask: torch.Tensor,
    text_batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ITC similarities (M, T) of every medium and caption, and the media tokens (M, L, D).

    `media_loader` yields batches with "pixel_values". Returns (sims, media_embeds, text_ids).
    """
    embeds, features = [], []
    for batch in media_loader:
        media = encode_media(model, batch["pixel_values"])
        embeds.append(media.embeds)
        features.append(media.features)
    media_embeds, media_features = torch.cat(embeds), torch.cat(features)

    text_features = []
    for start in range(0, len(text_input_ids), text_batch_size):
        chunk = slice(start, start + text_batch_size)
        text_features.append(
            encode_text(model, text_input_ids[chunk], text_attention_mask[chunk])[1]
        )
    return media_features @ torch.cat(text_features).T, media_embeds, text_input_ids


@torch.no_grad()
def rerank_scores(
    model: nn.Module,
    sims: torch.Tensor,
    media_embeds: torch.Tensor,
    text_input_ids: torch.Tensor,
    text_attention_mask: torch.Tensor,
    k: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-score each query's top-k candidates with the matching head: ITM logit + similarity.

        scores_m2t[m, t] = itm(m, t) + sims[m, t]  if t is among the k largest of sims[m, :]
                           -100                     otherwise
        scores_t2m[t, m] = itm(m, t) + sims[m, t]  if m is among the k largest of sims[:, t]
                           -100                     otherwise

    where itm(m, t) is the "matches" logit (column 1) of the matching head on media m and caption
    t. Queries are split over processes (this one takes rows `rank::world_size`) and the results
    summed, so every process returns the full matrices.

    Args:
        sims: (M, T) ITC similarities.
        media_embeds: (M, L, D) media tokens the text encoder cross-attends to.
        text_input_ids, text_attention_mask: (T, N) tokenised captions.
        k: candidates re-scored per query (capped at the number of candidates).
        progress: show a progress bar on the process of rank 0.

    Returns:
        (scores_m2t (M, T), scores_t2m (T, M)).
    """
    k_media = min(k, sims.shape[1])
    k_text = min(k, sims.shape[0])
    scores_m2t = torch.full_like(sims, -100.0)
    scores_t2m = torch.full_like(sims.T, -100.0)

    def itm(media_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(media_index), batch_size):
            chunk = slice(start, start + batch_size)
            fused = fused_cls(
                model,
                text_input_ids[text_index[chunk]],
                text_attention_mask[text_index[chunk]],
                media_embeds[media_index[chunk]],
            )
            out.append(match_logits(model, fused)[:, 1])
        return torch.cat(out)

    media_queries = range(rank, sims.shape[0], world_size)
    text_queries = range(rank, sims.shape[1], world_size)
    bar = tqdm(
        total=len(media_queries) + len(text_queries),
        desc="re-ranking",
        disable=not progress or rank != 0,
    )
    for m in media_queries:
        top_sims, top_texts = sims[m].topk(k_media)
        scores_m2t[m, top_texts] = itm(torch.full_like(top_texts, m), top_texts) + top_sims
        bar.update()
    for t in text_queries:
        top_sims, top_media = sims[:, t].topk(k_text)
        scores_t2m[t, top_media] = itm(top_media, torch.full_like(top_media, t)) + top_sims
        bar.update()
    bar.close()

    if world_size > 1:
        # Rows of other processes are -100 here; shift to zero, sum, shift back.
        for scores in (scores_m2t, scores_t2m):
            owned = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
            owned[rank::world_size] = True
            scores[~owned] = 0.0
            dist.all_reduce(scores)
    return scores_m2t, scores_t2m


def chance_recall(num_candidates: int, k: int, positives: int = 1) -> float:
    """Expected recall@k (percent) of a random ranking with `positives` relevant candidates."""
    if num_candidates <= k:
        return 100.0
    miss = math.comb(num_candidates - positives, k) / math.comb(num_candidates, k)
    return 100.0 * (1.0 - miss)


def tokenize_captions(
    tokenizer,
    texts: list[str],
    max_length: int,
    device=None,
    padding: Literal["max_length", "longest"] = "max_length",
) -> dict:
    """`input_ids` and `attention_mask` (N, L), truncated at `max_length` tokens (BLIP uses 35).

    With "max_length" (the default, as BLIP trains) L = `max_length` whatever the captions, so the
    token ids of every process can be gathered in the ITM loss; "longest" pads only to the longest
    caption of `texts`, enough where nothing is gathered (evaluation).
    """
    tokens = tokenizer(
        texts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {k: v.to(device) if device is not None else v for k, v in tokens.items()}


@torch.no_grad()
def evaluate_retrieval(
    model: nn.Module,
    dataset,
    tokenizer,
    k: int,
    device: torch.device,
    batch_size: int = 32,
    max_length: int = 35,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> tuple[dict[str, float], dict[str, list[list[int]]]]:
    """Recall@1/5/10 of a `RetrievalEvalDataset` with the top-k re-ranking protocol.

    Returns (metrics in percent, the top 5 candidates of every query with their scores:
    {"media_to_text": {"indices", "scores"}, "text_to_media": {"indices", "scores"}}).
    """
    from torch.utils.data import DataLoader

    from .data import collate_retrieval_eval
    from .metrics import retrieval_recall, topk_per_query

    model.eval()
    loader = DataLoader(
        dataset, batch_size=batch_size, collate_fn=collate_retrieval_eval, num_workers=num_workers
    )
    media_batches = ({"pixel_values": b["pixel_values"].to(device)} for b in loader)
    tokens = tokenize_captions(tokenizer, dataset.texts, max_length, device, padding="longest")

    sims, media_embeds, _ = similarity_matrix(
        model, media_batches, tokens["input_ids"], tokens["attention_mask"]
    )
    scores_m2t, scores_t2m = rerank_scores(
        model,
        sims,
        media_embeds,
        tokens["input_ids"],
        tokens["attention_mask"],
        k,
        rank=rank,
        world_size=world_size,
    )
    metrics = retrieval_recall(
        scores_m2t.cpu(), scores_t2m.cpu(), dataset.text_to_media, dataset.media_to_texts
    )
    top5 = {}
    for direction, scores in (
        ("media_to_text", scores_m2t.cpu()),
        ("text_to_media", scores_t2m.cpu()),
    ):
        indices = topk_per_query(scores, min(5, scores.shape[1]))
        top5[direction] = {
            "indices": indices.tolist(),
            "scores": scores.gather(1, indices).tolist(),
        }
    return metrics, top5
