"""A saved Qwen2-VL / Qwen2.5-VL multi-vector directory loads unchanged in colpali-engine's ColQwen2 / ColQwen2_5
and gives unime's token vectors and MaxSim scores; colpali-engine's own processor reads the directory too, and the
prompts it builds differ from unime's (what a user of both must know).

colpali-engine is installed without its dependencies (its metadata pins peft<0.21, our stack has 0.21.2): the
modules used here import and run beside our pins.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers.conversion_mapping
from colpali_engine.models import ColQwen2, ColQwen2_5, ColQwen2_5_Processor, ColQwen2Processor
from safetensors import safe_open

import unime
from tests.conftest import mixed_inputs
from unime.config import MultiVectorConfig
from unime.inputs import parse_inputs
from unime.multi_vector import BIAS_NAME, WEIGHT_NAME
from unime.saving import COLPALI_CLASSES


def _forget_colpali_registrations() -> None:
    """Undo what importing colpali_engine.models registers in transformers' process-wide conversion table.

    Its ColQwen3 module registers a checkpoint conversion mapping for every `qwen3_vl` model (not only its own
    class): any Qwen3-VL model saved afterwards in the same process carries a `model.` prefix on every weight, which
    vLLM's Qwen3-VL classes cannot read. The ColQwen2 classes tested here use no registration, so the rest of the
    test process gets the table back as transformers builds it (the import happens once, at collection)."""
    table = transformers.conversion_mapping
    if table._checkpoint_conversion_mapping_cache is not None:
        for name in table.USER_REGISTERED_MAPPINGS:
            table._checkpoint_conversion_mapping_cache.pop(name, None)
    table.USER_REGISTERED_MAPPINGS.clear()


_forget_colpali_registrations()

# (backbone, head bias): the ColQwen2 layout with a trained bias, and a bias-free head (written as a zero bias).
CASES = {"qwen2_vl": True, "qwen2_5_vl": False}
COLPALI = {"qwen2_vl": (ColQwen2, ColQwen2Processor), "qwen2_5_vl": (ColQwen2_5, ColQwen2_5_Processor)}


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    """(embedder, directory, ColQwen model loaded from it) for one backbone."""
    backbone = request.param
    embedder = unime.build_tiny(backbone, seed=0, multi_vector=MultiVectorConfig(bias=CASES[backbone]))
    embedder.set_prompts(query_instruction="Find the page that answers the question.")
    if CASES[backbone]:
        with torch.no_grad():  # a fresh bias is small: make it matter, so that reading it is tested
            embedder.multi_vector_head.custom_text_proj.bias.normal_(0.0, 0.5)
    directory = tmp_path_factory.mktemp("colpali") / f"tiny-{backbone}"
    embedder.save(directory)
    colpali_class, _ = COLPALI[backbone]
    model, info = colpali_class.from_pretrained(str(directory), output_loading_info=True)
    return embedder, directory, model.eval(), info


@pytest.fixture(scope="module")
def inputs(scenes, real_photo_paths) -> list:
    images, captions = scenes
    return mixed_inputs(images, captions, real_photo_paths[:1])


def _colpali_pixels(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """unime's features in colpali-engine's form: the flat `[patches, d]` pixels split per image and zero-padded
    to `[images, max_patches, d]` (ColQwen2Processor.process_images' layout, which ColQwen2.forward unpads)."""
    if "pixel_values" not in features:
        return dict(features)
    grid = features["image_grid_thw"]  # [images, 3]
    per_image = torch.split(features["pixel_values"], (grid[:, 1] * grid[:, 2]).tolist())
    return {**features, "pixel_values": torch.nn.utils.rnn.pad_sequence(list(per_image), batch_first=True)}


def _unime_pixels(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """colpali-engine's padded per-image pixels back to the flat `[patches, d]` the model takes."""
    if "pixel_values" not in features:
        return dict(features)
    grid = features["image_grid_thw"]  # [images, 3]
    counts = (grid[:, 1] * grid[:, 2]).tolist()
    flat = [pixels[:count] for pixels, count in zip(features["pixel_values"], counts, strict=True)]
    return {**features, "pixel_values": torch.cat(flat)}


def _colpali_token_vectors(model, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """ColQwen's vectors of a batch in colpali-engine's form, the padding rows dropped: `[n_tokens_i, 128]` each."""
    with torch.inference_mode():
        vectors = model(**features)  # [B, T, 128], zero at padding
    return [row[mask] for row, mask in zip(vectors, features["attention_mask"].bool(), strict=True)]


def _assert_same_tokens(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected, strict=True)):
        a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
        assert a.shape == b.shape, (index, a.shape, b.shape)
        worst = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())
        assert worst >= 0.9999, (index, worst)


def test_the_directory_loads_with_nothing_missing(saved) -> None:
    embedder, directory, model, info = saved
    assert model.config.model_type in COLPALI_CLASSES
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set() and not info["error_msgs"]
    assert info["unexpected_keys"] <= {"lm_head.weight"}  # the generator's head, which a ColQwen has not
    head = embedder.multi_vector_head.custom_text_proj
    torch.testing.assert_close(model.custom_text_proj.weight, head.weight, rtol=0, atol=0)
    expected_bias = head.bias if head.bias is not None else torch.zeros(128)
    torch.testing.assert_close(model.custom_text_proj.bias, expected_bias, rtol=0, atol=0)
    with safe_open(str(directory / "model.safetensors"), "pt") as weights:
        assert {WEIGHT_NAME, BIAS_NAME} <= set(weights.keys())


def test_colqwen_gives_unime_token_vectors(saved, inputs) -> None:
    embedder, directory, model, _ = saved
    loaded = unime.load(directory)  # the same directory through unime's own path
    for prompt_name in ("query", "document"):
        expected = loaded.encode(inputs, output="multi_vector", prompt_name=prompt_name, batch_size=len(inputs))
        features = embedder.tokenize(parse_inputs(inputs), embedder.instruction_for(prompt_name, None))
        _assert_same_tokens(_colpali_token_vectors(model, _colpali_pixels(features)), expected)


def test_colpali_maxsim_scores_equal_unime_scores(saved, inputs) -> None:
    embedder, _, model, _ = saved
    queries, documents = inputs[:3], inputs
    ours = embedder.maxsim(
        embedder.encode_query(queries, output="multi_vector"),
        embedder.encode_document(documents, output="multi_vector"),
    )  # [3, n]
    query_features = embedder.tokenize(parse_inputs(queries), embedder.prompts["query"])
    document_features = embedder.tokenize(parse_inputs(documents), embedder.prompts["document"])
    query_vectors = _colpali_token_vectors(model, _colpali_pixels(query_features))
    document_vectors = _colpali_token_vectors(model, _colpali_pixels(document_features))
    # One document per call: colpali-engine zero-pads a list of pages without a mask, and a padded slot (score 0)
    # would outscore a query token whose every similarity to a shorter page is negative.
    theirs = torch.cat(
        [ColQwen2Processor.score_multi_vector(query_vectors, [page], device="cpu") for page in document_vectors], dim=1
    )  # [3, n]
    torch.testing.assert_close(theirs, ours.float(), rtol=0, atol=1e-4)
    assert float(ours.std()) > 0.1  # the scores differ between pairs: the comparison above can fail


def test_colpali_processor_reads_the_directory_and_prompts_its_own_way(saved, scenes) -> None:
    embedder, directory, model, _ = saved
    backbone = embedder.config.backbone
    processor = COLPALI[backbone][1].from_pretrained(str(directory))
    images, captions = scenes
    queries = processor.process_queries([captions[0], "a much longer query " * 8])
    pages = processor.process_images(images[:2])
    for features in (queries, pages):
        features = dict(features)
        # The same ids and pixels give the same vectors in both: the model is one, whoever prepares the inputs.
        with torch.inference_mode():
            vectors, mask = embedder.embed_multi_vector(_unime_pixels(features))  # [B, T, 128], [B, T]
        ours = [row[keep] for row, keep in zip(vectors, mask, strict=True)]
        _assert_same_tokens(_colpali_token_vectors(model, features), ours)
    # What differs: colpali-engine pads on the left, sends a query as its bare text followed by ten
    # `<|endoftext|>` augmentation tokens (no chat turn, no instruction), and a page as a fixed "Describe the
    # image." user turn; unime renders both through its chat template with the configured instructions.
    tokenizer = embedder.processor.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert processor.tokenizer.padding_side == "left" and queries["attention_mask"][0, 0] == 0  # padded: on the left
    assert queries["input_ids"][1, -10:].tolist() == [end] * 10
    assert tokenizer.decode(queries["input_ids"][1]).startswith("a much longer query")
    assert "Describe the image." in tokenizer.decode(pages["input_ids"][0])
    rendered = embedder.tokenize(parse_inputs([captions[0]]), embedder.prompts["query"])["input_ids"][0]
    rendered = tokenizer.decode(rendered)
    assert rendered.startswith("<|im_start|>") and embedder.prompts["query"] in rendered


def test_a_head_of_another_dimension_fails_in_colqwen_not_silently(tmp_path) -> None:
    embedder = unime.build_tiny("qwen2_vl", seed=0, multi_vector=MultiVectorConfig(dim=24))
    embedder.save(tmp_path / "dim24")
    # ColQwen2 fixes the dimension at 128: transformers refuses the saved projection's size (its load report names
    # custom_text_proj as mismatched) instead of keeping a random projection.
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        ColQwen2.from_pretrained(str(tmp_path / "dim24"))
    np.testing.assert_allclose(  # unime reads its head from its own file, as before
        unime.load(tmp_path / "dim24").encode(["a red circle"], output="multi_vector"),
        embedder.encode(["a red circle"], output="multi_vector"),
        rtol=0,
        atol=1e-6,
    )


def test_an_image_tokens_head_matches_colqwen_masking_non_image_embeddings(tmp_path, scenes) -> None:
    embedder = unime.build_tiny("qwen2_vl", seed=0, multi_vector=MultiVectorConfig(tokens="image", bias=True))
    embedder.save(tmp_path / "image-tokens")
    model = ColQwen2.from_pretrained(str(tmp_path / "image-tokens"), mask_non_image_embeddings=True).eval()
    images, captions = scenes
    pages = [images[0], {"text": captions[1], "image": images[1].resize((80, 60))}]
    expected = embedder.encode_document(pages, output="multi_vector", batch_size=len(pages))
    features = embedder.tokenize(parse_inputs(pages), embedder.prompts["document"])
    with torch.inference_mode():
        vectors = model(**_colpali_pixels(features))  # [B, T, 128], zero outside the image patches
    image_token = embedder.processor.tokenizer.convert_tokens_to_ids(embedder.spec.image_token)
    kept = features["input_ids"] == image_token  # [B, T]
    assert vectors[~kept].abs().max() == 0  # every other token is masked out
    _assert_same_tokens([row[keep] for row, keep in zip(vectors, kept, strict=True)], expected)
