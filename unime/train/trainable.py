"""Decide what trains: a LoRA/DoRA adapter on the language model, or all weights with the vision tower frozen."""

from __future__ import annotations

from unime.backbone_module import checkpoint_contexts
from unime.train.config import ModelSettings


def make_trainable(embedder, settings: ModelSettings, *, multi_vector: bool = False) -> None:
    """Attach the adapter or unfreeze the right weights, in place (the registry names the parts).

    A multi-vector head trains in full, beside the adapter or the weights, when `multi_vector` (the loss scores its
    token vectors); otherwise it stays as it is (frozen: no loss reaches it, and DDP refuses unused parameters).
    """
    spec = embedder.spec
    if settings.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = settings.lora
        if callable(getattr(embedder.model, "get_base_model", None)):
            # A model loaded with its adapter keeps training that adapter.
            for name, parameter in embedder.model.named_parameters():
                parameter.requires_grad = "lora_" in name
        else:
            config = LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                use_dora=lora.use_dora,
                target_modules=lora.target_modules or spec.lora_target_modules,
            )
            embedder.model = get_peft_model(embedder.model, config)
    else:
        for parameter in embedder.model.parameters():
            parameter.requires_grad = True
        if settings.freeze_vision:
            for parameter in embedder.hf_model.get_submodule(spec.vision_tower).parameters():
                parameter.requires_grad = False
    if settings.gradient_checkpointing:
        embedder.hf_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_contexts}
        )
        # With a frozen embedding layer the checkpointed blocks would see inputs without grad and drop it.
        embedder.hf_model.enable_input_require_grads()
    head = getattr(embedder, "multi_vector_head", None)
    if head is not None:
        head.requires_grad_(multi_vector)
    if not any(p.requires_grad for p in embedder.model.parameters()):
        raise ValueError("nothing to train: no parameter requires a gradient")


def count_parameters(module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters())
