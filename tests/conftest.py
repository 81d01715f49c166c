import copy
import socket
import sys

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


def free_port() -> int:
    """A loopback port nothing listens on now, so that back-to-back launches never share one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def launch_two_processes():
    """The command that starts a script in 2 processes through Accelerate.

    On a machine without GPUs, --multi_gpu starts torchrun processes that talk over gloo
    (Accelerate's --cpu flag starts one process unless MPI is set up).
    """
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    return [*launch, "--num_processes", "2", "--main_process_port", str(free_port())]


@pytest.fixture
def torchrun_two_processes():
    """The command that starts a script in 2 torchrun processes on a free port."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return [*launch, "--master_port", str(free_port())]
