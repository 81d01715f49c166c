"""Retrieval losses, hard negatives, the gated query transformation and the trainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import BlipForImageTextRetrieval

from peft_cp import AuroraConfig
from peft_cp.blip.configs import small_blip_config
from peft_cp.blip.demo import demo_vocabulary, word_tokenizer
from peft_cp.blip.gated_query import add_gated_query
from peft_cp.blip.retrieval import (
    add_temperature,
    blip_of,
    chance_recall,
    contrastive_loss,
    encode_media,
    negative_weights,
    pick_negatives,
    rerank_scores,
    retrieval_losses,
    tokenize_captions,
)
from peft_cp.blip.training import TrainingArguments, fit

ROOT = Path(__file__).resolve().parents[2]


def test_contrastive_loss_matches_an_explicit_computation():
    torch.manual_seed(0)
    media = F.normalize(torch.randn(4, 8), dim=-1)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    ids = torch.tensor([0, 0, 1, 2])  # the first two captions describe the same image
    temp = torch.tensor(0.1)

    loss = contrastive_loss(media, text, ids, temp)

    expected = 0.0
    for i in range(4):
        positives = [j for j in range(4) if ids[j] == ids[i]]
        m2t = torch.log_softmax(media[i] @ text.T / temp, dim=0)
        t2m = torch.log_softmax(text[i] @ media.T / temp, dim=0)
        expected += -sum(m2t[j] for j in positives) / len(positives)
        expected += -sum(t2m[j] for j in positives) / len(positives)
    torch.testing.assert_close(loss, expected / 8, rtol=1e-6, atol=1e-6)


def test_hard_negatives_never_share_the_id():
    generator = torch.Generator().manual_seed(0)
    similarity = torch.randn(6, 6, generator=generator) * 5
    ids = torch.tensor([0, 0, 1, 1, 2, 3])

    weights = negative_weights(similarity, ids, ids)
    for _ in range(200):
        picked = pick_negatives(weights, "sample", generator)
        assert not torch.any(ids[picked] == ids)
    hardest = pick_negatives(weights, "hardest", None)

    masked = similarity.masked_fill(ids[:, None] == ids[None, :], float("-inf"))
    assert torch.equal(hardest, masked.argmax(dim=1))


def test_hard_negatives_survive_a_tiny_temperature():
    # Positives far more similar than the negatives: at tau = 1e-4 a softmax over all candidates
    # gives the negatives exactly zero weight in float32.
    ids = torch.tensor([0, 0, 1, 2])
    similarity = torch.where(ids[:, None] == ids[None, :], 1.0, -1.0)
    similarity[0, 2] = -0.5  # the hardest negative of the first query
    similarity = similarity / 1e-4
    assert F.softmax(similarity, dim=1)[:2, 2:].sum() == 0  # the underflow to avoid

    weights = negative_weights(similarity, ids, ids)
    generator = torch.Generator().manual_seed(0)
    picked = torch.stack([pick_negatives(weights, "sample", generator) for _ in range(100)])

    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(4))
    assert not torch.any(ids[picked] == ids)
    assert torch.all(picked[:, 0] == 2)  # the hardest negative takes all the mass
    assert pick_negatives(weights, "hardest", None).tolist() == [2, 2, 0, 0]


def test_a_batch_of_one_medium_has_no_negatives():
    with pytest.raises(ValueError, match="2 item\\(s\\) of the batch have no negative"):
        negative_weights(torch.zeros(2, 2), torch.tensor([5, 5]), torch.tensor([5, 5]))


def test_chance_recall():
    assert chance_recall(24, 1) == pytest.approx(100 / 24)
    # Both positives outside a random top 5 of 10: C(8, 5) / C(10, 5) = 56 / 252.
    assert chance_recall(10, 5, positives=2) == pytest.approx(100 * (1 - 56 / 252))
    assert chance_recall(4, 5) == 100.0


def tiny_peft_retrieval(gated_query=True, seed=0):
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(small_blip_config(init_std=0.1)).eval()
    modules = ["itm_head"] + add_temperature(model)
    if gated_query:
        modules += add_gated_query(model)
    return get_peft_model(model, AuroraConfig(rank=4, modules_to_save=modules))


def batch(size=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(size, 3, 32, 32, generator=generator),
        "input_ids": torch.randint(3, 100, (size, 6), generator=generator),
        "attention_mask": torch.ones(size, 6, dtype=torch.long),
        "media_ids": torch.arange(size) // 2,
    }


def test_context_enhancement_shifts_the_positive_pairs():
    model = tiny_peft_retrieval()
    inputs = batch()

    plain = retrieval_losses(model, **inputs, context_enhancement=False, negatives="hardest")
    enhanced = retrieval_losses(model, **inputs, context_enhancement=True, negatives="hardest")

    torch.testing.assert_close(plain.itc, enhanced.itc)
    assert not torch.allclose(plain.itm, enhanced.itm)


def test_gated_query_leaves_step_zero_unchanged_and_is_trained_and_saved(tmp_path):
    torch.manual_seed(0)
    reference = BlipForImageTextRetrieval(small_blip_config(init_std=0.1)).eval()
    inputs = batch()
    expected = reference(
        input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]
    ).itm_score

    model = tiny_peft_retrieval(gated_query=True)
    got = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).itm_score
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    retrieval_losses(model, **inputs).total.backward()
    gates = {n: p for n, p in model.named_parameters() if "gated_query" in n and p.requires_grad}
    assert len(gates) == 2 * 4  # two text layers, four vectors each
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.values())

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum("gated_query" in k for k in saved) == 2 * 4


def test_gated_query_needs_a_blip_text_encoder():
    with pytest.raises(ValueError, match="component='text_encoder'.*Linear has no such submodule"):
        add_gated_query(torch.nn.Linear(2, 2))


def test_blip_of_needs_a_blip_text_encoder():
    with pytest.raises(TypeError, match="got Sequential, in which no wrapped module has one"):
        blip_of(torch.nn.Sequential(torch.nn.Linear(2, 2)))

    model = tiny_peft_retrieval()
    assert blip_of(model).text_encoder is model.base_model.model.text_encoder


@pytest.mark.parametrize("size", [16, 48])
def test_other_image_sizes_resize_the_position_embeddings(size):
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(small_blip_config(image_size=32, patch_size=8)).eval()
    pixels = torch.randn(2, 3, size, size)

    media = encode_media(model, pixels)

    expected = model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True)
    assert media.embeds.shape == (2, (size // 8) ** 2 + 1, 48)
    torch.testing.assert_close(media.embeds, expected.last_hidden_state)
    if size < 32:
        # Without resizing, the first positions of the 4 x 4 grid would be used.
        truncated = model.vision_model(pixel_values=pixels).last_hidden_state
        assert not torch.allclose(media.embeds, truncated)


def test_native_image_size_is_unchanged():
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(small_blip_config(image_size=32, patch_size=8)).eval()
    pixels = torch.randn(2, 3, 32, 32)

    media = encode_media(model, pixels)

    expected = model.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(media.embeds, expected, rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 2, 10])
def test_rerank_scores_match_a_brute_force_computation(k):
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(small_blip_config(init_std=0.1)).eval()
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32, generator=generator)
    input_ids = torch.randint(3, 100, (5, 6), generator=generator)
    attention_mask = torch.ones(5, 6, dtype=torch.long)
    attention_mask[1, 4:] = 0  # padded captions
    attention_mask[3, 2:] = 0
    sims = torch.randn(3, 5, generator=generator)
    with torch.no_grad():
        media_embeds = model.vision_model(pixel_values=pixels).last_hidden_state

    scores_m2t, scores_t2m = rerank_scores(
        model, sims, media_embeds, input_ids, attention_mask, k, batch_size=2
    )

    # ITM logit of every pair from BLIP's own forward, kept on each query's top k by similarity.
    with torch.no_grad():
        itm = torch.tensor(
            [
                [
                    model(
                        input_ids=input_ids[t : t + 1],
                        attention_mask=attention_mask[t : t + 1],
                        pixel_values=pixels[m : m + 1],
                    ).itm_score[0, 1]
                    for t in range(5)
                ]
                for m in range(3)
            ]
        )
    expected_m2t = torch.full((3, 5), -100.0)
    for m in range(3):
        for t in sims[m].argsort(descending=True)[:k]:
            expected_m2t[m, t] = itm[m, t] + sims[m, t]
    expected_t2m = torch.full((5, 3), -100.0)
    for t in range(5):
        for m in sims[:, t].argsort(descending=True)[:k]:
            expected_t2m[t, m] = itm[m, t] + sims[m, t]
    torch.testing.assert_close(scores_m2t, expected_m2t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores_t2m, expected_t2m, rtol=1e-5, atol=1e-5)


def test_training_captions_pad_to_the_fixed_length():
    tokenizer = word_tokenizer(demo_vocabulary())
    short, long = ["the circle is red"], ["a picture of a red circle", "the square is blue"]

    fixed = [tokenize_captions(tokenizer, texts, 16) for texts in (short, long)]
    dynamic = tokenize_captions(tokenizer, long, 16, padding="longest")

    assert [t["input_ids"].shape for t in fixed] == [(1, 16), (2, 16)]
    assert fixed[0]["attention_mask"].sum().item() == 6  # [CLS] 4 words [SEP]
    assert dynamic["input_ids"].shape == (2, 8)
    torch.testing.assert_close(fixed[1]["input_ids"][:, :8], dynamic["input_ids"])
    assert tokenize_captions(tokenizer, long * 8, 5)["input_ids"].shape == (16, 5)  # truncated


def test_video_media_average_the_frames():
    model = tiny_peft_retrieval()
    frames = torch.randn(2, 3, 3, 32, 32)

    video = encode_media(model, frames)
    per_frame = [encode_media(model, frames[:, t]) for t in range(3)]

    assert video.embeds.shape == (2, 3 * per_frame[0].embeds.shape[1], 48)
    blip = model.base_model.model
    mean_cls = torch.stack([f.embeds[:, 0] for f in per_frame]).mean(0)
    torch.testing.assert_close(video.features, F.normalize(blip.vision_proj(mean_cls), dim=-1))


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, size=8):
        self.items = [batch(1, seed=i) for i in range(size)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return {k: v[0] for k, v in self.items[index].items()} | {"media_ids": torch.tensor(index)}


def collate(samples):
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def loss_fn(model, inputs):
    return retrieval_losses(model, **inputs).total


def adapter_tensors(folder):
    return load_file(Path(folder) / "adapter_model.safetensors")


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_adapter(tmp_path):
    args = dict(epochs=2, batch_size=4, learning_rate=1e-2, seed=3)
    model = tiny_peft_retrieval()
    fit(
        model,
        PairDataset(),
        collate,
        loss_fn,
        TrainingArguments(str(tmp_path / "a"), **args),
        Accelerator(),
    )

    def crash_in_second_epoch(model):
        if (tmp_path / "b" / "checkpoints" / "epoch_0").exists():
            raise KeyboardInterrupt
        return {"score": 0.0}

    model = tiny_peft_retrieval()
    with pytest.raises(KeyboardInterrupt):
        fit(
            model,
            PairDataset(),
            collate,
            loss_fn,
            TrainingArguments(str(tmp_path / "b"), **args),
            Accelerator(),
            crash_in_second_epoch,
            "score",
        )
    assert not (tmp_path / "b" / "checkpoints" / "epoch_1").exists()

    model = tiny_peft_retrieval()  # a fresh process would rebuild the model the same way
    resumed = TrainingArguments(str(tmp_path / "b"), resume=True, **args)
    result = fit(model, PairDataset(), collate, loss_fn, resumed, Accelerator())

    assert result.steps == 4
    expected = adapter_tensors(tmp_path / "a" / "best_adapter")
    got = adapter_tensors(tmp_path / "b" / "best_adapter")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


# 16 pairs, 4 optimizer steps an epoch, checkpoints inside epochs after steps 3 and 6; the crash
# comes after step 7. In batches of 4, each pair's matching negative is drawn from 3 others, so
# resuming needs the random state; in batches of 2 with 2 accumulated, the optimizer steps span
# two batches each.
@pytest.mark.slow
@pytest.mark.parametrize(("batch_size", "accumulation", "crash_at"), [(4, 1, 8), (2, 2, 15)])
def test_run_interrupted_inside_an_epoch_resumes_to_the_same_adapter(
    tmp_path, batch_size, accumulation, crash_at
):
    args = dict(
        epochs=2,
        batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-2,
        seed=3,
        save_every_steps=3,
    )

    def train(folder, loss=loss_fn, resume=False):
        arguments = TrainingArguments(str(tmp_path / folder), resume=resume, **args)
        accelerator = Accelerator(gradient_accumulation_steps=accumulation)
        return fit(tiny_peft_retrieval(), PairDataset(16), collate, loss, arguments, accelerator)

    train("a")
    batches = []

    def crash(model, inputs):
        batches.append(inputs)
        if len(batches) == crash_at:
            raise KeyboardInterrupt
        return loss_fn(model, inputs)

    with pytest.raises(KeyboardInterrupt):
        train("b", loss=crash)
    # The one inside epoch 0 gave way to that epoch's end.
    checkpoints = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert checkpoints == ["epoch_0", "epoch_1_step_6"]

    result = train("b", resume=True)

    assert result.steps == 8
    expected = adapter_tensors(tmp_path / "a" / "best_adapter")
    got = adapter_tensors(tmp_path / "b" / "best_adapter")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_two_processes_see_the_same_step_zero_loss(tmp_path, launch_two_processes):
    script = ROOT / "tests" / "scripts" / "step_zero_loss.py"
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one.json")], capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr
    double = subprocess.run(
        [*launch_two_processes, str(script), str(tmp_path / "two.json")],
        capture_output=True,
        text=True,
    )
    assert double.returncode == 0, double.stderr[-3000:]

    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["itc"] == pytest.approx(one["itc"], rel=1e-5)
    assert two["itm"] == pytest.approx(one["itm"], rel=1e-5)


# Each script takes one sharded step in 2 processes and the same step unsharded, and reports per
# rank: the sharding is FSDP (the store in the root unit) or DeepSpeed ZeRO-2 (its gradients and
# optimizer state partitioned).
@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "env"),
    [("fsdp_step.py", {}), ("deepspeed_step.py", {"DS_ACCELERATOR": "cpu"})],
    ids=["fsdp", "deepspeed_zero2"],
)
def test_factor_store_trains_sharded_like_a_plain_step(
    tmp_path, torchrun_two_processes, script, env
):
    command = [*torchrun_two_processes, str(ROOT / "tests" / "scripts" / script)]
    result = subprocess.run(
        [*command, str(tmp_path / "report.json")],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr[-3000:]

    reports = json.loads((tmp_path / "report.json").read_text())
    assert len(reports) == 2 and all(report["world_size"] == 2 for report in reports)
    for report in reports:  # every rank holds the factors of the plain step
        assert report["output_difference"] < 1e-5
        assert report["factor_difference"] < 1e-5
        assert report["factor_change"] > 1e-3  # the step did move the factors


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, launch_two_processes):
    script = ROOT / "tests" / "scripts" / "fit_steps.py"
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one")], capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run(
        [*launch_two_processes, str(script), str(tmp_path / "two")], capture_output=True, text=True
    )
    assert double.returncode == 0, double.stderr[-3000:]

    one = adapter_tensors(tmp_path / "one" / "best_adapter")
    two = adapter_tensors(tmp_path / "two" / "best_adapter")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
