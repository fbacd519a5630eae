"""The reranker: a multimodal LLM asked whether a document meets a query, scored by its yes/no logits.

Following "SFT or Contrastive Learning? Towards Better Multimodal LLM Reranking" (GMR), a (query, document)
pair is rendered as a judge prompt that ends where the model would answer; the logits of the `yes` and `no`
tokens at that position give the score p(yes) = softmax([z_no, z_yes])[yes] = sigmoid(z_yes - z_no).

`Reranker.predict` and `Reranker.rank` follow sentence-transformers' `CrossEncoder` (same argument names and
return shapes), so code written for one works with the other; the saved directory also loads as a
`CrossEncoder` and serves in vLLM as a scorer with the same scores.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from unime.backbone_module import BackboneModule
from unime.config import UnimeConfig
from unime.errors import InvalidInputError, ModelLoadError
from unime.inputs import Input, is_single_input, load_image, parse_input
from unime.pass_planning import shape_sorted_batches
from unime.pooling import pool
from unime.prompts import PromptRenderer, reranker_chat_template, set_chat_template

Pair = tuple[Input, Input]


class Reranker(BackboneModule):
    """A backbone, its processor and the unime config that says how a pair is prompted and scored.

    Get one with `unime.load(dir)` for a directory whose `unime_config.json` has kind `reranker` (or
    `unime.build_tiny(backbone, kind="reranker")` for a tiny offline one).
    """

    def __init__(self, model: nn.Module, processor: Any, config: UnimeConfig):
        super().__init__(model, processor, config)
        set_chat_template(processor, reranker_chat_template(self.spec.turn_format, config.rerank))
        self._renderer = PromptRenderer(processor)
        self.no_token_id = single_token_id(processor.tokenizer, config.rerank.no_token, "rerank.no_token")
        self.yes_token_id = single_token_id(processor.tokenizer, config.rerank.yes_token, "rerank.yes_token")

    def set_rerank_prompt(self, **changes: str) -> None:
        """Change the judge prompt or the default instruction (fields of `RerankConfig`); the template follows."""
        unknown = set(changes) - {"system_prompt", "default_instruction"}
        if unknown:
            raise ValueError(f"set_rerank_prompt changes system_prompt and default_instruction, not {sorted(unknown)}")
        self.config.rerank = dataclasses.replace(self.config.rerank, **changes)
        set_chat_template(self.processor, reranker_chat_template(self.spec.turn_format, self.config.rerank))

    # ----------------------------------------------------------------------------------------------------
    # Tensors in, tensors out (what training uses)
    # ----------------------------------------------------------------------------------------------------
    def tokenize(
        self,
        pairs: Sequence[Pair],
        instruction: str | Sequence[str | None] | None = None,
        indices: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Backbone inputs for a batch of pairs: render each judge prompt, decode images, tokenize, pad.

        `instruction` is one for all pairs or one per pair (None: the configured default). `indices` are the
        pairs' positions in the caller's list, used to name a failing input.
        """
        indices = list(indices) if indices is not None else list(range(len(pairs)))
        instructions = (
            [instruction] * len(pairs) if instruction is None or isinstance(instruction, str) else instruction
        )
        prompts = [
            self._renderer.render_pair(query, document, pair_instruction)
            for (query, document), pair_instruction in zip(pairs, instructions, strict=True)
        ]
        # The template places the query's images before the document's: the processor fills placeholders in order.
        images = [
            [load_image(index, side.image) for side in pair if side.image is not None]
            for index, pair in zip(indices, pairs, strict=True)
        ]
        return self.processor_features(prompts, images)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The answer logits `[batch, 2]` = (z_no, z_yes) at the last prompt position of each pair.

        Only the two rows of the LM head that matter are applied, to the last hidden state only: the same
        numbers as the full logits at that position, without a `[batch, seq, vocab]` tensor.
        """
        hidden = self.last_hidden_state(features)  # [B, T, H]
        last = pool(hidden, features["attention_mask"].to(hidden.device), "last")  # [B, H]
        head = self.hf_model.get_output_embeddings()
        token_ids = torch.tensor([self.no_token_id, self.yes_token_id], device=last.device)
        logits = last @ head.weight[token_ids].T  # [B, 2]
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[token_ids]
        return logits

    # ----------------------------------------------------------------------------------------------------
    # The CrossEncoder-compatible API
    # ----------------------------------------------------------------------------------------------------
    def predict(
        self,
        pairs: Any,
        *,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        instruction: str | None = None,
        apply_softmax: bool = True,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
    ) -> np.ndarray | torch.Tensor | float:
        """Score (query, document) pairs; a query or document is a text, an image, or a `{"text", "image"}` dict.

        Args:
            pairs: a list of `(query, document)` pairs, or one pair (then one score comes back).
            batch_size: pairs per forward pass. Scores do not depend on it.
            show_progress_bar: default: on for more than one batch when stderr is a terminal.
            instruction: what relevance means for this call (default: the configured instruction).
            apply_softmax: True gives p(yes) in [0, 1]; False gives the log-odds z_yes - z_no (whose sigmoid
                is p(yes); what sentence-transformers' LogitScore outputs before its activation).
            convert_to_numpy / convert_to_tensor: a numpy array (default) or a torch tensor.

        Returns:
            `[len(pairs)]` scores in input order (float32).
        """
        single = _is_single_pair(pairs)
        parsed = parse_pairs([pairs] if single else pairs)
        logits = self._pair_logits(parsed, instruction, batch_size, show_progress_bar)  # [N, 2]
        scores = yes_probability(logits) if apply_softmax else logits[:, 1] - logits[:, 0]  # [N]
        if single:
            return float(scores[0])
        if convert_to_tensor:
            return scores
        return scores.numpy() if convert_to_numpy else list(scores)

    def rank(
        self,
        query: Any,
        documents: Sequence[Any],
        *,
        top_k: int | None = None,
        return_documents: bool = False,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        instruction: str | None = None,
    ) -> list[dict[str, Any]]:
        """Order `documents` by relevance to `query`: `[{"corpus_id", "score", "text"?}]`, best first.

        As sentence-transformers' `CrossEncoder.rank`: `top_k` keeps the best k; `return_documents` adds each
        document under `"text"`.
        """
        if isinstance(documents, (str, dict)) or not isinstance(documents, Sequence):
            raise InvalidInputError(None, f"documents: expected a list, got {type(documents).__name__}")
        scores = self.predict(
            [(query, document) for document in documents],
            batch_size=batch_size,
            show_progress_bar=show_progress_bar,
            instruction=instruction,
        )
        order = np.argsort(-np.asarray(scores), kind="stable")[:top_k]
        results = []
        for index in order:
            result: dict[str, Any] = {"corpus_id": int(index), "score": float(scores[index])}
            if return_documents:
                result["text"] = documents[index]
            results.append(result)
        return results

    def _pair_logits(
        self, pairs: list[Pair], instruction: str | None, batch_size: int, show_progress_bar: bool | None
    ) -> torch.Tensor:
        # Pairs of the same modality and similar size share a batch (little padding, no empty pixel tensors).
        batches = shape_sorted_batches(
            pairs,
            batch_size,
            lambda pair: (
                pair[0].has_image or pair[1].has_image,
                pair[0].image_pixels + pair[1].image_pixels,
                len(pair[0].text or "") + len(pair[1].text or ""),
            ),
        )
        if show_progress_bar is None:
            show_progress_bar = len(batches) > 1 and sys.stderr.isatty()
        logits = torch.empty(len(pairs), 2, dtype=torch.float32)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for batch in tqdm(batches, desc="rerank", disable=not show_progress_bar):
                    features = self.tokenize([pairs[i] for i in batch], instruction, indices=batch)
                    logits[batch] = self(features).float().cpu()
        finally:
            self.train(was_training)
        return logits


def yes_probability(logits: torch.Tensor) -> torch.Tensor:
    """p(yes) = softmax([z_no, z_yes])[yes] of answer logits `[..., 2]`."""
    return torch.softmax(logits.float(), dim=-1)[..., 1]


def single_token_id(tokenizer: Any, token: str, field: str) -> int:
    """The id of a token that must be one vocabulary entry (the score is read from its logit)."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ModelLoadError(
            f"{field}: {token!r} is {len(ids)} tokens for this tokenizer, but the reranker reads one token's logit; "
            "choose a word that is a single token (e.g. 'yes'/'no' for Qwen2-VL) or add it to the tokenizer"
        )
    return ids[0]


