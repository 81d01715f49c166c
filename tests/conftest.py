import copy

import pytest
import torch
from transformers import BlipForImageTextRetrieval, BlipForQuestionAnswering

import peft_cp  # noqa: F401  (registers the Aurora method with PEFT)
from peft_cp.blip.configs import small_blip_config


@pytest.fixture
def tiny_config():
    return small_blip_config()


@pytest.fixture
def tiny_retrieval(tiny_config):
    torch.manual_seed(0)
    return BlipForImageTextRetrieval(tiny_config).eval()


@pytest.fixture
def tiny_vqa():
    # The answer decoder cross-attends to the text encoder's output through projections sized for
    # the image width, so BLIP question answering needs equal vision and text widths.
    torch.manual_seed(0)
    return BlipForQuestionAnswering(small_blip_config(vision_width=32)).eval()


@pytest.fixture
def retrieval_inputs(tiny_config):
    generator = torch.Generator().manual_seed(1)
    vocab = tiny_config.text_config.vocab_size
    image = tiny_config.vision_config.image_size
    return {
        "input_ids": torch.randint(3, vocab, (2, 7), generator=generator),
        "pixel_values": torch.randn(2, 3, image, image, generator=generator),
    }


@pytest.fixture
def clone():
    return copy.deepcopy
