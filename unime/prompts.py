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
from unime.config import PromptConfig
from unime.inputs import EmbedInput

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
    # JSON string literals are valid Jinja string literals, escapes included.
    header = "".join(f"{{%- set {name} = {json.dumps(value)} -%}}\n" for name, value in constants.items())
    return header + _TEMPLATE


def apply_embedding_template(processor: Any, turn: TurnFormat, prompts: PromptConfig) -> None:
    """Give a processor (and its tokenizer) the embedding template; it is saved with the processor."""
    template = embedding_chat_template(turn, prompts)
    processor.chat_template = template
    processor.tokenizer.chat_template = template


def to_messages(item: EmbedInput, image: Any | None, instruction: str | None) -> list[dict[str, Any]]:
    """The chat messages of one input; `image` is its decoded image (None when only rendering text)."""
    content: list[dict[str, Any]] = []
    if item.has_image:
        content.append({"type": "image", "image": image})
    if item.text is not None:
        content.append({"type": "text", "text": item.text})
    messages: list[dict[str, Any]] = []
    if instruction:
        messages.append({"role": "system", "content": [{"type": "text", "text": instruction}]})
    messages.append({"role": "user", "content": content})
    return messages


class PromptRenderer:
    """Renders inputs through a processor's chat template, once per prompt shape.

    The template inserts an input's text verbatim, so it is rendered once for each (instruction, has image,
    has text) with a sentinel in place of the text, and the sentinel is replaced afterwards: the same string
    as a full render, without running Jinja for every input.
    """

    _SENTINEL = "\ue000unime-text\ue000"

    def __init__(self, processor: Any):
        self.processor = processor
        self._template: str | None = None
        self._skeletons: dict[tuple[str | None, bool, bool], str] = {}

    def render(self, item: EmbedInput, instruction: str | None) -> str:
        if self._template != self.processor.chat_template:  # the template changed: forget old renderings
            self._template, self._skeletons = self.processor.chat_template, {}
        key = (instruction, item.has_image, item.text is not None)
        skeleton = self._skeletons.get(key)
        if skeleton is None:
            shape = EmbedInput(text=self._SENTINEL if item.text is not None else None, image=item.image)
            skeleton = self.processor.apply_chat_template(to_messages(shape, None, instruction), tokenize=False)
            self._skeletons[key] = skeleton
        return skeleton.replace(self._SENTINEL, item.text) if item.text is not None else skeleton