def parse_pairs(pairs: Any) -> list[Pair]:
    """Validate every (query, document) pair up front; errors name the pair's index and the side."""
    if isinstance(pairs, (str, bytes, dict)) or not isinstance(pairs, Sequence):
        raise InvalidInputError(None, f"expected a list of (query, document) pairs, got {type(pairs).__name__}")
    parsed = []
    for index, pair in enumerate(pairs):
        if isinstance(pair, (str, dict)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise InvalidInputError(index, f"expected a (query, document) pair, got {type(pair).__name__}")
        sides = []
        for name, item in zip(("query", "document"), pair, strict=True):
            try:
                sides.append(parse_input(index, item))
            except InvalidInputError as err:
                raise InvalidInputError(index, f"{name}: {str(err).split(': ', 1)[-1]}") from err
        parsed.append((sides[0], sides[1]))
    return parsed


def _is_single_pair(pairs: Any) -> bool:
    """One pair (not in a list) gives one score, as in sentence-transformers."""
    return isinstance(pairs, (tuple, list)) and len(pairs) == 2 and all(is_single_input(side) for side in pairs)


def add_answer_tokens(model, processor, tokens: tuple[str, ...], seed: int) -> None:
    """Make the reranker's answer words single tokens of a tiny tokenizer (real ones have them already).

    The tiny BPE vocabulary splits "yes" and "no"; they are added as whole words (so "know" or "nothing" still
    tokenize as before) and the embedding and LM-head rows grow to match, seeded like the rest of the model.
    """
    from tokenizers import AddedToken

    tokenizer = processor.tokenizer
    missing = [token for token in tokens if len(tokenizer.encode(token, add_special_tokens=False)) != 1]
    if not missing:
        return
    tokenizer.add_tokens([AddedToken(token, single_word=True, normalized=False) for token in missing])
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the new rows are initialised like the model's: same seed, same rows
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
