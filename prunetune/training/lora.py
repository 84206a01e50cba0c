"""LoRA adapters on a student's linear layers, through `peft`, merged back before export.

The adapters are injected into the student in place (its own modules gain them), so the
loss and the checkpoint see the student as it is, and only the adapters train. Merging
folds each adapter into its linear layer's weight and removes it, which leaves the plain
Hugging Face model that `save_pruned` and the evaluators take.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def add_lora(model: nn.Module, rank: int, alpha: float) -> Any:
    """Add LoRA adapters of `rank` (scale `alpha / rank`) to every linear layer of `model`
    but its LM head, freeze everything else; returns the `peft` model that merges them."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, config)


def merge_lora(peft_model: Any) -> nn.Module:
    """Fold the adapters into their layers; returns the plain model, every parameter
    trainable again."""
    model = peft_model.merge_and_unload()
    model.requires_grad_(True)
    return model
