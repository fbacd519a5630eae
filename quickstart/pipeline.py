"""`unime quickstart`: synthetic data -> stage 1 -> mining -> stage 2 -> reranker -> evaluation -> serving ->
multi-vector model on drawn pages -> one checkpoint with three heads -> report.

Each stage is a function of the config and the artefacts of the stages before it; `run_quickstart` runs them
through a `StageRunner`, so a second run skips what the first one finished and resumes an interrupted training
from its checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from unime.atomic import write_json_atomic
from unime.errors import ConfigError
from unime.quickstart.config import QuickstartCommand, QuickstartConfig, TrainStage, recipe_config_path
from unime.quickstart.stages import STAGES, StageResult, StageRunner
from unime.quickstart.three_heads import run_three_heads

TRAIN_LOG = "train_log.jsonl"
"""Each training stage's logged metrics (loss, learning rate, in-training evaluation), one step per line."""


def _list(path: Path) -> str:
    return json.dumps([str(path)])


def _value(value: Any) -> str:
    return json.dumps(str(value))


def make_data(config: QuickstartConfig, out: Path) -> StageResult:
    """Paraphrase pairs (stage 1), drawn scenes with captions (stage 2), the held-out synthetic benchmark."""
    from unime.data_synth.pairs import write_image_caption_pairs
    from unime.data_synth.text_pairs import write_text_pairs
    from unime.eval.synthetic import write_synthetic_benchmark

    sizes = config.data
    parts: dict[str, Callable[[], dict[str, Path]]] = {
        "text": lambda: write_text_pairs(
            out / "text", train=sizes.text_train, held_out=sizes.text_held_out, seed=config.seed
        ),
        "shapes": lambda: write_image_caption_pairs(
            out / "shapes",
            train=sizes.shapes_train,
            held_out=sizes.shapes_held_out,
            negatives=sizes.shapes_negatives,
            seed=config.seed,
        ),
        "benchmark": lambda: {
            "root": write_synthetic_benchmark(
                out / "benchmark",
                seed=config.seed,
                queries=sizes.benchmark_queries,
                candidates=sizes.benchmark_candidates,
            )
        },
    }
    artefacts = {"folder": str(out)}
    for name, write in tqdm(parts.items(), desc="synthetic data", total=len(parts)):
        artefacts.update({f"{name}_{split}": str(path) for split, path in write().items()})
    return StageResult(artefacts=artefacts)


def train_stage(
    config: QuickstartConfig,
    stage: TrainStage,
    out: Path,
    *,
    start: str,
    rows: tuple[str, str],
    evaluate: Callable,
    overrides: list[str] = (),
) -> StageResult:
    """Train a recipe config from `start` on `rows` = (training, held-out) files, with the quickstart's overrides
    on top; the model goes to `<out>/final`, the loop's logged metrics to `<out>/train_log.jsonl`.

    `evaluate(model, held_out_rows) -> metrics` is the in-training evaluation. A finished model is reused; an
    interrupted run resumes from its latest checkpoint.
    """
    from unime.train.config import load_train_config
    from unime.train.data import load_recipe_data
    from unime.train.loop import train
    from unime.train.model import load_for_training

    out.mkdir(parents=True, exist_ok=True)  # a stage training two models gives each a folder of its own
    final = out / "final"
    log_path = out / TRAIN_LOG
    artefacts = {"model": str(final), "train_log": str(log_path)}
    if (final / "unime_config.json").is_file():
        return StageResult(artefacts=artefacts)
    common = [
        f"output_dir={_value(out)}",
        "log_with=[]",
        f"seed={config.seed}",
        f"optim.max_steps={stage.max_steps}",
        f"model.name_or_path={_value(start)}",
        f"model.seed={config.seed}",
        f"data.train_files={_list(rows[0])}",
        f"data.eval_files={_list(rows[1])}",
    ]
    train_config = load_train_config(recipe_config_path(config, stage.config), [*common, *overrides, *stage.overrides])
    model = load_for_training(train_config.model)
    examples, held_out = load_recipe_data(train_config.data)

    def log_step(step: int, logs: dict[str, float]) -> None:
        with log_path.open("a") as handle:  # a resumed run logs its steps again: readers keep the last values
            handle.write(json.dumps({"step": step, **logs}) + "\n")

    def eval_hook(model, step):
        metrics = evaluate(model, held_out)
        log_step(step, {f"eval/{key}": value for key, value in metrics.items()})  # the final evaluation too
        return metrics

    train(train_config, model, examples, eval_hook=eval_hook if held_out else None, on_step=log_step)
    return StageResult(artefacts=artefacts)


