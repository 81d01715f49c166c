"""Adapt a small randomly initialised BLIP with Aurora, train a few steps, save and reload.

    python examples/quickstart.py

Runs offline in seconds. With a real checkpoint, replace the model line with
`BlipForImageTextRetrieval.from_pretrained("Salesforce/blip-itm-base-coco")`.
"""

import tempfile

import torch
from peft import PeftModel, get_peft_model
from transformers import BlipForImageTextRetrieval

import peft_cp
from peft_cp.blip.configs import small_blip_config


def main() -> None:
    torch.manual_seed(0)
    config = small_blip_config()
    base = BlipForImageTextRetrieval(config)

    model = get_peft_model(base, peft_cp.AuroraConfig(rank=8))
    model.print_trainable_parameters()

    pixels = torch.randn(4, 3, config.vision_config.image_size, config.vision_config.image_size)
    input_ids = torch.randint(3, config.text_config.vocab_size, (4, 8))
    matching = torch.tensor([1, 1, 0, 0])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    model.train()
    for step in range(20):
        logits = model(input_ids=input_ids, pixel_values=pixels).itm_score
        loss = torch.nn.functional.cross_entropy(logits, matching)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0 or step == 19:
            print(f"step {step:2d}  matching loss {loss.item():.4f}")

    model.eval()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        torch.manual_seed(0)
        reloaded = PeftModel.from_pretrained(BlipForImageTextRetrieval(config), folder).eval()
        with torch.no_grad():
            before = model(input_ids=input_ids, pixel_values=pixels).itm_score
            after = reloaded(input_ids=input_ids, pixel_values=pixels).itm_score
        difference = (before - after).abs().max().item()
        print(f"saved and reloaded the adapter: max output difference {difference:.1e}")


if __name__ == "__main__":
    main()
