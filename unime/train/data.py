"""A recipe's data: the training rows (validated, bad ones skipped or fatal as configured) and the held-out rows."""

from __future__ import annotations

from unime.data.dataset import load_examples
from unime.data.schema import TrainExample
from unime.train.config import DataSettings


def load_recipe_data(data: DataSettings) -> tuple[list[TrainExample], list[TrainExample]]:
    """`(training examples, held-out examples)`; prints what was kept and why rows were skipped.

    Held-out rows are always strict: a bad evaluation row would silently change the metric.
    """
    examples, report = load_examples(
        data.train_files,
        image_root=data.image_root,
        on_error=data.on_bad_rows,
        check_images=data.check_images,
        min_negatives=1 if data.num_negatives else 0,
    )
    print(f"training data: {report.summary()}")
    for message in report.examples_of_errors:
        print(f"  skipped {message}")
    held_out: list[TrainExample] = []
    if data.eval_files:
        held_out, _ = load_examples(data.eval_files, image_root=data.image_root, on_error="raise")
    return list(examples), list(held_out)
