import json
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from transformers import BlipForQuestionAnswering

import peft_cp
from peft_cp.blip import vqa
from peft_cp.blip.configs import small_blip_config
from peft_cp.blip.data import VQATestDataset, VQATrainDataset, read_answer_list
from peft_cp.blip.demo_vqa import build_demo_tokenizer, write_demo_video_qa, write_demo_vqa
from peft_cp.blip.video import ImageLoader, ImageTransform, VideoLoader
from peft_cp.blip.vqa import (
    answer_loss,
    encode_media,
    encode_questions,
    generate_answers,
    rank_answers,
)

IMAGE = 32


@pytest.fixture
def questions():
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 100, (3, 6), generator=generator)
    ids[:, 0], ids[:, -1] = 1, 2
    mask = torch.ones_like(ids)
    ids[1, 4:], mask[1, 4:] = 0, 0  # a padded question
    return {
        "pixel_values": torch.randn(3, 3, IMAGE, IMAGE, generator=generator),
        "question_ids": ids,
        "question_mask": mask,
    }


def _answers(lengths, seed=3, vocab=100):
    """`[CLS] tokens [SEP]` rows padded to the longest, and the unpadded rows."""
    generator = torch.Generator().manual_seed(seed)
    rows = [
        torch.cat(
            [
                torch.tensor([1]),
                torch.randint(3, vocab, (n,), generator=generator),
                torch.tensor([2]),
            ]
        )
        for n in lengths
    ]
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return ids, mask, rows


def _log_likelihood(model, states, question_mask, row):
    """Reference: one unpadded answer, decoded alone, log-probabilities of tokens 1.. summed."""
    decoder_ids = row.clone()[None]
    decoder_ids[0, 0] = model.decoder_start_token_id
    logits = model.text_decoder(
        input_ids=decoder_ids,
        encoder_hidden_states=states[None],
        encoder_attention_mask=question_mask[None],
    ).logits[0]
    log_probs = logits[:-1].log_softmax(-1)
    return log_probs.gather(1, row[1:, None]).sum()


def test_answer_loss_is_weighted_sum_of_answer_nll(tiny_vqa, questions):
    answer_ids, answer_mask, rows = _answers([1, 3, 2, 1, 2, 1])
    counts = torch.tensor([2, 3, 1])
    weights = torch.tensor([0.6, 0.4, 0.5, 0.3, 0.2, 1.0])

    loss = answer_loss(
        tiny_vqa,
        **questions,
        answer_ids=answer_ids,
        answer_mask=answer_mask,
        weights=weights,
        answer_counts=counts,
    )

    with torch.no_grad():
        states = encode_questions(tiny_vqa, **questions)
        owner = torch.repeat_interleave(torch.arange(3), counts)
        nll = torch.stack(
            [
                -_log_likelihood(tiny_vqa, states[b], questions["question_mask"][b], row)
                for b, row in zip(owner.tolist(), rows, strict=True)
            ]
        )
    torch.testing.assert_close(loss.detach(), (weights * nll).sum() / 3, rtol=1e-5, atol=1e-5)


def test_answer_loss_trains_only_through_adapter(tiny_vqa, questions, clone):
    answer_ids, answer_mask, _ = _answers([1, 2, 1])
    inputs = {
        **questions,
        "answer_ids": answer_ids,
        "answer_mask": answer_mask,
        "weights": torch.ones(3),
        "answer_counts": torch.tensor([1, 1, 1]),
    }
    expected = answer_loss(tiny_vqa, **inputs)

    peft_model = get_peft_model(clone(tiny_vqa), peft_cp.AuroraConfig(rank=4))
    loss = answer_loss(peft_model, **inputs)  # V = 0 at init: same loss as the base model
    loss.backward()

    torch.testing.assert_close(loss, expected)
    store = peft_model.base_model.factor_store()
    assert all(p.grad is not None for p in store.parameters() if p.requires_grad)


def test_answer_loss_rejects_inconsistent_counts(tiny_vqa, questions):
    answer_ids, answer_mask, _ = _answers([1, 1])
    with pytest.raises(ValueError, match="answer_counts sums to 3"):
        answer_loss(
            tiny_vqa,
            **questions,
            answer_ids=answer_ids,
            answer_mask=answer_mask,
            weights=torch.ones(2),
            answer_counts=torch.tensor([1, 1, 1]),
        )
    with pytest.raises(ValueError, match=r"answer_counts must have shape \(3,\)"):
        answer_loss(
            tiny_vqa,
            **questions,
            answer_ids=answer_ids,
            answer_mask=answer_mask,
            weights=torch.ones(2),
            answer_counts=torch.tensor([2]),
        )


