"""Two optimizer steps of `fit` on a fixed dataset, with a global batch of 4 split over processes.

    python fit_steps.py OUT_DIR
    accelerate launch --multi_gpu --num_processes 2 fit_steps.py OUT_DIR

With gradients synchronised across processes, both runs end with the same adapter.
"""

import sys

import torch
from accelerate import Accelerator
from common import leave_process_group
from peft import get_peft_model
from transformers import BlipForImageTextRetrieval

from peft_cp import AuroraConfig
from peft_cp.blip.configs import small_blip_config
from peft_cp.blip.retrieval import retrieval_losses
from peft_cp.blip.training import TrainingArguments, finish_run, fit

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = get_peft_model(
    BlipForImageTextRetrieval(small_blip_config(init_std=0.1)),
    AuroraConfig(rank=4, init_weights=False),
)

generator = torch.Generator().manual_seed(1)
dataset = [
    {
        "pixel_values": torch.randn(3, 32, 32, generator=generator),
        "input_ids": torch.randint(3, 100, (6,), generator=generator),
        "media_ids": torch.tensor(index // 2),
    }
    for index in range(8)
]


def collate(samples):
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def loss_fn(model, batch):
    mask = torch.ones_like(batch["input_ids"])
    return retrieval_losses(
        model,
        batch["pixel_values"],
        batch["input_ids"],
        mask,
        batch["media_ids"],
        negatives="hardest",
    ).total


args = TrainingArguments(
    sys.argv[1],
    epochs=1,
    batch_size=4 // accelerator.num_processes,
    learning_rate=1e-2,
    max_steps=2,
)
fit(model, dataset, collate, loss_fn, args, accelerator)

leave_process_group(lambda: finish_run(accelerator))
