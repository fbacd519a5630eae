"""From inputs to prompts: the embedding chat template and the messages it renders.

One Jinja template, saved with the processor of every model directory, decides the prompt of every input.
unime's own `encode`, sentence-transformers' `Transformer` module and (later) vLLM all render inputs through
it, so they tokenize the same input into the same ids. Messages follow the chat convention that
sentence-transformers uses: an optional `system` message carries the instruction, a `user` message carries
the input as content parts (`{"type": "image", "image": ...}`, `{"type": "text", "text": ...}`).
"""

from __future__ import annotations

import json
from typing import Any

from unime.backbones.spec import TurnFormat
from unime.config import PromptConfig, RerankConfig
from unime.inputs import Input

# The template gathers the instruction (system messages) and the user's images and texts, in any order,
# then renders one user turn: instruction, images, text, and the summary line that fits the modality. It
# always ends with the assistant prompt, so the last token is the same whether or not the caller asks for
# a generation prompt.
_TEMPLATE = """\
{%- set ns = namespace(instruction='', text='', images=0) -%}
{%- for message in messages -%}
{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}
{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}
{%- for part in parts -%}
{%- if message['role'] == 'system' -%}
{%- if part['type'] == 'text' -%}{%- set ns.instruction = ns.instruction + part['text'] -%}{%- endif -%}
{%- elif part['type'] == 'image' -%}{%- set ns.images = ns.images + 1 -%}
{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}
{%- endif -%}
{%- endfor -%}
{%- endfor -%}
{{- BOS + USER_START -}}
{%- if ns.instruction -%}{{- ns.instruction + '\\n' -}}{%- endif -%}
{%- for _ in range(ns.images) -%}{{- IMAGE -}}{%- endfor -%}
{%- if ns.text -%}{{- ns.text + '\\n' -}}{%- endif -%}
{%- if ns.images and ns.text -%}{{- IMAGE_TEXT_SUMMARY -}}
{%- elif ns.images -%}{{- IMAGE_SUMMARY -}}
{%- else -%}{{- TEXT_SUMMARY -}}{%- endif -%}
{{- USER_END + ASSISTANT_START -}}
"""


# The reranker's template renders one (query, document) pair as the reranking paper's judge prompt. It reads
# the pair from messages with roles `query` and `document` (how sentence-transformers' CrossEncoder and vLLM's
# score templates pass a pair), content as a string or as parts; image parts of any type (`image`,
# `image_url`, `image_pil`) become the family's image placeholder. The instruction comes from a `system`
# message (sentence-transformers' prompt), or the `instruction` variable (vLLM's score API), or the default.
_RERANK_TEMPLATE = """\
{%- set ns = namespace(instruction='', query='', document='', query_images=0, document_images=0) -%}
{%- for message in messages -%}
{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}
{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}
{%- for part in parts -%}
{%- set is_image = part['type'] in ('image', 'image_url', 'image_pil') -%}
{%- if message['role'] == 'system' -%}
{%- if part['type'] == 'text' -%}{%- set ns.instruction = ns.instruction + part['text'] -%}{%- endif -%}
{%- elif message['role'] == 'query' -%}
{%- if is_image -%}{%- set ns.query_images = ns.query_images + 1 -%}
{%- elif part['type'] == 'text' -%}{%- set ns.query = ns.query + part['text'] -%}{%- endif -%}
{%- elif message['role'] == 'document' -%}
{%- if is_image -%}{%- set ns.document_images = ns.document_images + 1 -%}
{%- elif part['type'] == 'text' -%}{%- set ns.document = ns.document + part['text'] -%}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- endfor -%}
{%- if not ns.instruction -%}
{%- set ns.instruction = instruction if instruction is defined and instruction else DEFAULT_INSTRUCTION -%}
{%- endif -%}
{{- BOS + USER_START + SYSTEM_PROMPT + '\\n<Instruct>: ' + ns.instruction + '\\n<Query>:' -}}
{%- for _ in range(ns.query_images) -%}{{- IMAGE -}}{%- endfor -%}
{{- ns.query + '\\n<Document>:' -}}
{%- for _ in range(ns.document_images) -%}{{- IMAGE -}}{%- endfor -%}
{{- ns.document + USER_END + ASSISTANT_START -}}
"""


def _template_header(constants: dict[str, str]) -> str:
    # JSON string literals are valid Jinja string literals, escapes included.
    return "".join(f"{{%- set {name} = {json.dumps(value)} -%}}\n" for name, value in constants.items())


