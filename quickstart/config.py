"""The quickstart's settings: a typed dataclass per stage, two sizes, dotted `key=value` overrides.

    config = load_quickstart_config("ci", ["reranker.max_steps=300", "eval.fusion_weight=0.5"])

Every training stage runs a recipe config of `recipes/configs/` with the overrides listed here on top, so the
quickstart trains exactly what the recipes train.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unime.errors import ConfigError
from unime.quickstart.stages import STAGES
from unime.settings import apply_overrides, build_dataclass, parse_settings, read_yaml_mapping, split_command_line

Size = Literal["default", "ci"]


@dataclass
class DataSizes:
    text_train: int = 400
    """Paraphrase pairs for stage 1 (`unime synth text`)."""
    text_held_out: int = 100
    """Held-out paraphrase pairs: the text-to-text recall that stage 1 should raise."""
    shapes_train: int = 60
    """Drawn scenes with captions for stage 2 (`unime synth shapes`); mining adds their negatives."""
    shapes_held_out: int = 30
    """Held-out scenes (none shared with training): the image-to-text recall that stage 2 should raise."""
    shapes_negatives: int = 3
    """One-attribute hard negatives written with each training scene (mining may keep or replace them)."""
    benchmark_queries: int = 24
    """Queries per dataset of the held-out synthetic benchmark (`unime eval synthetic`)."""
    benchmark_candidates: int = 8
    """Candidates per retrieval / grounding query of the benchmark."""


@dataclass
class TrainStage:
    config: str = ""
    """Recipe config (a path, or a file name under `recipes/configs/`)."""
    max_steps: int = 150
    """Optimizer steps."""
    overrides: list[str] = field(default_factory=list)
    """More dotted overrides of the recipe config, e.g. `optim.lr=1e-3`."""


@dataclass
class Stage1Settings(TrainStage):
    config: str = "stage1_text_distill.yaml"
    """Recipe config of stage 1."""


@dataclass
class Stage2Settings(TrainStage):
    config: str = "stage2_hardneg_instruct.yaml"
    """Recipe config of stage 2."""
    overrides: list[str] = field(default_factory=lambda: ["loss.hard_negatives=127"])
    """More dotted overrides of the recipe config. The default keeps every candidate of the batch that survives
    false-negative filtering (the recipe's intent, see its config), now that rows carry 5 negatives."""


@dataclass
class MiningSettings:
    top_k: int = 20
    """Candidates retrieved per query by the stage-1 model."""
    negatives: int = 5
    """Negatives per training row after mining, the row's own included (stage 2's `data.num_negatives`)."""
    margin: float = 0.1
    """Drop candidates scoring > the positive's similarity plus this as false negatives (0.1: UniME's mask,
    s > s_pos + 0.1; the text-only stage-1 model scores images weakly, so a stricter margin drops nearly all)."""
    keep_existing: bool = True
    """Keep the rows' own one-attribute negatives first and fill up to `negatives` with mined ones."""
    text_negatives: int = 4
    """Negatives mined for each paraphrase pair (the reranker's training rows), the hardest of `top_k`. No
    margin filters them: each pair describes its own scene, so no other row's positive is a false negative."""


@dataclass
class RerankerSettings:
    """Every choice of the reranker stage, in one place: its data, its starting point and its budget."""

    config: str = "reranker_sft.yaml"
    """Recipe config of the reranker."""
    data: Literal["text_mined", "text", "shapes", "mined"] = "text_mined"
    """Training and held-out rows: `text_mined` the paraphrase pairs with negatives mined by the stage-1 model
    (reranking stage 2's top 10 of held-out pairs: recall@1 0.22 -> 0.38, against 0.25 for a reranker trained
    on random documents only), `text` the paraphrase pairs (random documents only), `shapes` the drawn scenes with
    their one-attribute negatives, `mined` the stage-2 rows with mined negatives (held out: the held-out scenes;
    the tiny model's random vision tower stays near chance there)."""
    mined_negatives: int = 3
    """Mined negatives per query in each batch (from the row's own), except with `text`."""
    random_negatives: int = 3
    """Other rows' positives per query in each batch (the reranking paper: half mined, half random). Measured,
    stage 2's top 10 of held-out pairs reranked (fused, w 0.1): recall@1 0.22 -> 0.38 with 3 + 3, 0.25 with 2 + 2."""
    start: Literal["tiny", "stage1", "stage2"] = "stage1"
    """`tiny`: a tiny random model; `stage1` / `stage2`: the weights of the stage-1 / stage-2 embedder."""
    max_steps: int = 600
    """Optimizer steps."""
    overrides: list[str] = field(default_factory=list)
    """More dotted overrides of the recipe config, e.g. `data.random_negatives=7`."""


@dataclass
class EvalSettings:
    rerank_datasets: list[str] = field(default_factory=lambda: ["Synthetic-I2T", "Synthetic-T2I"])
    """Benchmark datasets whose stage-2 top K the reranker reorders."""
    rerank_top_k: int = 5
    """Candidates the reranker sees per query of the benchmark."""
    text_rerank_top_k: int = 10
    """Candidates the reranker sees per held-out paraphrase query (text-to-text recall@1 of stage 2 + reranker)."""
    fusion_weight: float | None = 0.1
    """None: order the top K by reranker score; w: by embedding score + w * reranker score (LamRA fuses so).
    Measured on held-out pairs, stage 2's top 10: recall@1 0.35 by the reranker alone, 0.38 at 0.1, 0.35 at 0.3."""
    batch_size: int = 32
    """Items per encoder call."""


@dataclass
class ServeSettings:
    enabled: bool = True
    """Start `unime serve` with the stage-2 embedder and the reranker and send it one request of each kind."""
    backend: Literal["transformers", "auto", "vllm"] = "transformers"
    """Server backend (`auto`: vLLM where installed; vLLM takes 1-2 minutes to start on a CPU)."""
    startup_timeout_s: float = 300.0
    """How long to wait for `/health`."""
    extra_args: list[str] = field(default_factory=list)
    """More `unime serve` arguments, e.g. `[--gpu-memory-utilization, "0.3"]`."""


@dataclass
class MultiVectorSettings:
    """The multi-vector stage: a ColPali-style late-interaction model trained on drawn document pages (`unime synth
    pages`), beside a single-vector model trained on the same pages from the same start, both scored on held-out
    pages (`unime eval run --visdoc`)."""

    enabled: bool = True
    """Run the stage."""
    config: str = "late_interaction_visdoc.yaml"
    """Recipe config of the multi-vector model; the single-vector model is the same config with
    `single_vector_overrides` on top."""
    train_pages: int = 48
    """Drawn training pages, one query each, with `negatives` hard-negative pages."""
    held_out_pages: int = 16
    """Held-out pages (none shared with training): the corpus of the evaluation holds them and their negatives."""
    negatives: int = 3
    """Hard-negative pages per query: the page with the asked fact changed."""
    page_kinds: list[str] = field(default_factory=lambda: ["table", "bar_chart", "line_chart", "form", "status"])
    """Block kinds the pages draw their two blocks from (`unime.data_synth.pages`)."""
    ask: list[str] | None = field(default_factory=lambda: ["status"])
    """Block kinds the queries ask about; None: any. The default asks for the page's status stamp, a badge in the
    status's colour, which the query names with the status ("Find the invoice with the green approved stamp."):
    the one fact the tiny model can see. It does not read text: asked about table cells, chart values and form
    fields, both models stayed near chance (nDCG@5 0.10 / 0.15 at seed 0, 0.00 / 0.05 at seed 1; chance 0.05)."""
    max_steps: int = 80
    """Optimizer steps of each model."""
    max_pixels: int | None = None
    """Image budget of both models (`model.max_pixels`); None keeps the tiny model's 112 * 112 pixels, 12 image
    tokens for a 384x512 page. 224 * 224 pixels (54 tokens) made each step about twice as slow and did not learn
    better: 40 steps at seed 0, nDCG@5 multi-vector 0.03, single-vector 0.23 (took as long as 80 steps at 12
    tokens)."""
    overrides: list[str] = field(default_factory=lambda: ["model.multi_vector.tokens=image"])
    """More dotted overrides of the recipe config, for both models. The default keeps the recipe's LoRA on the
    language model (the random vision tower frozen) and the page's image tokens only in the multi-vector model's
    matrices: with every token kept (the prompt's tokens, alike on every page, among them) its training loss stayed
    at ln 64 for 40 steps (a smaller stamp, every weight trained). Every weight trained (the vision tower's
    included; 54 tokens, 40 steps) left both models at chance on a smaller stamp (nDCG@5 0.05 and 0.03 at seed
    0)."""
    single_vector_overrides: list[str] = field(
        default_factory=lambda: [
            "model.multi_vector.enabled=false",
            "loss.name=unime_hard_negative",
            "loss.hard_negatives=63",
        ]
    )
    """What makes the single-vector model of the comparison: no head, UniME's hard-negative loss on pooled
    vectors with every candidate of the batch."""


@dataclass
class ThreeHeadsSettings:
    """The one checkpoint with three heads (`recipes/train_three_heads.py`: a pooled vector, a multi-vector head and
    the yes/no reranker on one base), every objective trained on the rows `data` names; then that one loaded model
    retrieves for held-out queries (pooled vectors, then MaxSim) and reranks each shortlist with its yes/no head
    (`MultiTaskModel.retrieve_and_rerank`)."""

    enabled: bool = True
    """Run the stage."""
    config: str = "three_heads.yaml"
    """Recipe config of the multi-task model; the quickstart points each objective at the rows of `data`."""
    data: Literal["text_mined", "mined"] = "text_mined"
    """Training and held-out rows, for every objective: `text_mined` the paraphrase pairs with negatives mined by
    the stage-1 model (held out: the held-out pairs), `mined` the stage-2 rows (drawn scenes, mined negatives; held
    out: the held-out scenes against all their captions)."""
    start: Literal["tiny", "stage1"] = "stage1"
    """`tiny`: a tiny random model; `stage1`: the weights of the stage-1 embedder (as stage 2 starts)."""
    max_steps: int = 30
    """Optimizer steps; each one draws a micro-batch of every objective. Measured (seed 0, held-out pairs): dense
    recall@1 0.97 and multi-vector 0.99 after 30 steps on the default data (chance 0.01), 0.87 and 0.87 after 15 at
    size ci (chance 0.02), 1.00 and 0.98 after 60 at size ci; the yes/no head alone stays near chance on the
    shortlist at these budgets. 30 steps took 100 s on the 2-core machine beside other jobs."""
    top_k: int = 10
    """Shortlist per held-out query that the yes/no head reorders (the ceiling of reranking is recall@top_k)."""
    fusion_weight: float | None = 0.1
    """None: order the shortlist by p(yes); w: by retrieval score + w * p(yes) (as `eval.fusion_weight`)."""
    overrides: list[str] = field(default_factory=list)
    """More dotted overrides of the recipe config, e.g. `objectives.rerank.weight=2`."""


@dataclass
class QuickstartConfig:
    out: str = "runs/quickstart"
    """Where every artefact goes; running again with the same `out` resumes."""
    size: Size = "default"
    """`default`: the embedded default (a few minutes on 2 cores); `ci`: a reduced run for tests."""
    seed: int = 0
    """Seed of the data, the tiny models and training."""
    backbone: str = "qwen2_vl"
    """Backbone of the tiny models the embedded default builds."""
    recipes_dir: str | None = None
    """Folder of the recipe configs (default: `recipes/configs` of this source tree)."""
    data: DataSizes = field(default_factory=DataSizes)
    stage1: Stage1Settings = field(default_factory=Stage1Settings)
    """Stage 1: text distillation from the offline MiniLM teacher."""
    mining: MiningSettings = field(default_factory=MiningSettings)
    stage2: Stage2Settings = field(default_factory=Stage2Settings)
    """Stage 2: hard-negative instruction tuning from the stage-1 model, on the mined rows."""
    reranker: RerankerSettings = field(default_factory=RerankerSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    multi_vector: MultiVectorSettings = field(default_factory=MultiVectorSettings)
    three_heads: ThreeHeadsSettings = field(default_factory=ThreeHeadsSettings)
    """One checkpoint with three heads: retrieve, then rerank, with that one model."""


SIZES: dict[str, list[str]] = {
    "default": [],
    # Small enough for a test on 2 cores, large enough that each stage still moves its metric far.
    "ci": [
        "data.text_train=256",
        "data.text_held_out=60",
        "data.shapes_held_out=24",
        "data.benchmark_queries=12",
        "stage1.max_steps=60",
        "stage2.max_steps=100",
        "reranker.max_steps=300",
        "multi_vector.train_pages=24",
        "multi_vector.held_out_pages=8",
        "multi_vector.max_steps=20",
        "three_heads.max_steps=15",
    ],
}
"""Overrides each size applies before the user's own."""


def load_quickstart_config(size: Size = "default", overrides: list[str] = ()) -> QuickstartConfig:
    """The settings of `size` with dotted `key=value` overrides applied (values parsed as YAML)."""
    return build_dataclass(QuickstartConfig, apply_overrides(size_preset(size), overrides), "quickstart", "")


def size_preset(size: str) -> dict[str, Any]:
    """The settings a size implies, as the nested mapping its overrides give (the layer under the user's own)."""
    if size not in SIZES:
        raise ConfigError(f"size {size!r}: expected one of {sorted(SIZES)}")
    return apply_overrides({"size": size}, SIZES[size])


@dataclass(kw_only=True)
class QuickstartCommand(QuickstartConfig):
    """The whole pipeline on the embedded default, resumable: its settings, and where to stop."""

    stop_after: Literal[STAGES] | None = None  # type: ignore[valid-type]
    """Stop after this stage (run again to go on)."""


def parse_quickstart_settings(argv: Sequence[str], *, prog: str, description: str) -> QuickstartCommand:
    """`unime quickstart`'s settings: its size's preset first (`--size ci`, `size=ci` or `size: ci` in the config
    file), then the config file, the overrides and the flags (`unime.settings.parse_settings`)."""
    config_files, overrides, rest = split_command_line(QuickstartCommand, argv)
    size: str = "default"
    for path in config_files:
        size = read_yaml_mapping(path).get("size", size)
    for override in overrides:
        key, _, value = override.partition("=")
        size = value if key == "size" else size
    for flag, value in zip(rest, rest[1:], strict=False):
        size = value if flag == "--size" else size
    size = next((token.partition("=")[2] for token in rest if token.startswith("--size=")), size)
    return parse_settings(QuickstartCommand, argv, prog=prog, description=description, base=size_preset(size))


def recipe_config_path(config: QuickstartConfig, name: str) -> Path:
    """A recipe config by path, or by file name under the recipes folder."""
    if Path(name).is_file():
        return Path(name)
    folder = Path(config.recipes_dir) if config.recipes_dir else Path(__file__).resolve().parents[1] / "recipes"
    folder = folder / "configs" if (folder / "configs").is_dir() else folder
    path = folder / name
    if not path.is_file():
        raise ConfigError(
            f"recipe config {name!r} not found in {folder}; run from a source checkout or set recipes_dir=<folder>"
        )
    return path
