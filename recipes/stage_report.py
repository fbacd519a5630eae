"""Recall before and after each UniME stage on the embedded default: the table in the README.

Runs, on the tiny Qwen2-VL built in code and data generated in code: stage 1 (text distillation from the offline
MiniLM teacher), stage 2 from the stage-1 model, and stage 2 alone from the untrained model, then prints
text-to-text recall@1 (held-out paraphrase pairs) and image-to-text recall@1 (held-out drawn scenes) of each.

    OMP_NUM_THREADS=1 .venv/bin/python recipes/stage_report.py [--out runs/stage_report]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    import importlib.util

    import unime
    from unime.data.dataset import load_examples
    from unime.data_synth.pairs import write_image_caption_pairs
    from unime.data_synth.text_pairs import write_text_pairs
    from unime.train.evaluation import retrieval_recall

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/stage_report")
    args = parser.parse_args(argv)
    out = Path(args.out)
    text = write_text_pairs(out / "data" / "text")
    shapes = write_image_caption_pairs(out / "data" / "shapes")

    spec = importlib.util.spec_from_file_location("train_embedder", HERE / "train_embedder.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)

    def run(config: str, name: str, *overrides: str) -> Path:
        return recipe.main(
            ["--config", str(HERE / "configs" / config), f"output_dir={out / name}", "log_with=[]", *overrides]
        )

    stage1 = run(
        "stage1_text_distill.yaml",
        "stage1",
        f"data.train_files=[{text['train']}]",
        f"data.eval_files=[{text['held_out']}]",
        f"distill.cache_dir={out / 'teacher_cache'}",
    )
    shape_data = [f"data.train_files=[{shapes['train']}]", f"data.eval_files=[{shapes['held_out']}]"]
    after_both = run("stage2_hardneg_instruct.yaml", "stage2_from_stage1", f"model.name_or_path={stage1}", *shape_data)
    stage2_alone = run("stage2_hardneg_instruct.yaml", "stage2_alone", *shape_data)

    text_held_out, _ = load_examples([text["held_out"]])
    shapes_held_out, _ = load_examples([shapes["held_out"]])
    models = {
        "before stage 1 (untrained tiny Qwen2-VL)": unime.build_tiny("qwen2_vl"),
        "after stage 1": unime.load(stage1),
        "after stage 2 from stage 1": unime.load(after_both),
        "after stage 2 alone": unime.load(stage2_alone),
    }
    table = {}
    print("\n| model | text-to-text recall@1 | image-to-text recall@1 | hard-negative accuracy |")
    print("|---|---|---|---|")
    for name, model in models.items():
        t2t = retrieval_recall(model, text_held_out)["recall@1"]
        i2t = retrieval_recall(model, shapes_held_out)
        table[name] = {"t2t_recall@1": t2t, "i2t_recall@1": i2t["recall@1"], "hn_acc": i2t["hard_negative_accuracy"]}
        print(f"| {name} | {t2t:.2f} | {i2t['recall@1']:.2f} | {i2t['hard_negative_accuracy']:.2f} |")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
