"""One training step of an Aurora-adapted BLIP under DeepSpeed ZeRO-2, compared with the same step
in a plain single process.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 deepspeed_step.py OUT.json

ZeRO-2 partitions the gradients and the optimizer state of the trainable parameters, here the
factor store that every adapted layer reads by reference: after the step each rank must hold the
factors of the plain step. OUT.json gets one report per rank.
"""

import copy
import json
import sys

import deepspeed
import torch
import torch.distributed as dist
from common import INPUTS, leave_process_group, seeded_model

CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 2},
    "zero_allow_untested_optimizer": True,
}


def sgd(module):
    return torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)


def compare() -> dict:
    """This rank's differences between the ZeRO-2 step and the plain one."""
    model = seeded_model()
    reference = copy.deepcopy(model)
    initial = {k: v.clone() for k, v in reference.base_model.factor_store().state_dict().items()}

    engine, *_ = deepspeed.initialize(model=model, optimizer=sgd(model), config=CONFIG)
    # Gradients are averaged over the 2 ranks, which see the same batch: the step equals the
    # plain one.
    engine_output = engine(**INPUTS).itm_score
    engine.backward(engine_output.square().sum())
    engine.step()

    optimizer = sgd(reference)
    reference_output = reference(**INPUTS).itm_score
    reference_output.square().sum().backward()
    optimizer.step()

    state = engine.module.base_model.factor_store().state_dict()
    expected = reference.base_model.factor_store().state_dict()
    engine.destroy()
    return {
        "output_difference": (engine_output - reference_output).abs().max().item(),
        "factor_difference": max((state[k] - v).abs().max().item() for k, v in expected.items()),
        "factor_change": max((expected[k] - v).abs().max().item() for k, v in initial.items()),
        "world_size": dist.get_world_size(),
    }


deepspeed.init_distributed(dist_backend="gloo")
reports = [None] * dist.get_world_size()
dist.all_gather_object(reports, compare())
if dist.get_rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(reports, f)

# The engine is gone with `compare`; DeepSpeed's destroy also drops the groups it keeps itself.
leave_process_group(deepspeed.comm.destroy_process_group)
