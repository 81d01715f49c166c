"""One training step of an Aurora-adapted BLIP under FSDP, compared with the same step unsharded.

    torchrun --nproc_per_node 2 fsdp_step.py OUT.json

Every BLIP layer is its own FSDP unit while the factor store sits in the root unit, so each
layer reads factors that FSDP gathers for the root: the outputs and the updated factors must
equal those of a plain single-process step. OUT.json gets one report per rank.
"""

import copy
import json
import sys

import torch
import torch.distributed as dist
from common import INPUTS, leave_process_group, seeded_model, shard
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


def step(module):
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
    output = module(**INPUTS).itm_score
    output.square().sum().backward()
    optimizer.step()
    return output.detach()


def compare() -> dict:
    """This rank's differences between the sharded step and the plain one."""
    model = seeded_model()
    reference = copy.deepcopy(model)
    initial = {k: v.clone() for k, v in reference.base_model.factor_store().state_dict().items()}
    sharded = shard(model)
    # Gradients are averaged over the 2 ranks, which see the same batch: the step equals the
    # plain one.
    sharded_output, reference_output = step(sharded), step(reference)

    with FSDP.state_dict_type(
        sharded, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)
    ):
        state = sharded.state_dict()
    expected = reference.base_model.factor_store().state_dict()
    largest = max(
        (state[f"base_model.aurora_store.default.{name}"] - value).abs().max().item()
        for name, value in expected.items()
    )
    moved = max((expected[name] - value).abs().max().item() for name, value in initial.items())
    return {
        "output_difference": (sharded_output - reference_output).abs().max().item(),
        "factor_difference": largest,
        "factor_change": moved,
        "world_size": dist.get_world_size(),
    }


dist.init_process_group("gloo")
reports = [None] * dist.get_world_size()
dist.all_gather_object(reports, compare())
if dist.get_rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(reports, f)

leave_process_group()  # the FSDP units, its last holders, are gone with `compare`
