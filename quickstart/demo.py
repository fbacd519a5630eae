"""The embedded default's first job: embed drawn scenes and their captions, print the similarity table."""

from __future__ import annotations

import random
from dataclasses import dataclass

import unime
from unime.data_synth.scenes import describe, draw_scene, random_scene


@dataclass
class DemoSettings:
    """Embed drawn images and captions and print their similarity table."""

    model: str | None = None
    """A model directory or hub name; default: build a tiny model in memory."""
    backbone: str = "qwen2_vl"
    """Backbone of the tiny model (without --model)."""
    count: int = 4
    """Scenes to draw."""
    seed: int = 0
    """Seed of the scenes and of the tiny model."""


def run_demo_command(settings: DemoSettings) -> int:
    run_demo(settings.model, settings.backbone, count=settings.count, seed=settings.seed)
    return 0


def run_demo(model: str | None = None, backbone: str = "qwen2_vl", count: int = 4, seed: int = 0) -> list[list[float]]:
    """Embed `count` drawn scenes and their captions; print and return the caption x image similarities."""
    embedder = unime.load(model) if model else unime.build_tiny(backbone, seed=seed)
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    captions = [describe(scene) for scene in scenes]
    images = [draw_scene(scene) for scene in scenes]

    caption_vectors = embedder.encode_query(captions)
    image_vectors = embedder.encode_document(images)
    table = embedder.similarity(caption_vectors, image_vectors).tolist()

    source = model or f"a tiny {backbone} built in memory (random weights: similarities are not yet meaningful)"
    print(f"model: {source}")
    print(f"{len(captions)} captions x {len(images)} drawn images, {embedder.embedding_dim}-d embeddings\n")
    print("caption".ljust(60) + "".join(f"  img{j}" for j in range(len(images))))
    for i, caption in enumerate(captions):
        print(f"{i}: {caption}"[:58].ljust(60) + "".join(f" {value:5.2f}" for value in table[i]))
    return table
