"""What the embedder and the reranker share: a backbone, its processor, its unime config, and saving."""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from unime.backbones import get_backbone
from unime.config import UnimeConfig
from unime.saving import save_model_directory

# Every SDPA kernel except cuDNN's. Torch tries cuDNN first for masked attention on Hopper and newer GPUs, and
# cuDNN builds an execution plan for each new (batch, length) shape, hundreds of milliseconds each time. Batches
# here change shape with every call (a server's merged requests, a training step's longest sequence), so that
# plan is rebuilt nearly every pass. Flash and memory-efficient attention have no such per-shape cost.
ATTENTION_BACKENDS = [
    backend for name, backend in SDPBackend.__members__.items() if name not in ("CUDNN_ATTENTION", "ERROR")
]


def attention_kernels():
    """A context in which scaled-dot-product attention picks among `ATTENTION_BACKENDS` (no cuDNN)."""
    return sdpa_kernel(ATTENTION_BACKENDS)


def checkpoint_contexts():
    """Gradient checkpointing's `context_fn`: the recomputation in backward runs outside `last_hidden_state`'s
    context, so it gets the same kernels explicitly (forward context, recomputation context)."""
    return attention_kernels(), attention_kernels()


class BackboneModule(nn.Module):
    """A registered backbone (transformers model, possibly with a peft adapter), its processor and config."""

    def __init__(self, model: nn.Module, processor: Any, config: UnimeConfig):
        super().__init__()
        self.model = model
        self.processor = processor
        self.config = config
        self.spec = get_backbone(config.backbone)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hf_model(self) -> nn.Module:
        """The transformers model, unwrapped from peft when an adapter is attached."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    @property
    def hidden_size(self) -> int:
        return self.hf_model.config.get_text_config().hidden_size

    def processor_features(self, prompts: list[str], images: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
        """Rendered prompts (each with its decoded images, in placeholder order) tokenized and padded, with pixels.

        What `processor(text=prompts, images=images)` gives: computed batch-wide where the backbone knows how
        (`BackboneSpec.batch_inputs`), by the processor otherwise.
        """
        kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt"}
        bos = self.processor.tokenizer.bos_token
        if bos is not None and prompts and prompts[0].startswith(bos):
            kwargs["add_special_tokens"] = False  # the template wrote the BOS already (as apply_chat_template does)
        if self.spec.batch_inputs is not None:
            features = self.spec.batch_inputs(self.processor, prompts, images, kwargs)
            if features is not None:
                return features
        return dict(self.processor(text=prompts, images=images if any(images) else None, **kwargs))

    def last_hidden_state(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder's last hidden states `[batch, seq, hidden]`, without computing the LM head over them."""
        features = {key: value.to(self.device) for key, value in features.items()}
        if self.spec.position_ids is not None and "position_ids" not in features:
            positions = self.spec.position_ids(self.hf_model.config, features)
            if positions is not None:
                features["position_ids"] = positions
        base = getattr(self.hf_model, self.spec.base_model)
        with attention_kernels():
            return base(**features).last_hidden_state

    def save(self, directory: str | os.PathLike, *, merge_lora: bool = True) -> None:
        """Write the model directory: weights, processor, `unime_config.json`, sentence-transformers files.

        With a LoRA adapter attached, `merge_lora=True` writes merged full weights (the live model keeps its
        adapter); `merge_lora=False` writes the adapter alone, loadable beside its base.
        """
        save_model_directory(self, directory, merge_lora=merge_lora)