def _embedder_eval(model, rows):
    from unime.train.evaluation import retrieval_recall

    return retrieval_recall(model, rows)


def _reranker_eval(seed: int):
    def evaluate(model, rows):
        from unime.train.evaluation import reranking_metrics

        return reranking_metrics(model, rows, seed=seed)

    return evaluate


def run_stage1(config: QuickstartConfig, data: dict[str, str], out: Path) -> StageResult:
    """UniME stage 1: the tiny model's language model distils the MiniLM teacher on paraphrase pairs."""
    return train_stage(
        config,
        config.stage1,
        out,
        start=f"tiny:{config.backbone}",
        rows=(data["text_train"], data["text_held_out"]),
        evaluate=_embedder_eval,
        overrides=[f"distill.cache_dir={_value(out.parent / 'teacher_cache')}"],
    )


def run_mining(config: QuickstartConfig, data: dict[str, str], stage1: str, out: Path) -> StageResult:
    """Hard negatives mined with the stage-1 model, written into the stage-2 training rows (drawn scenes) and
    into the reranker's (paraphrase pairs)."""
    import unime
    from unime.data_synth.mining.miner import MiningConfig, mine_file
    from unime.embedding_store import model_fingerprint

    settings = config.mining
    progress = tqdm(total=3, desc="mining")
    embedder = unime.load(stage1)
    model_id = model_fingerprint(stage1)
    progress.update(1)

    def mine(rows: str, target: str, mining: MiningConfig):
        written = mine_file(embedder, rows, out / target, mining, model_id=model_id, cache_dir=out / "embedding-cache")
        progress.update(1)
        return written

    rows, manifest = mine(
        data["shapes_train"],
        "train.jsonl",
        MiningConfig(
            top_k=settings.top_k,
            negatives=settings.negatives,
            margin=settings.margin,
            keep_existing=settings.keep_existing,
            seed=config.seed,
        ),
    )
    text_rows, _ = mine(
        data["text_train"],
        "text_train.jsonl",
        MiningConfig(top_k=settings.top_k, negatives=settings.text_negatives, margin=math.inf, seed=config.seed),
    )
    progress.close()
    details = manifest.details
    metrics = {
        "rows": manifest.kept,
        "dropped_by_margin": details["dropped_by_margin"],
        "rows_short_of_negatives": details["rows_short_of_negatives"],
    }
    return StageResult(artefacts={"rows": str(rows), "text_rows": str(text_rows)}, metrics=metrics)


def run_stage2(config: QuickstartConfig, data: dict[str, str], stage1: str, mined: str, out: Path) -> StageResult:
    """UniME stage 2 from the stage-1 model, on the rows with mined negatives."""
    return train_stage(
        config,
        config.stage2,
        out,
        start=stage1,
        rows=(mined, data["shapes_held_out"]),
        evaluate=_embedder_eval,
        overrides=[f"data.num_negatives={config.mining.negatives}"],
    )


def reranker_rows(config: QuickstartConfig, data: dict[str, str], mined: dict[str, str]) -> tuple[str, str]:
    """The reranker's (training, held-out) rows, as `reranker.data` chooses (`mined`: the mining artefacts)."""
    choice = config.reranker.data
    if choice == "text_mined":
        return mined["text_rows"], data["text_held_out"]
    if choice == "text":
        return data["text_train"], data["text_held_out"]
    if choice == "shapes":
        return data["shapes_train"], data["shapes_held_out"]
    return mined["rows"], data["shapes_held_out"]


def run_reranker(
    config: QuickstartConfig, data: dict[str, str], mined: dict[str, str], models: dict[str, str], out: Path
) -> StageResult:
    """The yes/no reranker, from a tiny random model or an embedder's weights (`models`: stage name -> model)."""
    rows = reranker_rows(config, data, mined)
    start = f"tiny:{config.backbone}" if config.reranker.start == "tiny" else models[config.reranker.start]
    stage = TrainStage(config.reranker.config, config.reranker.max_steps, config.reranker.overrides)
    result = train_stage(
        config,
        stage,
        out,
        start=start,
        rows=rows,
        evaluate=_reranker_eval(config.seed),
        overrides=[
            "model.kind=reranker",
            f"data.num_negatives={0 if config.reranker.data == 'text' else config.reranker.mined_negatives}",
            f"data.random_negatives={config.reranker.random_negatives}",
        ],
    )
    result.artefacts["held_out"] = rows[1]
    return result


