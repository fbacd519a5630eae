"""The page generator: reproducible pages, one-fact queries, negatives that change only that fact, clean splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from unime.data.dataset import load_examples
from unime.data_synth.pages import (
    SOURCE,
    STATUSES,
    PagesSynthConfig,
    draw_page,
    plan,
    write_pages,
)
from unime.errors import ConfigError
from unime.eval.visdoc import load_visdoc

CONFIG = PagesSynthConfig(train=8, held_out=4, negatives=3, queries_per_page=2, seed=3, width=192, height=256)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pages")
    return folder, write_pages(folder, CONFIG)


def test_the_same_seed_gives_byte_identical_images_and_rows(written, tmp_path):
    folder, _ = written
    write_pages(tmp_path / "again", CONFIG)
    first, second = files_of(folder), files_of(tmp_path / "again")
    assert first == second
    assert any(name.endswith(".png") for name in first) and "visdoc/qrels.jsonl" in first
    # Another seed gives other pages: the output depends on the seed.
    other = plan(PagesSynthConfig(**{**CONFIG.__dict__, "seed": 4}))
    assert {q.page.key() for q in other}.isdisjoint({q.page.key() for q in plan(CONFIG)})


def test_held_out_shares_no_page_and_no_layout_seed_with_training(written):
    queries = list(plan(CONFIG))
    by_split = {split: [q for q in queries if q.split == split] for split in ("train", "held_out")}
    assert len(by_split["train"]) == 8 * 2 and len(by_split["held_out"]) == 4 * 2
    pages = {split: {p.key() for q in qs for p in (q.page, *q.negatives)} for split, qs in by_split.items()}
    seeds = {split: {q.page.layout_seed for q in qs} for split, qs in by_split.items()}
    assert pages["train"].isdisjoint(pages["held_out"])
    assert seeds["train"].isdisjoint(seeds["held_out"]) and len(seeds["train"]) == 8 and len(seeds["held_out"]) == 4
    # No page is repeated anywhere in the run: every positive and negative is distinct.
    every = [p.key() for q in queries for p in q.negatives] + list({q.page.key() for q in queries})
    assert len(every) == len(set(every))
    folder, _ = written
    images = {split: set(files_of(folder / split / "images")) for split in by_split}
    assert images["train"].isdisjoint(images["held_out"])


def test_each_negative_differs_from_its_positive_in_exactly_the_asked_fact(written):
    folder, _ = written
    for split in ("train", "held_out"):
        for line in (folder / split / "facts.jsonl").read_text().splitlines():
            record = json.loads(line)
            positive = record["page"]
            positive_image = Image.open(folder / split / positive["image"]).convert("RGB")
            assert len(record["negatives"]) == CONFIG.negatives
            for negative in record["negatives"]:
                # The structured records: the same page but for the asked fact's value.
                assert {k: v for k, v in negative.items() if k not in ("blocks", "image")} == {
                    k: v for k, v in positive.items() if k not in ("blocks", "image")
                }
                changed = [
                    (b, i)
                    for b, (pb, nb) in enumerate(zip(positive["blocks"], negative["blocks"], strict=True))
                    for i, (pv, nv) in enumerate(zip(pb["values"], nb["values"], strict=True))
                    if pv != nv
                ]
                for pb, nb in zip(positive["blocks"], negative["blocks"], strict=True):
                    assert {k: v for k, v in pb.items() if k != "values"} == {
                        k: v for k, v in nb.items() if k != "values"
                    }
                assert len(changed) == 1
                block, index = changed[0]
                assert record["fact"].startswith(f"{block}/")
                assert positive["blocks"][block]["values"][index] == record["answer"]
                # The images differ, and only in a small region (the one value redrawn, not the layout).
                negative_image = Image.open(folder / split / negative["image"]).convert("RGB")
                box = ImageChops.difference(positive_image, negative_image).getbbox()
                assert box is not None
                area = (box[2] - box[0]) * (box[3] - box[1])
                assert area < 0.25 * CONFIG.width * CONFIG.height, (record["key"], box)


def test_the_query_names_the_answer_that_only_the_positive_holds():
    for query in plan(CONFIG):
        assert query.page.facts()[query.fact] == query.answer
        assert query.answer in query.text
        for negative in query.negatives:
            facts = negative.facts()
            assert facts[query.fact] != query.answer and query.answer not in facts[query.fact].split()
            assert {k: v for k, v in facts.items() if k != query.fact} == {
                k: v for k, v in query.page.facts().items() if k != query.fact
            }
            assert negative.with_fact(query.fact, query.answer) == query.page
    # Queries ask about every kind of block.
    asked = {q.page.blocks[int(q.fact.split("/")[0])].kind for q in plan(CONFIG)}
    assert asked == {"table", "bar_chart", "line_chart", "form"}


STAMPS = PagesSynthConfig(
    train=6, held_out=4, negatives=3, seed=2, kinds=["table", "bar_chart", "line_chart", "form", "status"]
)


def test_status_stamps_are_asked_and_seen_in_their_colour():
    """With `ask: [status]` every page holds a status stamp and every query asks for it; a negative is the page with
    another status, whose image differs in the stamp's badge only, filled with that status's colour."""
    config = PagesSynthConfig(**{**STAMPS.__dict__, "ask": ["status"]})
    queries = list(plan(config))
    assert len(queries) == 10
    for query in queries:
        block = query.page.blocks[int(query.fact.partition("/")[0])]
        assert block.kind == "status" and query.answer in STATUSES and query.answer in query.text
        assert len({query.answer, *(n.facts()[query.fact] for n in query.negatives)}) == 1 + config.negatives
        positive = draw_page(query.page, config.width, config.height)
        for negative in query.negatives:
            drawn = draw_page(negative, config.width, config.height)
            box = ImageChops.difference(positive, drawn).getbbox()
            # The badge only: one of the two blocks, under its caption (about a third of the page).
            assert (box[2] - box[0]) * (box[3] - box[1]) < 0.4 * config.width * config.height, (query.key, box)
            for image, status in ((positive, query.answer), (drawn, negative.facts()[query.fact])):
                # The most common colour where the two pages differ is the badge's fill (its word is drawn on it).
                _, colour = max(image.crop(box).getcolors(config.width * config.height))
                assert colour == STATUSES[status], (query.key, status, colour)
    # Without `ask`, stamps are one kind among the others: some pages have none, and queries ask any block.
    kinds = [{b.kind for b in q.page.blocks} for q in plan(PagesSynthConfig(**{**STAMPS.__dict__, "train": 30}))]
    assert any("status" in k for k in kinds) and any("status" not in k for k in kinds)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"ask": ["status"], "kinds": ["table", "form"]}, "ask: expected one or more of kinds"),
        ({"kinds": ["table"]}, "kinds: expected two or more of"),
        ({"kinds": ["table", "poster"]}, "kinds: expected two or more of"),
        ({"ask": ["status"], "negatives": 10}, "negatives must be at most 9 with status stamps"),
        ({"ask": ["status"], "queries_per_page": 2}, "queries_per_page must be in 1..1"),
        ({"queries_per_page": 6}, "queries_per_page must be in 1..5"),
    ],
)
def test_bad_block_settings_are_refused(settings, named):
    with pytest.raises(ConfigError, match=named):
        list(plan(PagesSynthConfig(**{**STAMPS.__dict__, **settings})))


def test_drawing_is_the_same_for_equal_records_and_differs_for_one_changed_value():
    query = next(iter(plan(CONFIG)))
    a, b = draw_page(query.page, 192, 256), draw_page(query.page, 192, 256)
    assert a.tobytes() == b.tobytes()
    assert draw_page(query.negatives[0], 192, 256).tobytes() != a.tobytes()


def test_rows_load_as_training_examples(written):
    _, result = written
    for split, pages in (("train", 8), ("held_out", 4)):
        examples, report = load_examples(result.shard_paths(split))
        assert len(examples) == pages * CONFIG.queries_per_page and report.skipped == 0
        for example in examples:
            assert example.source == SOURCE and example.query.text and example.query.image is None
            assert example.positive.image is not None and len(example.negatives) == CONFIG.negatives
            assert all(n.image is not None and n.image != example.positive.image for n in example.negatives)


def test_the_visdoc_folder_loads_with_the_eval_reader(written, tmp_path):
    folder, result = written
    assert result.visdoc == folder / "visdoc"
    dataset = load_visdoc(result.visdoc, image_dir=tmp_path)
    held_out = [q for q in plan(CONFIG) if q.split == "held_out"]
    assert [q.text for q in dataset.queries] == [q.text for q in held_out]
    assert len(dataset.pages) == len({p.key() for q in held_out for p in (q.page, *q.negatives)})
    for query, relevant in zip(held_out, dataset.relevant, strict=True):
        (page_index,) = relevant
        expected = (folder / "held_out" / query.page.file_name()).read_bytes()
        assert Path(dataset.pages[page_index].image).read_bytes() == expected


def test_the_command_writes_pages_and_refuses_bad_settings(tmp_path, capsys):
    from unime.cli import main

    out = tmp_path / "out"
    assert main(["synth", "pages", str(out), "--train", "3", "--held-out", "2", "--negatives", "2", "--seed", "1"]) == 0
    assert "visdoc:" in capsys.readouterr().out
    examples, _ = load_examples(sorted((out / "train").glob("shard-*.jsonl")))
    assert len(examples) == 3 and all(len(e.negatives) == 2 for e in examples)
    assert (out / "visdoc" / "corpus.jsonl").is_file() and (out / "held_out" / "facts.jsonl").is_file()
    for bad, named in ((["--negatives", "11"], "negatives must be in 0..10"), (["--max-shapes", "2"], "--max-shapes")):
        assert main(["synth", "pages", str(tmp_path / "bad"), "--train", "1", "--held-out", "1", *bad]) == 2
        error = capsys.readouterr().err
        assert named in error and "Traceback" not in error
    # Resuming the folder with other settings is refused, naming the difference; into a file, the path is named.
    assert main(["synth", "pages", str(out), "--train", "3", "--held-out", "2", "--negatives", "3", "--seed", "1"]) == 2
    assert "negatives: was 2, now 3" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("not a folder")
    assert main(["synth", "pages", str(tmp_path / "a-file"), "--train", "1", "--held-out", "1"]) == 2
    assert f"{tmp_path / 'a-file'}: cannot write the output folder there" in capsys.readouterr().err


def test_the_command_takes_the_block_kinds_and_what_queries_ask(tmp_path, capsys):
    from unime.cli import main

    out = tmp_path / "stamps"
    argv = ["synth", "pages", str(out), "--train", "4", "--held-out", "2", "--page-kinds", "table", "status"]
    assert main([*argv, "--ask", "status"]) == 0
    facts = [json.loads(line) for line in (out / "train" / "facts.jsonl").read_text().splitlines()]
    assert len(facts) == 4
    for fact in facts:
        assert {block["kind"] for block in fact["page"]["blocks"]} == {"table", "status"}, fact
        assert fact["fact"].endswith("/Status"), fact  # every query asks about the status stamp
    capsys.readouterr()
    assert main(["synth", "text", str(tmp_path / "text"), "--ask", "status"]) == 2
    assert "--page-kinds and --ask apply to `unime synth pages` only" in capsys.readouterr().err


@pytest.mark.parametrize(("width", "height"), [(128, 160), (1000, 160), (128, 1000), (640, 200)])
def test_pages_of_any_allowed_size_draw(width, height):
    """Narrow, wide and small pages all draw (a wide page takes its text size from its height)."""
    for query in plan(PagesSynthConfig(train=0, held_out=4, negatives=2, seed=3, width=width, height=height)):
        for page in (query.page, *query.negatives):
            assert draw_page(page, width, height).size == (width, height)


def test_a_page_too_small_for_its_text_is_refused():
    with pytest.raises(ConfigError, match="at least 128 wide and 160 high, got 300x128"):
        list(plan(PagesSynthConfig(train=0, held_out=1, width=300, height=128)))
