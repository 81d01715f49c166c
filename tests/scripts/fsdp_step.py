"""One training step of an Aurora-adapted BLIP under FSDP, compared with the same step unsharded.

    torchrun --nproc_per_node 2 fsdp_step.py OUT.json

Every BLIP layer is its own FSDP unit while the factor store sits in the root unit, so each
layer reads factors that FSDP gathers for the root: the outputs and the updated factors must
equal those of a plain single-process step. OUT.json gets one report per rank.
"""

import copy
import gc
import json
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers import BlipForImageTextRetrieval
from transformers.models.blip.modeling_blip import BlipEncoderLayer
from transformers.models.blip.modeling_blip_text import BlipTextLayer

from peft_cp import AuroraConfig
from peft_cp.blip.configs import small_blip_config
from peft_cp.blip.training import communication_threads

INPUTS = {
    "input_ids": torch.arange(3, 9)[None].repeat(2, 1),
    "pixel_values": torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32),
}


def step(module):
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
    output = module(**INPUTS).itm_score
    output.square().sum().backward()
    optimizer.step()
    return output.detach()


def compare() -> dict:
    """This rank's differences between the sharded step and the plain one."""
    torch.manual_seed(0)
    model = get_peft_model(
        BlipForImageTextRetrieval(small_blip_config()), AuroraConfig(rank=4, init_weights=False)
    )
    reference = copy.deepcopy(model)
    initial = {k: v.clone() for k, v in reference.base_model.factor_store().state_dict().items()}
    sharded = FSDP(
        model,
        use_orig_params=True,
        device_id=torch.device("cpu"),
        auto_wrap_policy=ModuleWrapPolicy({BlipEncoderLayer, BlipTextLayer}),
    )
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

# The FSDP units, gone with `compare`, were the last holders of the group: destroying it now stops
# its worker threads while Python can still serve them.
gc.collect()
dist.destroy_process_group()
if communication_threads():
    raise SystemExit(f"gloo threads outlive the process group: {communication_threads()}")