def run_eval(
    config: QuickstartConfig, data: dict[str, str], models: dict[str, str], reranker_held_out: str, out: Path
) -> StageResult:
    """Every model on held-out data (see `unime.quickstart.evaluate`); the numbers go to `<out>/metrics.json`."""
    from unime.quickstart.evaluate import HeldOut, evaluate_all

    held_out = HeldOut(
        text=Path(data["text_held_out"]),
        shapes=Path(data["shapes_held_out"]),
        reranker=Path(reranker_held_out),
        benchmark=Path(data["benchmark_root"]),
    )
    evaluated = evaluate_all({k: Path(v) for k, v in models.items()}, held_out, config, out)
    path = out / "metrics.json"
    write_json_atomic(path, evaluated)
    return StageResult(artefacts={"metrics": str(path)}, metrics=evaluated)


def run_serve_check(config: QuickstartConfig, stage2: str, reranker: str, out: Path) -> StageResult:
    """The served-model check of `unime.quickstart.server_check`; its findings go to `<out>/serve_check.json`."""
    from unime.quickstart.server_check import check_server

    result = check_server(
        Path(stage2),
        Path(reranker),
        out / "server.log",
        backend=config.serve.backend,
        startup_timeout_s=config.serve.startup_timeout_s,
        extra_args=config.serve.extra_args,
    )
    path = out / "serve_check.json"
    write_json_atomic(path, result)
    return StageResult(artefacts={"result": str(path), "log": str(out / "server.log")}, metrics=result)


def _multi_vector_eval(model, rows):
    from unime.train.evaluation import retrieval_recall

    return retrieval_recall(model, rows, multi_vector=True)


def run_multi_vector(config: QuickstartConfig, out: Path) -> StageResult:
    """Drawn document pages (`unime synth pages`); a multi-vector (late-interaction) model and a single-vector model
    trained on them from the same tiny start; both scored on the held-out pages, whose numbers go to
    `<out>/metrics.json`."""
    from unime.data_synth.pages import PagesSynthConfig, write_pages
    from unime.quickstart.evaluate import evaluate_visdoc

    settings = config.multi_vector
    pages = PagesSynthConfig(
        train=settings.train_pages,
        held_out=settings.held_out_pages,
        negatives=settings.negatives,
        kinds=list(settings.page_kinds),
        ask=None if settings.ask is None else list(settings.ask),
        seed=config.seed,
        records_per_shard=max(settings.train_pages, settings.held_out_pages, 1),  # one file per split to train on
    )
    written = write_pages(out / "pages", pages)
    rows = (str(written.shard_paths("train")[0]), str(written.shard_paths("held_out")[0]))
    budget = [] if settings.max_pixels is None else [f"model.max_pixels={settings.max_pixels}"]
    stage = TrainStage(settings.config, settings.max_steps, [*budget, *settings.overrides])
    start = f"tiny:{config.backbone}"
    once = ["eval_every=0"]  # the held-out rows are checked once, at the end (the stage's own numbers come after)
    models = {
        "multi_vector": train_stage(
            config, stage, out / "multi", start=start, rows=rows, evaluate=_multi_vector_eval, overrides=once
        ),
        "single_vector": train_stage(
            config,
            stage,
            out / "single",
            start=start,
            rows=rows,
            evaluate=_embedder_eval,
            overrides=[*once, *settings.single_vector_overrides],
        ),
    }
    paths = {name: Path(result.artefacts["model"]) for name, result in models.items()}
    metrics = evaluate_visdoc(paths, written.visdoc, config)
    path = out / "metrics.json"
    write_json_atomic(path, metrics)
    artefacts = {
        "model": str(paths["multi_vector"]),
        "single_vector_model": str(paths["single_vector"]),
        "train_log": models["multi_vector"].artefacts["train_log"],
        "metrics": str(path),
    }
    return StageResult(artefacts=artefacts, metrics=metrics)


