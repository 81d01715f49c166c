"""What the multi-process test scripts share: their model, their batch, and how they end."""

import gc

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
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


def seeded_model() -> PeftModel:
    """The same Aurora-adapted small BLIP (random factors) on every process and every call."""
    torch.manual_seed(0)
    return get_peft_model(
        BlipForImageTextRetrieval(small_blip_config()), AuroraConfig(rank=4, init_weights=False)
    )


def shard(model: PeftModel) -> FSDP:
    """Every BLIP layer its own FSDP unit; the factor store stays in the root unit."""
    return FSDP(
        model,
        use_orig_params=True,
        device_id=torch.device("cpu"),
        auto_wrap_policy=ModuleWrapPolicy({BlipEncoderLayer, BlipTextLayer}),
    )


def leave_process_group(destroy=dist.destroy_process_group) -> None:
    """Destroys the group once the wrapped models are gone, and checks that its threads stopped.

    A gloo worker still running at exit can abort the process while Python shuts down.
    """
    gc.collect()
    destroy()
    if communication_threads():
        raise SystemExit(f"gloo threads outlive the process group: {communication_threads()}")