def reranker_chat_template(turn: TurnFormat, rerank: RerankConfig) -> str:
    """The Jinja chat template that renders a (query, document) pair as a yes/no judge prompt."""
    constants = {
        "BOS": turn.bos,
        "USER_START": turn.user_start,
        "USER_END": turn.user_end,
        "ASSISTANT_START": turn.assistant_start,
        "IMAGE": turn.image_placeholder,
        "SYSTEM_PROMPT": rerank.system_prompt,
        "DEFAULT_INSTRUCTION": rerank.default_instruction,
    }
    return _template_header(constants) + _RERANK_TEMPLATE


def embedding_chat_template(turn: TurnFormat, prompts: PromptConfig) -> str:
    """The Jinja chat template that renders an embedding input for a backbone family."""
    constants = {
        "BOS": turn.bos,
        "USER_START": turn.user_start,
        "USER_END": turn.user_end,
        "ASSISTANT_START": turn.assistant_start,
        "IMAGE": turn.image_placeholder,
        "IMAGE_SUMMARY": prompts.image_summary,
        "TEXT_SUMMARY": prompts.text_summary,
        "IMAGE_TEXT_SUMMARY": prompts.image_text_summary,
    }
    return _template_header(constants) + _TEMPLATE


def set_chat_template(processor: Any, template: str) -> None:
    """Give a processor (and its tokenizer) a chat template; it is saved with the processor."""
    processor.chat_template = template
    processor.tokenizer.chat_template = template


def apply_embedding_template(processor: Any, turn: TurnFormat, prompts: PromptConfig) -> None:
    """Give a processor (and its tokenizer) the embedding template."""
    set_chat_template(processor, embedding_chat_template(turn, prompts))


def content_parts(item: Input, image: Any | None) -> list[dict[str, Any]]:
    """An input as chat content parts, image first; `image` is its decoded image (None to render text only)."""
    content: list[dict[str, Any]] = []
    if item.has_image:
        content.append({"type": "image", "image": image})
    if item.text is not None:
        content.append({"type": "text", "text": item.text})
    return content


def _with_instruction(instruction: str | None, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not instruction:
        return messages
    return [{"role": "system", "content": [{"type": "text", "text": instruction}]}, *messages]


def to_messages(item: Input, image: Any | None, instruction: str | None) -> list[dict[str, Any]]:
    """The chat messages of one embedding input."""
    return _with_instruction(instruction, [{"role": "user", "content": content_parts(item, image)}])


def pair_messages(
    query: Input, document: Input, images: tuple[Any, Any], instruction: str | None
) -> list[dict[str, Any]]:
    """The chat messages of one (query, document) pair for the reranker template (roles `query`, `document`)."""
    return _with_instruction(
        instruction,
        [
            {"role": "query", "content": content_parts(query, images[0])},
            {"role": "document", "content": content_parts(document, images[1])},
        ],
    )


class PromptRenderer:
    """Renders inputs (or reranking pairs) through a processor's chat template, once per prompt shape.

    The templates insert texts verbatim, so a prompt is rendered once for each shape (instruction, which
    sides have an image, which have text) with sentinels in place of the texts, and the sentinels are
    replaced afterwards: the same string as a full render, without running Jinja for every input.
    """

    _SENTINELS = ("\ue000unime-text-0\ue000", "\ue000unime-text-1\ue000")

    def __init__(self, processor: Any):
        self.processor = processor
        self._template: str | None = None
        self._skeletons: dict[tuple, str] = {}

    def render(self, item: Input, instruction: str | None) -> str:
        """The embedding prompt of one input."""

        def messages(texts: list[str | None]) -> list[dict[str, Any]]:
            return to_messages(Input(text=texts[0], image=item.image), None, instruction)

        return self._render(("item", instruction, item.has_image), [item.text], messages)

    def render_pair(self, query: Input, document: Input, instruction: str | None) -> str:
        """The reranking prompt of one (query, document) pair."""

        def messages(texts: list[str | None]) -> list[dict[str, Any]]:
            shapes = (Input(text=texts[0], image=query.image), Input(text=texts[1], image=document.image))
            return pair_messages(*shapes, (None, None), instruction)

        key = ("pair", instruction, query.has_image, document.has_image)
        return self._render(key, [query.text, document.text], messages)

    def _render(self, shape: tuple, texts: list[str | None], build_messages) -> str:
        if self._template != self.processor.chat_template:  # the template changed: forget old renderings
            self._template, self._skeletons = self.processor.chat_template, {}
        key = (*shape, *(text is not None for text in texts))
        skeleton = self._skeletons.get(key)
        if skeleton is None:
            placeholders = [
                None if text is None else sentinel
                for text, sentinel in zip(texts, self._SENTINELS[: len(texts)], strict=True)
            ]
            skeleton = self.processor.apply_chat_template(build_messages(placeholders), tokenize=False)
            self._skeletons[key] = skeleton
        for text, sentinel in zip(texts, self._SENTINELS[: len(texts)], strict=True):
            if text is not None:
                skeleton = skeleton.replace(sentinel, text)
        return skeleton
