"""The multi-vector head: token vectors, their masks, the saved directory, and MaxSim scoring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import MultiVectorEncoder

import unime
from tests.conftest import mixed_inputs
from tests.train.test_late_interaction_training import CONFIG
from unime.config import MultiVectorConfig
from unime.data.dataset import load_examples
from unime.data_synth.marker_pages import write_marker_pages
from unime.inputs import parse_inputs
from unime.multi_vector import BIAS_NAME, HEAD_FILE, WEIGHT_NAME, pad_token_matrices
from unime.train.config import load_train_config
from unime.train.loop import train
from unime.train.model import load_for_training

DIM = 24


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def embedder():
    return unime.build_tiny("qwen2_vl", seed=0, multi_vector=MultiVectorConfig(dim=DIM))


@pytest.fixture(scope="module")
def inputs(scenes, real_photo_paths):
    images, captions = scenes
    return mixed_inputs(images, captions, real_photo_paths)


@pytest.fixture(scope="module")
def saved_dir(embedder, tmp_path_factory):
    directory = tmp_path_factory.mktemp("multi_vector") / "tiny-colqwen2"
    embedder.save(directory)
    return directory


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_token_vectors_do_not_depend_on_the_batch(embedder, inputs) -> None:
    alone = [embedder.encode(item, output="multi_vector") for item in inputs]
    for batch_size in (3, len(inputs)):
        together = embedder.encode(inputs, output="multi_vector", batch_size=batch_size)
        assert len(together) == len(inputs)
        for index, (batched, single) in enumerate(zip(together, alone, strict=True)):
            assert batched.dtype == np.float32 and batched.shape == single.shape, index
            assert _cosines(batched, single).min() >= 0.9999, index
    reversed_order = embedder.encode(inputs[::-1], output="multi_vector", batch_size=4)[::-1]
    for batched, single in zip(reversed_order, alone, strict=True):
        assert _cosines(batched, single).min() >= 0.9999
    # Unit vectors, and not all alike (a constant head would pass the checks above).
    np.testing.assert_allclose(np.linalg.norm(alone[0], axis=1), 1.0, atol=1e-5)
    assert _cosines(alone[0][:1].repeat(len(alone[0]), 0), alone[0]).min() < 0.99


def test_padding_never_gets_a_vector(embedder, inputs) -> None:
    records = parse_inputs(inputs)
    lengths = [int(embedder.tokenize([record])["attention_mask"].sum()) for record in records]
    assert len(set(lengths)) > 2  # the batch below pads most of its rows
    matrices = embedder.encode(inputs, output="multi_vector", batch_size=len(inputs))
    assert [len(matrix) for matrix in matrices] == lengths
    features = embedder.tokenize(records)
    with torch.inference_mode():
        vectors, mask = embedder.embed_multi_vector(features)  # [B, T, dim], [B, T]
    assert vectors.shape == (len(inputs), max(lengths), DIM)
    assert mask.sum(dim=1).tolist() == lengths
    assert torch.equal(mask, features["attention_mask"].bool())


def test_image_tokens_mode_keeps_the_patches_of_inputs_with_an_image(inputs) -> None:
    embedder = unime.build_tiny("qwen2_vl", seed=0, multi_vector=MultiVectorConfig(dim=DIM, tokens="image"))
    image_token = embedder.processor.tokenizer.convert_tokens_to_ids(embedder.spec.image_token)
    matrices = embedder.encode(inputs, output="multi_vector", batch_size=len(inputs))
    patch_counts = []
    for index, (record, matrix) in enumerate(zip(parse_inputs(inputs), matrices, strict=True)):
        ids = embedder.tokenize([record])["input_ids"][0]
        patch_counts.append(int((ids == image_token).sum()))
        assert len(matrix) == (patch_counts[-1] or len(ids)), index
    assert 0 in patch_counts and max(patch_counts) > 0  # both kinds of input were seen


def test_save_and_load_give_the_same_token_vectors(embedder, saved_dir, inputs) -> None:
    recorded = json.loads((saved_dir / "unime_config.json").read_text())
    assert recorded["kind"] == "embedder"
    assert recorded["multi_vector"] == {"dim": DIM, "tokens": "all", "bias": False}
    weights = load_file(str(saved_dir / HEAD_FILE))
    assert list(weights) == [WEIGHT_NAME]
    assert torch.equal(weights[WEIGHT_NAME], embedder.multi_vector_head.custom_text_proj.weight.detach())

    loaded = unime.load(saved_dir)
    assert loaded.config.multi_vector == MultiVectorConfig(dim=DIM)
    for before, after in zip(
        embedder.encode(inputs, output="multi_vector"), loaded.encode(inputs, output="multi_vector"), strict=True
    ):
        np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)
    # The single vectors are those of the same backbone without a head.
    np.testing.assert_allclose(
        loaded.encode(inputs), unime.build_tiny("qwen2_vl", seed=0).encode(inputs), rtol=0, atol=1e-6
    )


def test_a_model_without_a_head_refuses_multi_vector_output(tiny_dir) -> None:
    plain = unime.load(tiny_dir)
    assert plain.multi_vector_head is None
    with pytest.raises(unime.ConfigError, match=rf"{tiny_dir}.* has no multi-vector head"):
        plain.encode(["a red circle"], output="multi_vector")
    assert plain.encode(["a red circle"]).shape == (1, plain.embedding_dim)


def test_a_saved_dimension_that_disagrees_with_the_head_fails_to_load(saved_dir, tmp_path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(saved_dir, broken)
    config = json.loads((broken / "unime_config.json").read_text())
    config["multi_vector"]["dim"] = DIM * 2
    (broken / "unime_config.json").write_text(json.dumps(config))
    with pytest.raises(unime.ModelLoadError, match=rf"{HEAD_FILE}.*multi_vector.dim is {DIM * 2}"):
        unime.load(broken)
    (broken / HEAD_FILE).unlink()
    with pytest.raises(unime.ModelLoadError, match=f"{HEAD_FILE} is missing"):
        unime.load(broken)


def test_bad_multi_vector_settings_are_refused(embedder) -> None:
    with pytest.raises(unime.ConfigError, match="multi_vector.dim"):
        MultiVectorConfig(dim=0)
    with pytest.raises(unime.ConfigError, match="multi_vector.tokens"):
        MultiVectorConfig(tokens="text")
    with pytest.raises(unime.ConfigError, match="multi_vector.bias"):
        MultiVectorConfig(bias="yes")
    with pytest.raises(ValueError, match="truncate_dim"):
        embedder.encode(["a"], output="multi_vector", truncate_dim=8)
    with pytest.raises(ValueError, match="output must be"):
        embedder.encode(["a"], output="tokens")


def test_maxsim_equals_a_per_pair_loop(embedder, inputs) -> None:
    queries = embedder.encode(inputs[:3], output="multi_vector", prompt_name="query")
    documents = embedder.encode(inputs, output="multi_vector", prompt_name="document")
    scores = embedder.maxsim(queries, documents)
    assert scores.shape == (3, len(inputs))
    for i, query in enumerate(queries):
        for j, document in enumerate(documents):
            expected = (query @ document.T).max(axis=1).sum()
            assert abs(float(scores[i, j]) - expected) < 1e-4, (i, j)
    # A single matrix is a list of one.
    assert torch.allclose(embedder.maxsim(queries[0], documents[0]), scores[:1, :1])
    # bfloat16 compute: within its rounding (3 * 2**-8 of a cosine per query token), not bit-equal.
    rounded = embedder.maxsim(queries, documents, compute_dtype=torch.bfloat16)
    bound = torch.tensor([3 * 2**-8 * len(query) for query in queries]).unsqueeze(1)  # [3, 1]
    assert not torch.equal(rounded, scores) and ((rounded - scores).abs() <= bound).all()


def test_padded_token_matrices_carry_their_mask() -> None:
    padded, mask = pad_token_matrices([np.ones((2, 3)), np.ones((4, 3))])
    assert padded.shape == (2, 4, 3) and mask.tolist() == [[True, True, False, False], [True] * 4]
    assert float(padded[0, 2:].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="token matrix 1: expected a non-empty"):
        pad_token_matrices([np.ones((2, 3)), np.ones((0, 3))])


def test_a_head_with_a_bias_trains_through_the_loop_and_every_consumer_reads_it(tmp_path, inputs) -> None:
    """The ColQwen2 layout's bias: trained by the late-interaction loss in the one loop, saved, and read back by
    unime and by sentence-transformers' MultiVectorEncoder (its Dense gets the bias) with the same token vectors."""
    pages = write_marker_pages(tmp_path / "pages", "train", 4, seed=1)
    overrides = [f"data.train_files=[{pages}]", f"output_dir={tmp_path / 'run'}", "log_with=[]", "save_every=0"]
    overrides += ["model.multi_vector={enabled: true, dim: 16, bias: true}", "optim.batch_size=4", "optim.max_steps=1"]
    config = load_train_config(CONFIG, overrides)
    module = load_for_training(config.model)
    start = module.multi_vector_head.custom_text_proj.bias.detach().clone()
    assert float(start.abs().sum()) > 0  # nn.Linear's initial bias: a random one, so that reading it is tested
    final = train(config, module, load_examples([pages])[0])

    assert sorted(load_file(str(final / HEAD_FILE))) == [BIAS_NAME, WEIGHT_NAME]
    loaded = unime.load(final)
    assert loaded.config.multi_vector == MultiVectorConfig(dim=16, bias=True)
    assert not torch.equal(loaded.multi_vector_head.custom_text_proj.bias, start), "the bias did not train"
    in_memory = [item for item in inputs if not isinstance(item, Path)]  # sentence-transformers takes no paths
    ours = loaded.encode(in_memory, output="multi_vector")
    theirs = MultiVectorEncoder(str(final)).encode(in_memory, batch_size=len(in_memory))
    for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        b = np.asarray(b)
        assert a.shape == b.shape, index
        assert _cosines(a, b).min() >= 0.9999, index
    # A config that says no bias beside a file that holds one is refused, naming both.
    recorded = json.loads((final / "unime_config.json").read_text())
    recorded["multi_vector"]["bias"] = False
    (final / "unime_config.json").write_text(json.dumps(recorded))
    with pytest.raises(unime.ModelLoadError, match=rf"{HEAD_FILE}.*multi_vector.bias is false.*{BIAS_NAME}"):
        unime.load(final)
