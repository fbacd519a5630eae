"""Write a model directory that every consumer reads the same way (DESIGN.md, contract 2).

Layout:
    config.json, model.safetensors    Hugging Face weights (LoRA merged), or adapter_* files beside a base
    processor / tokenizer files         with the embedding prompt template as the chat template
    unime_config.json                   kind, backbone, pooling, normalisation, prompts, matryoshka dims,
                                        the multi-vector head's settings when there is one
    multi_vector_head.safetensors       an embedder's multi-vector head, when it has one (`custom_text_proj.weight`)
    modules.json, sentence_bert_config.json, config_sentence_transformers.json, 1_Pooling/, 2_Normalize/
                                        an embedder: sentence-transformers' own Transformer -> Pooling ->
                                        Normalize, so that `SentenceTransformer(dir)` works without
                                        trust_remote_code
    modules.json, ..., 1_LogitScore/    a reranker: Transformer (any-to-any) -> LogitScore(yes, no), so that
                                        `CrossEncoder(dir)` gives sigmoid(z_yes - z_no) = p(yes)
The directory is written beside its target and renamed into place, so a reader never sees half of it.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from unime.atomic import write_json_atomic
from unime.multi_vector import save_head

if TYPE_CHECKING:  # backbone_module imports this module to save itself: the type only, no circle at run time
    from unime.backbone_module import BackboneModule

# unime pooling name -> sentence-transformers Pooling mode
_ST_POOLING = {"last": "lasttoken", "mean": "mean", "cls": "cls"}


def save_model_directory(module: BackboneModule, directory: str | os.PathLike, *, merge_lora: bool = True) -> Path:
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
        model.save_pretrained(staging, safe_serialization=True)
        module.processor.save_pretrained(staging)
        head = getattr(module, "multi_vector_head", None)  # an embedder's; a reranker has none
        config.multi_vector = head.config if head is not None else None
        if head is not None:
            save_head(head, staging)
        config.save(staging)
        if config.kind == "reranker":
            write_cross_encoder_files(staging, yes_token_id=module.yes_token_id, no_token_id=module.no_token_id)
        else:
            write_sentence_transformers_files(staging, config, module.hidden_size)
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _declare_tied_embeddings(config) -> None:
    """Write `tie_word_embeddings` into the text config too: vLLM's yes/no score head reads it from there, and
    some composite configs (Qwen2-VL's) keep it on the top level only."""
    text_config = config.get_text_config()
    if text_config is not config and not hasattr(text_config, "tie_word_embeddings"):
        text_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))


def write_sentence_transformers_files(directory: Path, config, embedding_dim: int) -> None:
    """Describe the model to sentence-transformers (>= 5.4) with its own modules only."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
        },
    ]
    if config.normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.base.modules.normalize.Normalize",
            }
        )
        write_json_atomic(directory / "2_Normalize" / "config.json", {})
    write_json_atomic(directory / "modules.json", modules)
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
    write_json_atomic(
        directory / "1_Pooling" / "config.json",
        {
            "embedding_dimension": embedding_dim,
            "pooling_mode": _ST_POOLING[config.pooling],
            "include_prompt": True,
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
