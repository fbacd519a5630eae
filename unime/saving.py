"""Write a model directory that every consumer reads the same way (DESIGN.md, contract 2).

Layout:
    config.json, model.safetensors    Hugging Face weights (LoRA merged), or adapter_* files beside a base
    processor / tokenizer files         with the embedding prompt template as the chat template
    unime_config.json                   kind, backbone, pooling, normalisation, prompts, matryoshka dims,
                                        the multi-vector head's settings when there is one
    multi_vector_head.safetensors       an embedder's multi-vector head, when it has one (`custom_text_proj.weight`,
                                        and `.bias` with `multi_vector.bias`)
    modules.json, sentence_bert_config.json, config_sentence_transformers.json, 1_Pooling/, 2_Normalize/
                                        an embedder: sentence-transformers' own Transformer -> Pooling ->
                                        Normalize, so that `SentenceTransformer(dir)` works without
                                        trust_remote_code; with a multi-vector head also a token-level
                                        Dense (the head's weight) and a token Normalize, so that
                                        `MultiVectorEncoder(dir)` gives unime's token vectors
    modules.json, ..., 1_LogitScore/    a reranker: Transformer (any-to-any) -> LogitScore(yes, no), so that
                                        `CrossEncoder(dir)` gives sigmoid(z_yes - z_no) = p(yes)
The directory is written beside its target and renamed into place, so a reader never sees half of it.

colpali-engine: for Qwen2-VL and Qwen2.5-VL, whose multi-vector models colpali-engine's ColQwen2 / ColQwen2_5 classes
load, the head's projection is also written into the backbone's weights file, as `custom_text_proj.weight` and
`custom_text_proj.bias` (zeros for a bias-free head). Those classes read only that file: they are the backbone's base
model plus the projection, map the saved `model.*` / `visual.*` keys onto themselves, and build `custom_text_proj`
with a bias. So `ColQwen2.from_pretrained(dir)` gets unime's token vectors without any other file or conversion.
This is the least invasive way found: one extra small tensor pair in one existing file, no renamed file, no second
copy of the backbone. The cost: transformers' load report, when the directory is read as a Qwen2-VL generator
(`unime.load`) or base model (sentence-transformers), names the two keys as unexpected and leaves them unused,
which is harmless; unime reads its head from `multi_vector_head.safetensors` as before. ColQwen2 fixes the
dimension at 128: a head of another `dim` fails to load there (transformers' size-mismatch error), not silently.
A head with `tokens="image"` is read by `ColQwen2.from_pretrained(dir, mask_non_image_embeddings=True)`.
An adapter-only directory (`merge_lora=False`) gets no such copy: colpali-engine expects its own adapter layout; nor
does a multi-task directory (`unime.multi_task`), whose weights vLLM's yes/no scorer also reads.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from unime.atomic import write_json_atomic
from unime.multi_vector import MultiVectorHead, projection_tensors, save_head

if TYPE_CHECKING:  # backbone_module imports this module to save itself: the type only, no circle at run time
    from unime.backbone_module import BackboneModule

# unime pooling name -> sentence-transformers Pooling mode
_ST_POOLING = {"last": "lasttoken", "mean": "mean", "cls": "cls"}
# The features key the multi-vector Dense writes: apart from `token_embeddings` until the Pooling has read those
_MULTI_VECTOR_KEY = "multi_vector_embeddings"
_ST_TOKEN_DENSE = "sentence_transformers.base.modules.Dense"
_ST_MULTI_VECTOR_MASK = "sentence_transformers.multi_vector_encoder.modules.multi_vector_mask.MultiVectorMask"
# Hugging Face model types whose multi-vector directories colpali-engine loads (its class for each): they get the
# projection in the backbone's weights file too (module docstring).
COLPALI_CLASSES = {"qwen2_vl": "ColQwen2", "qwen2_5_vl": "ColQwen2_5"}


def save_model_directory(
    module: BackboneModule, directory: str | os.PathLike, *, merge_lora: bool = True, colpali_copy: bool = True
) -> Path:
    """Write `module`'s directory (module docstring). `colpali_copy=False` leaves the ColQwen2 projection out of the
    backbone's weights file (a multi-task directory, whose weights vLLM's yes/no scorer also reads and which refuses
    tensors it does not know)."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.saving-"))
    try:
        config = copy.deepcopy(module.config)
        model = module.model
        is_peft = callable(getattr(model, "get_base_model", None))
        if is_peft and merge_lora:
            # Merge a copy: the live model keeps training with its adapter.
            model = copy.deepcopy(model).merge_and_unload()
        elif is_peft:
            config.base_model = model.peft_config["default"].base_model_name_or_path
        _declare_tied_embeddings(model.config)
        head = getattr(module, "multi_vector_head", None)  # an embedder's; a reranker has none
        state_dict = _colpali_state_dict(model, head if colpali_copy else None, adapter_only=is_peft and not merge_lora)
        model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        module.processor.save_pretrained(staging)
        config.multi_vector = head.config if head is not None else None
        if head is not None:
            save_head(head, staging)
        config.save(staging)
        if config.kind == "reranker":
            write_cross_encoder_files(staging, yes_token_id=module.yes_token_id, no_token_id=module.no_token_id)
        else:
            image_token_id = module.processor.tokenizer.convert_tokens_to_ids(module.spec.image_token)
            write_sentence_transformers_files(
                staging, config, module.hidden_size, multi_vector_head=head, image_token_id=image_token_id
            )
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _colpali_state_dict(model, head: MultiVectorHead | None, *, adapter_only: bool) -> dict[str, torch.Tensor] | None:
    """The backbone's weights plus the ColQwen2 projection, for a family colpali-engine loads; None (the model's
    own state dict) otherwise. The model's tensors are not copied."""
    if head is None or adapter_only or model.config.model_type not in COLPALI_CLASSES:
        return None
    return {**model.state_dict(), **projection_tensors(head, zero_bias=True)}


