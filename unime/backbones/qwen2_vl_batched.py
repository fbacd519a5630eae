"""Qwen2-VL inputs computed for a whole batch at once: tokenized prompts, image patches and M-RoPE positions.

transformers' processor and model build these one image and one sequence at a time, in Python: the processor
resizes, normalises and patches each image on its own and scans each sequence for its modality types; the model
walks each sequence to lay out its 3D (time, height, width) rotary positions. For short inputs that per-item work,
not the forward pass, is most of a batch's time, so batching gained little (the server's micro-batching, large
encode calls). The functions here give the same tensors, equal to the last bit (tests compare them with the
processor's and the model's own), with a few tensor operations per batch:

- `batch_inputs`: what `processor(text=prompts, images=images, padding=True, return_tensors="pt")` returns. Images
  are resized one by one with the processor's own torchvision call (sizes differ), then patched in uint8 and
  normalised together. It applies to the processor configuration the checkpoints ship (torchvision backend,
  bicubic resize, rescale and normalise); for any other it returns None and the processor runs.
- `mrope_position_ids`: what the model's `get_rope_index` computes, for images (unime sends no video).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the resampling Qwen2-VL's image processor is configured with


def batch_inputs(
    processor: Any, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]], tokenizer_kwargs: dict[str, Any]
) -> dict[str, torch.Tensor] | None:
    """The processor's features for `prompts` (each with its images, in placeholder order); None: use the processor.

    `tokenizer_kwargs` are what the caller would pass the processor (padding, tensors, special tokens).
    """
    image_processor = processor.image_processor
    if not _standard_image_processor(image_processor):
        return None
    flat = [image for prompt_images in images for image in prompt_images]
    features: dict[str, torch.Tensor] = {}
    texts = list(prompts)
    if flat:
        pixel_values, grid_thw = _patches(image_processor, flat)  # [patches, C*T*P*P], [images, 3]
        features = {"pixel_values": pixel_values, "image_grid_thw": grid_thw}
        merged_tokens = iter((grid_thw.prod(-1) // image_processor.merge_size**2).tolist())
        texts = [
            _expand(prompt, processor.image_token, [next(merged_tokens) for _ in prompt_images])
            for prompt, prompt_images in zip(prompts, images, strict=True)
        ]
    # Padded lists, then tensors: the tokenizer's own conversion walks every nested list in Python first.
    encoded = processor.tokenizer(texts, **{**tokenizer_kwargs, "return_tensors": None})
    tokens = {key: torch.tensor(encoded[key], dtype=torch.long) for key in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in processor.model_input_names:
        tokens["mm_token_type_ids"] = _modality_types(processor, tokens["input_ids"])
    return {**tokens, **features}


def mrope_position_ids(model_config: Any, features: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """M-RoPE positions `[3, batch, seq]` (time, height, width), as the model's `get_rope_index` gives them.

    Text tokens count up by one on all three axes. An image's tokens (a `t x h x w` grid after merging) take
    `start + (i, j, k)` for their grid cell, and the text after it resumes at `start + max(h, w)`. Padding is 0.
    None for a batch without images: the model's own text positions are cheap already.
    """
    input_ids, attention_mask = features["input_ids"], features["attention_mask"].bool()  # [B, T]
    batch, length = input_ids.shape
    image = (input_ids == model_config.image_token_id) & attention_mask  # [B, T]
    grid = features.get("image_grid_thw")
    if grid is None:
        return None

    merge = model_config.vision_config.spatial_merge_size
    grid = grid.to(input_ids.device)
    grid_h, grid_w = grid[:, 1] // merge, grid[:, 2] // merge  # [images]
    previous = torch.nn.functional.pad(image, (1, 0))[:, :-1]
    following = torch.nn.functional.pad(image, (0, 1))[:, 1:]
    first, last = image & ~previous, image & ~following  # [B, T] first / last token of each image
    # Images are numbered in reading order over the batch, the order of `image_grid_thw`.
    image_index = (first.flatten().cumsum(0) - 1).view(batch, length).clamp(min=0)  # [B, T]
    # Each text token moves the position on by one; an image by its larger side, once it has ended.
    step = (attention_mask & ~image).long() + torch.where(last, torch.maximum(grid_h, grid_w)[image_index], 0)
    start = step.cumsum(-1) - step  # [B, T] position before the token: an image's tokens share their start
    # Offset of each image token inside its image, laid out time-major, then rows, then columns.
    token = torch.arange(length, device=input_ids.device).expand(batch, length)
    image_start = torch.cummax(token.masked_fill(~first, 0), dim=-1).values
    offset = token - image_start
    cell_h, cell_w = grid_h[image_index], grid_w[image_index]
    axes = (offset // (cell_h * cell_w), (offset // cell_w) % cell_h, offset % cell_w)
    positions = torch.stack([start + torch.where(image, axis, 0) for axis in axes])  # [3, B, T]
    return positions.masked_fill(~attention_mask, 0)


def _standard_image_processor(image_processor: Any) -> bool:
    return (
        getattr(image_processor, "backend", None) == "torchvision"
        and image_processor.do_resize
        and image_processor.do_rescale
        and image_processor.do_normalize
        and int(image_processor.resample) == BICUBIC
        and bool(image_processor.size.get("shortest_edge"))
        and bool(image_processor.size.get("longest_edge"))
    )


def _patches(image_processor: Any, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel patches `[patches, C*T*P*P]` and grids `[images, 3]` of RGB images, as the image processor makes them."""
    from torchvision.transforms.v2 import functional as tvF
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    patch, merge, temporal = image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size
    patches, grids = [], []
    for image in images:
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # [C, H, W]
        height, width = smart_resize(
            pixels.shape[1],
            pixels.shape[2],
            factor=patch * merge,
            min_pixels=image_processor.size["shortest_edge"],
            max_pixels=image_processor.size["longest_edge"],
        )
        pixels = tvF.resize(pixels, [height, width], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        rows, cols = height // patch, width // patch
        # [C, H, W] -> [rows/m, cols/m, m, m, C, P, P] -> [rows*cols, C, P, P]: the patches of a merge group stay
        # adjacent, as the model expects.
        pixels = pixels.reshape(3, rows // merge, merge, patch, cols // merge, merge, patch)
        patches.append(pixels.permute(1, 4, 2, 5, 0, 3, 6).reshape(rows * cols, 3, patch, patch))
        grids.append((1, rows, cols))
    # Rescaling and normalising, fused as the processor fuses them and to the same float32 roundings:
    # (x - mean * (1/r)) / (std * (1/r)), per channel; elementwise, so it may run after patching, once per batch.
    inverse_factor = 1.0 / image_processor.rescale_factor
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32) * inverse_factor
    std = torch.tensor(image_processor.image_std, dtype=torch.float32) * inverse_factor
    pixel_values = (torch.cat(patches).to(torch.float32) - mean[:, None, None]) / std[:, None, None]  # [N, C, P, P]
    # A still image fills every temporal slot of a patch: [N, C, P, P] -> [N, C, T, P, P] -> [N, C*T*P*P].
    pixel_values = pixel_values.unsqueeze(2).expand(-1, -1, temporal, -1, -1).reshape(len(pixel_values), -1)
    return pixel_values, torch.tensor(grids, dtype=torch.long)


def _expand(prompt: str, image_token: str, counts: list[int]) -> str:
    """Repeat each image placeholder as many times as its image has tokens, in order."""
    parts = prompt.split(image_token)
    if len(parts) != len(counts) + 1:
        raise ValueError(f"the prompt has {len(parts) - 1} image placeholders for {len(counts)} images")
    expanded = [parts[0]]
    for count, part in zip(counts, parts[1:], strict=True):
        expanded.append(image_token * count + part)
    return "".join(expanded)


def _modality_types(processor: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """0 text, 1 image, 2 video, 3 audio per token, as the processor's `create_mm_token_type_ids` marks them."""
    types = torch.zeros_like(input_ids)
    for value, name in ((1, "image_token_ids"), (2, "video_token_ids"), (3, "audio_token_ids")):
        token_ids = [token for token in getattr(processor, name, None) or [] if token is not None]
        if token_ids:
            types[torch.isin(input_ids, torch.tensor(token_ids, dtype=input_ids.dtype))] = value
    return types
