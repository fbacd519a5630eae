"""A small byte-level BPE tokenizer trained in code, so tiny backbones need nothing from the Hub."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Words the embedded default and the tests use (shapes, colours, positions, prompts), so that they become
# few tokens each; any other text still tokenizes, byte by byte.
_CORPUS_WORDS = """
a an the one two three four five six seven eight nine ten red green blue yellow purple orange black white
gray grey pink brown cyan circle square triangle star cross ring rectangle diamond heart shape shapes on in
at of left right top bottom middle center centre upper lower corner small large big tiny medium above below
next to beside and with there is are image picture photo photograph sentence text word words query document
represent given find retrieve summarize summary the above in one word describe what which how many color
colour background foreground scene object objects question answer yes no relevant does match matches this
that for to it its a cat dog car tree house person man woman child bird boat plane road sky water grass
""".split()

_CORPUS = [" ".join(_CORPUS_WORDS[i : i + 12]) for i in range(0, len(_CORPUS_WORDS), 12)] + [
    "Summarize above image in one word:",
    "Summarize above sentence in one word:",
    "Summarize above image and sentence in one word:",
    "Represent the given image for classification.",
    "Find an image that matches the given text.",
    "a red circle on the left and a blue square on the right",
    "There are three green triangles at the top of the image.",
]


def train_tiny_tokenizer(
    special_tokens: list[str],
    *,
    vocab_size: int = 512,
    pad_token: str,
    eos_token: str,
    bos_token: str | None = None,
    unk_token: str | None = None,
    extra_texts: tuple[str, ...] = (),
    chat_template: str | None = None,
    model_max_length: int = 4096,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on a fixed corpus and register `special_tokens` as special.

    Deterministic: the same arguments give the same vocabulary.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(_CORPUS) + list(extra_texts), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=pad_token,
        eos_token=eos_token,
        bos_token=bos_token,
        unk_token=unk_token,
        model_max_length=model_max_length,
        padding_side="right",
    )
    wrapped.add_special_tokens(
        {
            "additional_special_tokens": [
                t for t in special_tokens if t not in {pad_token, eos_token, bos_token, unk_token}
            ]
        }
    )
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped
