"""A training checkpoint under FSDP: saved after one step, loaded into a fresh sharded model, the
next step equals that of the uninterrupted run.

    torchrun --nproc_per_node 2 fsdp_checkpoint.py OUT_DIR

Every BLIP layer is an FSDP unit and AdamW's moments are sharded with the factor store, so the
checkpoint gathers them whole and the resumed run scatters them back (`fit` does the same through
the same helpers under an Accelerate FSDP launch, which needs GPUs). A second fresh model loads
the adapter and the scheduler with a new optimizer instead: its second step must differ, or the
comparison would not show that the moments came back. OUT_DIR/report.json gets one report per rank.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from common import INPUTS, leave_process_group, seeded_model, shard
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from peft_cp.blip.training import (
    _load_checkpoint,
    _optimizer_state,
    _save_checkpoint,
    _writable_full_parameters,
)

OUT = Path(sys.argv[1])
ACCELERATOR = SimpleNamespace(distributed_type=DistributedType.FSDP)


class Prepared:
    """What Accelerate's `prepare` returns for an optimizer: the torch one behind `.optimizer`."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state)


def sharded_run():
    """A fresh sharded model, its AdamW (behind `Prepared`) and scheduler."""
    model = seeded_model()
    wrapped = shard(model)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, wrapped, Prepared(optimizer), scheduler


def step(wrapped, optimizer, scheduler):
    wrapped(**INPUTS).itm_score.square().sum().backward()
    optimizer.optimizer.step()
    optimizer.optimizer.zero_grad()
    scheduler.step()


def factors(model, wrapped) -> dict[str, torch.Tensor]:
    """The whole factor store, on every rank (collective)."""
    with FSDP.state_dict_type(
        wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)
    ):
        state = wrapped.state_dict()
    return get_peft_model_state_dict(model, state_dict=state)


def largest_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def compare() -> dict:
    model, wrapped, optimizer, scheduler = sharded_run()
    start = factors(model, wrapped)
    step(wrapped, optimizer, scheduler)
    adapter = factors(model, wrapped)
    optimizer_state = _optimizer_state(ACCELERATOR, wrapped, optimizer)
    if dist.get_rank() == 0:
        state = {"epoch": 0, "optimizer_layout": "fsdp-by-name"}
        _save_checkpoint(adapter, optimizer_state, scheduler, OUT, state)
    dist.barrier()
    step(wrapped, optimizer, scheduler)
    uninterrupted = factors(model, wrapped)

    model, wrapped, optimizer, scheduler = sharded_run()
    folder = OUT / "checkpoints" / "epoch_0"
    _load_checkpoint(ACCELERATOR, model, wrapped, optimizer, scheduler, folder)
    step(wrapped, optimizer, scheduler)
    resumed = factors(model, wrapped)

    model, wrapped, optimizer, scheduler = sharded_run()
    with _writable_full_parameters(wrapped):
        set_peft_model_state_dict(model, adapter)
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    for group in optimizer.optimizer.param_groups:  # the learning rate the resumed run has
        group["lr"] = scheduler.get_last_lr()[0]
    step(wrapped, optimizer, scheduler)
    restarted = factors(model, wrapped)

    return {
        "resumed_difference": largest_difference(resumed, uninterrupted),
        "restarted_difference": largest_difference(restarted, uninterrupted),
        "second_step_change": largest_difference(uninterrupted, adapter),
        "first_step_change": largest_difference(adapter, start),
    }


dist.init_process_group("gloo")
reports = [None] * dist.get_world_size()
dist.all_gather_object(reports, compare())
if dist.get_rank() == 0:
    (OUT / "report.json").write_text(json.dumps(reports))

leave_process_group()