def run_quickstart_command(settings: QuickstartCommand) -> int:
    """`unime quickstart`: run (or resume) the pipeline with the command's settings."""
    fields = dataclasses.fields(QuickstartConfig)
    config = QuickstartConfig(**{field.name: getattr(settings, field.name) for field in fields})
    run_quickstart(config, stop_after=settings.stop_after)
    return 0


def run_quickstart(config: QuickstartConfig, *, stop_after: str | None = None) -> dict[str, dict[str, Any]]:
    """Run (or resume) every stage up to `stop_after` (default: all); returns the stages' records."""
    from unime.quickstart.report import write_report

    if stop_after is not None and stop_after not in STAGES:
        raise ConfigError(f"stop_after {stop_after!r}: expected one of {list(STAGES)}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runner = StageRunner(out)
    settings = dataclasses.asdict(config)
    settings.pop("out")

    def artefact(stage: str, name: str) -> str:
        return runner.records[stage]["artefacts"][name]

    steps: list[tuple[str, str, Any, Path | None, Callable[[], StageResult]]] = [
        (
            "data",
            "synthetic data",
            [settings["seed"], settings["data"]],
            out / "data",
            lambda: make_data(config, out / "data"),
        ),
        (
            "stage1",
            "text-distilled model",
            [settings["backbone"], settings["stage1"]],
            out / "stage1",
            lambda: run_stage1(config, runner.records["data"]["artefacts"], out / "stage1"),
        ),
        (
            "mining",
            "training rows with mined negatives",
            settings["mining"],
            out / "mining",
            lambda: run_mining(
                config, runner.records["data"]["artefacts"], artefact("stage1", "model"), out / "mining"
            ),
        ),
        (
            "stage2",
            "instruction-tuned embedder",
            settings["stage2"],
            out / "stage2",
            lambda: run_stage2(
                config,
                runner.records["data"]["artefacts"],
                artefact("stage1", "model"),
                artefact("mining", "rows"),
                out / "stage2",
            ),
        ),
        (
            "reranker",
            "reranker",
            settings["reranker"],
            out / "reranker",
            lambda: run_reranker(
                config,
                runner.records["data"]["artefacts"],
                runner.records["mining"]["artefacts"],
                {name: artefact(name, "model") for name in ("stage1", "stage2")},
                out / "reranker",
            ),
        ),
        (
            "eval",
            "metrics of every stage",
            settings["eval"],
            out / "eval",
            lambda: run_eval(
                config,
                runner.records["data"]["artefacts"],
                {name: artefact(name, "model") for name in ("stage1", "stage2", "reranker")},
                artefact("reranker", "held_out"),
                out / "eval",
            ),
        ),
    ]
    if config.serve.enabled:
        steps.append(
            (
                "serve",
                "served-model check",
                settings["serve"],
                out / "serve",
                lambda: run_serve_check(
                    config, artefact("stage2", "model"), artefact("reranker", "model"), out / "serve"
                ),
            )
        )
    if config.multi_vector.enabled:
        # After the others: a run from before this stage existed keeps every finished stage's fingerprint.
        steps.append(
            (
                "multi_vector",
                "multi-vector model on drawn pages",
                [settings["seed"], settings["backbone"], settings["multi_vector"]],
                out / "multi_vector",
                lambda: run_multi_vector(config, out / "multi_vector"),
            )
        )
    if config.three_heads.enabled:
        # Last of the training stages, so that adding it left every earlier stage's fingerprint as it was.
        steps.append(
            (
                "three_heads",
                "one checkpoint with three heads, retrieve then rerank",
                settings["three_heads"],  # the chain of fingerprints carries every earlier stage's settings
                out / "three_heads",
                lambda: run_three_heads(
                    config,
                    runner.records["data"]["artefacts"],
                    artefact("stage1", "model"),
                    runner.records["mining"]["artefacts"],
                    out / "three_heads",
                ),
            )
        )
    for name, label, stage_settings, work_dir, action in steps:
        runner.run(name, label, stage_settings, work_dir, action)
        if name == stop_after:
            print(f"stopped after stage {name}; run the same command again to go on")
            return runner.records
    report = write_report(config, runner.records, out, seconds=time.perf_counter() - started)
    print(f"stage report: report -> {report}")
    print(f"\nThe report is in {report}")
    return runner.records