def _declare_tied_embeddings(config) -> None:
    """Write `tie_word_embeddings` into the text config too: vLLM's yes/no score head reads it from there, and
    some composite configs (Qwen2-VL's) keep it on the top level only."""
    text_config = config.get_text_config()
    if text_config is not config and not hasattr(text_config, "tie_word_embeddings"):
        text_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))


def write_sentence_transformers_files(
    directory: Path,
    config,
    embedding_dim: int,
    *,
    multi_vector_head: MultiVectorHead | None = None,
    image_token_id: int | None = None,
) -> None:
    """Describe the model to sentence-transformers (>= 5.4) with its own modules only.

    A single-vector embedder is Transformer -> Pooling -> Normalize. A model with a multi-vector head stays a
    `SentenceTransformer` directory, so that `SentenceTransformer(dir)` keeps giving the pooled vector, and gains
    two modules: before the Pooling a token-level Dense (the head's projection) that writes
    `multi_vector_embeddings`, and after it a Normalize that writes their unit vectors into `token_embeddings`.
    `MultiVectorEncoder(dir)` converts such a directory by dropping the Pooling and the sentence-level Normalize
    and keeping the rest; as a Dense is there, it adds no random projection of its own, and its encode returns the
    head's unit vector of every kept token. The Dense goes before the Pooling because `SentenceTransformer` takes
    its embedding dimension from the last module that knows one. The Dense has a bias when the head has one.
    """
    modules: list[tuple[str, str, dict]] = []  # (folder name, class reference, module config), after the Transformer
    if multi_vector_head is not None:
        dense = {
            "in_features": embedding_dim,
            "out_features": multi_vector_head.dim,
            "bias": multi_vector_head.config.bias,
            "activation_function": "torch.nn.modules.linear.Identity",
            "module_input_name": "token_embeddings",
            "module_output_name": _MULTI_VECTOR_KEY,
        }
        # The Dense is named by its package's export, which sentence-transformers imports as the same class: vLLM takes
        # every Dense it knows by its module path for a sentence-level projection of its pooled (and token) outputs,
        # and would apply this token-level one a second time after its late-interaction head.
        modules.append(("MultiVectorDense", _ST_TOKEN_DENSE, dense))
    pooling = {
        "embedding_dimension": embedding_dim,
        "pooling_mode": _ST_POOLING[config.pooling],
        "include_prompt": True,
    }
    modules.append(("Pooling", "sentence_transformers.sentence_transformer.modules.pooling.Pooling", pooling))
    if config.normalize:
        modules.append(("Normalize", "sentence_transformers.base.modules.normalize.Normalize", {}))
    if multi_vector_head is not None:
        to_tokens = {"module_input_name": _MULTI_VECTOR_KEY, "module_output_name": "token_embeddings"}
        modules.append(("MultiVectorNormalize", "sentence_transformers.base.modules.normalize.Normalize", to_tokens))
        if multi_vector_head.config.tokens == "image":
            # Documents keep only their image-patch tokens, as unime's `tokens="image"` keeps for an input with an
            # image. Queries are not restricted here, and a text-only document keeps no token (docs/inference.md).
            mask = {"skiplist_words": [], "skiplist_tasks": ["document"], "keep_only_token_ids": [image_token_id]}
            modules.append(("MultiVectorMask", _ST_MULTI_VECTOR_MASK, mask))
    entries = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"}
    ]
    for idx, (name, class_ref, module_config) in enumerate(modules, start=1):
        folder = directory / f"{idx}_{name}"
        entries.append({"idx": idx, "name": str(idx), "path": folder.name, "type": class_ref})
        write_json_atomic(folder / "config.json", module_config)
        if name == "MultiVectorDense":  # the Dense module's weight file: the head's tensors under its own names
            tensors = {
                key.replace("custom_text_proj.", "linear."): tensor
                for key, tensor in projection_tensors(multi_vector_head).items()
            }
            save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_json_atomic(directory / "modules.json", entries)
    # Every modality goes through the chat template ("message"), the same prompt path unime's encode takes.
    forward = {"method": "forward", "method_output_name": "last_hidden_state"}
    write_json_atomic(
        directory / "sentence_bert_config.json",
        {
            "transformer_task": "feature-extraction",
            "modality_config": {
                "text": forward,
                "image": forward,
                "message": {**forward, "format": "structured"},
            },
            "module_output_name": "token_embeddings",
        },
    )
    # sentence-transformers sends a prompt as a system message, which the template renders as the instruction.
    write_json_atomic(
        directory / "config_sentence_transformers.json",
        {
            "model_type": "SentenceTransformer",
            "prompts": {"query": config.prompts.query_instruction, "document": config.prompts.document_instruction},
            "default_prompt_name": None,
            "similarity_fn_name": config.similarity_fn_name,
        },
    )


