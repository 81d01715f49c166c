"""Step-0 retrieval losses of a fixed global batch of 8, split over however many processes run.

    python step_zero_loss.py OUT.json
    accelerate launch --multi_gpu --num_processes 2 step_zero_loss.py OUT.json

Each process takes its share of the batch; the losses are averaged over processes, which equals
the single-process loss when negatives and contrastive candidates are gathered from all of them.
"""

import json
import sys

import torch
from accelerate import Accelerator
from common import leave_process_group
from peft import get_peft_model
from transformers import BlipForImageTextRetrieval

from peft_cp import AuroraConfig
from peft_cp.blip.configs import small_blip_config
from peft_cp.blip.retrieval import retrieval_losses
from peft_cp.blip.training import finish_run

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = BlipForImageTextRetrieval(small_blip_config(init_std=0.1)).eval()
model = get_peft_model(model, AuroraConfig(rank=4, init_weights=False))

generator = torch.Generator().manual_seed(1)
pixels = torch.randn(8, 3, 32, 32, generator=generator)
input_ids = torch.randint(3, 100, (8, 6), generator=generator)
ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])

chunk = 8 // accelerator.num_processes
share = slice(accelerator.process_index * chunk, (accelerator.process_index + 1) * chunk)
losses = retrieval_losses(
    model,
    pixels[share],
    input_ids[share],
    torch.ones_like(input_ids[share]),
    ids[share],
    negatives="hardest",
)
itc = accelerator.gather(losses.itc.detach()[None]).mean().item()
itm = accelerator.gather(losses.itm.detach()[None]).mean().item()
if accelerator.is_main_process:
    with open(sys.argv[1], "w") as f:
        json.dump({"itc": itc, "itm": itm, "world_size": accelerator.num_processes}, f)

leave_process_group(lambda: finish_run(accelerator))