@pytest.mark.parametrize("rescore_rows", [1024, 8])  # 8: one question per decoder pass
@pytest.mark.parametrize("k", [7, 100])
def test_rank_answers_equals_brute_force_with_all_candidates(
    tiny_vqa, questions, k, rescore_rows, monkeypatch
):
    monkeypatch.setattr(vqa, "_RESCORE_ROWS", rescore_rows)
    answer_ids, answer_mask, rows = _answers([1, 2, 3, 1, 2, 1, 4], seed=5)

    best = rank_answers(tiny_vqa, **questions, answer_ids=answer_ids, answer_mask=answer_mask, k=k)

    with torch.no_grad():
        states = encode_questions(tiny_vqa, **questions)
        scores = torch.tensor(
            [
                [
                    _log_likelihood(tiny_vqa, states[b], questions["question_mask"][b], row)
                    for row in rows
                ]
                for b in range(3)
            ]
        )
    torch.testing.assert_close(best, scores.argmax(dim=1))


def _first_token_probabilities(model, states, question_mask, answer_ids):
    """Reference: the decoder's first-step distribution over each candidate's first token (B, N)."""
    start = torch.full((states.shape[0], 1), model.decoder_start_token_id)
    logits = model.text_decoder(
        input_ids=start, encoder_hidden_states=states, encoder_attention_mask=question_mask
    ).logits[:, 0]  # (B, V)
    return logits.softmax(dim=-1)[:, answer_ids[:, 1]]


@pytest.mark.parametrize("rescore_rows", [1024, 4])  # 4: one question per decoder pass
def test_rank_answers_rescores_only_the_top_k_first_tokens(
    tiny_vqa, questions, rescore_rows, monkeypatch
):
    monkeypatch.setattr(vqa, "_RESCORE_ROWS", rescore_rows)
    answer_ids, answer_mask, rows = _answers([1, 2, 3, 1, 2, 1, 4, 2], seed=6)
    assert len({row[1].item() for row in rows}) == len(rows)  # distinct first tokens: no ties
    k = 3

    best = rank_answers(tiny_vqa, **questions, answer_ids=answer_ids, answer_mask=answer_mask, k=k)

    with torch.no_grad():
        mask = questions["question_mask"]
        states = encode_questions(tiny_vqa, **questions)
        first = _first_token_probabilities(tiny_vqa, states, mask, answer_ids)
        expected, unpruned = [], []
        for b in range(3):
            scores = [_log_likelihood(tiny_vqa, states[b], mask[b], row) for row in rows]
            shortlist = first[b].argsort(descending=True)[:k].tolist()
            expected.append(max(shortlist, key=lambda i: scores[i]))
            unpruned.append(max(range(len(rows)), key=lambda i: scores[i]))
    torch.testing.assert_close(best, torch.tensor(expected))
    assert expected != unpruned  # the case exercises pruning: a full ranking would differ


def test_rank_answers_with_k1_takes_most_probable_first_token(tiny_vqa, questions):
    answer_ids, answer_mask, rows = _answers([2, 2, 2, 2], seed=7)
    assert len({row[1].item() for row in rows}) == 4  # distinct first tokens: no ties

    best = rank_answers(tiny_vqa, **questions, answer_ids=answer_ids, answer_mask=answer_mask, k=1)

    with torch.no_grad():
        states = encode_questions(tiny_vqa, **questions)
        start = torch.full((3, 1), tiny_vqa.decoder_start_token_id)
        logits = tiny_vqa.text_decoder(
            input_ids=start,
            encoder_hidden_states=states,
            encoder_attention_mask=questions["question_mask"],
        ).logits[:, 0]
    torch.testing.assert_close(best, logits[:, answer_ids[:, 1]].argmax(dim=1))


def test_rank_answers_rejects_bad_k(tiny_vqa, questions):
    answer_ids, answer_mask, _ = _answers([1, 1])
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        rank_answers(tiny_vqa, **questions, answer_ids=answer_ids, answer_mask=answer_mask, k=0)


def test_generate_answers_returns_one_string_per_question(questions):
    tokenizer = build_demo_tokenizer()
    torch.manual_seed(0)
    config = small_blip_config(vision_width=32, text_width=32, vocab_size=len(tokenizer))
    model = BlipForQuestionAnswering(config).eval()
    question_ids = questions["question_ids"] % len(tokenizer)

    answers = generate_answers(
        model, questions["pixel_values"], question_ids, questions["question_mask"], tokenizer, 3
    )

    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)
    assert all(len(answer.split()) <= 3 for answer in answers)