def write_cross_encoder_files(directory: Path, *, yes_token_id: int, no_token_id: int) -> None:
    """Describe a reranker to sentence-transformers (>= 5.4) as a CrossEncoder of its own modules.

    The Transformer module runs the causal LM over the pair rendered by the processor's chat template (the
    reranker template, which reads `query` and `document` messages); LogitScore takes z_yes - z_no at the
    last position, and the Sigmoid activation turns it into p(yes), the score `Reranker.predict` gives.
    """
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_LogitScore",
            "type": "sentence_transformers.cross_encoder.modules.logit_score.LogitScore",
        },
    ]
    write_json_atomic(directory / "modules.json", modules)
    logits = {"method": "forward", "method_output_name": "logits"}
    write_json_atomic(
        directory / "sentence_bert_config.json",
        {
            "transformer_task": "any-to-any",
            "modality_config": {"text": logits, "image": logits, "message": {**logits, "format": "structured"}},
            "module_output_name": "causal_logits",
        },
    )
    write_json_atomic(
        directory / "1_LogitScore" / "config.json",
        {"true_token_id": yes_token_id, "false_token_id": no_token_id, "module_input_name": "causal_logits"},
    )
    write_json_atomic(
        directory / "config_sentence_transformers.json",
        {
            "model_type": "CrossEncoder",
            "activation_fn": "torch.nn.modules.activation.Sigmoid",
            "prompts": {},
            "default_prompt_name": None,
        },
    )


def _replace_directory(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    # Move the old directory aside first, so that at every moment one complete version exists.
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