def test_video_frames_are_encoded_separately_and_concatenated(tiny_vqa, questions):
    video = torch.randn(2, 3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(4))

    tokens = encode_media(tiny_vqa, video)

    per_frame = [encode_media(tiny_vqa, video[:, t]) for t in range(3)]
    torch.testing.assert_close(tokens, torch.cat(per_frame, dim=1))
    num_patches = (IMAGE // 8) ** 2 + 1
    assert tokens.shape == (2, 3 * num_patches, 32)


def test_video_input_works_for_loss_ranking_and_generation(tiny_vqa, questions):
    video = torch.randn(3, 2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(4))
    inputs = {**questions, "pixel_values": video}
    answer_ids, answer_mask, _ = _answers([1, 2, 1])

    loss = answer_loss(
        tiny_vqa,
        **inputs,
        answer_ids=answer_ids,
        answer_mask=answer_mask,
        weights=torch.ones(3),
        answer_counts=torch.tensor([1, 1, 1]),
    )
    best = rank_answers(tiny_vqa, **inputs, answer_ids=answer_ids, answer_mask=answer_mask)

    assert loss.isfinite() and best.shape == (3,)


def test_encode_media_at_the_native_size_is_the_plain_vision_model(tiny_vqa, questions):
    pixels = questions["pixel_values"]

    tokens = encode_media(tiny_vqa, pixels)

    with torch.no_grad():
        expected = tiny_vqa.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


@pytest.mark.parametrize("frames", [None, 2])
def test_encode_media_interpolates_positions_for_larger_media(tiny_vqa, frames):
    size = IMAGE + 16  # a 6 x 6 patch grid on a model whose position embeddings cover 4 x 4
    shape = (2, 3, size, size) if frames is None else (2, frames, 3, size, size)
    pixels = torch.randn(shape, generator=torch.Generator().manual_seed(8))

    tokens = encode_media(tiny_vqa, pixels)

    with torch.no_grad():
        expected = tiny_vqa.vision_model(
            pixel_values=pixels.reshape(-1, 3, size, size), interpolate_pos_encoding=True
        ).last_hidden_state
    torch.testing.assert_close(tokens, expected.reshape(2, -1, 32))
    assert tokens.shape[1] == (frames or 1) * ((size // 8) ** 2 + 1)


def test_encode_media_rejects_other_shapes(tiny_vqa):
    with pytest.raises(ValueError, match=r"pixel_values must have shape .* got \(3, 32, 32\)"):
        encode_media(tiny_vqa, torch.randn(3, IMAGE, IMAGE))


def test_functions_reject_other_models(tiny_retrieval, questions):
    with pytest.raises(TypeError, match="BlipForQuestionAnswering"):
        encode_questions(tiny_retrieval, **questions)


def test_demo_vqa_files_are_read_by_the_loaders(tmp_path):
    files = write_demo_vqa(tmp_path / "a", num_train_images=12, num_test_images=6)
    again = write_demo_vqa(tmp_path / "b", num_train_images=12, num_test_images=6)
    loader = ImageLoader(ImageTransform(IMAGE))

    train = VQATrainDataset(files.train_file, files.media_root, loader, benchmark="vqav2")
    test = VQATestDataset(files.test_file, files.media_root, loader, benchmark="vqav2")
    candidates = read_answer_list(files.answer_list_file)
    truth = json.loads(files.test_answers_file.read_text())

    assert len(train) >= 12 and len(test) >= 6
    sample = train[0]
    assert sample["pixel_values"].shape == (3, IMAGE, IMAGE)
    assert sum(sample["weights"]) == pytest.approx(1.0)
    assert {str(item.question_id) for item in test.items} == set(truth)
    assert all(len(answers) == 10 and set(answers) <= set(candidates) for answers in truth.values())
    assert all(set(item.answers) <= set(candidates) for item in train.items)
    raw = json.loads(files.train_file.read_text())
    assert all(3 <= len(entry["answer"]) <= 10 for entry in raw)  # human answers, as in VQAv2
    assert files.train_file.read_bytes() == again.train_file.read_bytes()

    tokenizer = build_demo_tokenizer()
    encoded = tokenizer([sample["question"], *candidates]).input_ids
    assert all(row[0] == 1 and row[-1] == 2 and 3 not in row for row in encoded)  # no [UNK]


def test_demo_video_qa_files_are_read_by_the_loaders(tmp_path):
    files = write_demo_video_qa(tmp_path, num_train_videos=3, num_test_videos=2, num_frames=6)

    loader = VideoLoader(4, IMAGE, mode="uniform")
    train = VQATrainDataset(files.train_file, files.media_root, loader, benchmark="msrvtt_qa")
    test = VQATestDataset(files.test_file, files.media_root, loader, benchmark="msrvtt_qa")

    assert (len(train), len(test)) == (6, 4)
    assert train[0]["pixel_values"].shape == (4, 3, IMAGE, IMAGE)
    assert test[0]["question"] == "what color is the moving shape?"
    assert all(len(item.answers) == 1 for item in test.items)


def test_encoder_and_decoder_move_together_under_one_set_of_factors(tiny_vqa, questions, clone):
    answer_ids, answer_mask, _ = _answers([1, 2, 1, 3])
    inputs = {
        **questions,
        "answer_ids": answer_ids,
        "answer_mask": answer_mask,
        "weights": torch.tensor([1.0, 0.5, 0.5, 1.0]),
        "answer_counts": torch.tensor([1, 2, 1]),
    }
    suffix = "encoder.layer.1.crossattention.self.query"
    encoder_name, decoder_name = f"text_encoder.{suffix}", f"text_decoder.bert.{suffix}"
    # init_weights=False: with V = 0 the gradient of P would be zero and the test vacuous.
    shared = get_peft_model(clone(tiny_vqa), peft_cp.AuroraConfig(rank=4, init_weights=False))
    store = shared.base_model.factor_store()
    rows = shared.base_model.row_plan().rows
    encoder = shared.base_model.model.get_submodule(encoder_name)
    decoder = shared.base_model.model.get_submodule(decoder_name)
    assert decoder.aurora_stores["default"] is encoder.aurora_stores["default"] is store
    assert rows[decoder_name] == rows[encoder_name]

    # Reference: the same factors with separate rows for the decoder, started equal to the
    # encoder's. The shared row's gradient must be the sum of both rows' gradients there.
    separate = get_peft_model(
        clone(tiny_vqa), peft_cp.AuroraConfig(rank=4, init_weights=False, row_sharing={})
    )
    reference = separate.base_model.factor_store()
    reference_rows = separate.base_model.row_plan().rows
    with torch.no_grad():
        for name, parameter in store.named_parameters():
            if name != "P":
                reference.get_parameter(name).copy_(parameter)
        for name, own in reference_rows.items():
            source = rows[name]  # a decoder module reads its encoder counterpart's rows
            reference.P[own] = store.P[source]
    answer_loss(separate, **inputs).backward()
    expected_grad = reference.P.grad[reference_rows[encoder_name]]
    expected_grad = expected_grad + reference.P.grad[reference_rows[decoder_name]]
    assert reference.P.grad[reference_rows[decoder_name]].abs().sum() > 0

    before = encoder.get_delta_weight("default").detach().clone()
    p_before = store.P.detach().clone()
    optimizer = torch.optim.SGD([p for p in shared.parameters() if p.requires_grad], lr=0.1)
    answer_loss(shared, **inputs).backward()
    torch.testing.assert_close(store.P.grad[rows[encoder_name]], expected_grad)
    optimizer.step()

    torch.testing.assert_close(
        store.P[rows[encoder_name]], p_before[rows[encoder_name]] - 0.1 * expected_grad
    )
    after_encoder = encoder.get_delta_weight("default")
    after_decoder = decoder.get_delta_weight("default")
    assert not torch.allclose(after_encoder, before)
    torch.testing.assert_close(after_decoder, after_encoder, rtol=0, atol=0)


def test_demo_videos_are_the_same_bytes_in_another_process(tmp_path):
    # Lossy H.264 rate control differed between processes on a few clips in 20; 60 catch it.
    here = write_demo_video_qa(tmp_path / "here", num_train_videos=56, num_test_videos=4)
    script = (
        "import sys; from peft_cp.blip.demo_vqa import write_demo_video_qa; "
        "write_demo_video_qa(sys.argv[1], num_train_videos=56, num_test_videos=4)"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "there")], check=True)

    there = tmp_path / "there" / "videos"
    names = sorted(path.name for path in here.media_root.iterdir())
    assert names == sorted(path.name for path in there.iterdir()) and len(names) == 60
    changed = [n for n in names if (here.media_root / n).read_bytes() != (there / n).read_bytes()]
    assert changed == []
