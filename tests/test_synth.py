"""Tests for chartvlm.synth: determinism, exact answers (re-derived independently), splits, style."""

from __future__ import annotations

import io
import json
import logging
import random
import re
import struct
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal

import pytest

datasets = pytest.importorskip("datasets")
pytest.importorskip("matplotlib")

from chartvlm import synth  # noqa: E402
from chartvlm.errors import ChartVLMError  # noqa: E402

N_CHARTS = 30
SEED = 7
SIZE = (320, 240)
# Families whose answer is a number read off the chart: only honest when the values are printed.
READ_OFF_FAMILIES = {"value_retrieval", "max_value", "min_value", "difference", "sum", "average"}


def _raw_rows(dataset_dict) -> dict[str, list[dict]]:
    """All rows with the image as its stored PNG bytes (not decoded)."""
    out = {}
    for split, ds in dataset_dict.items():
        raw = ds.cast_column("image", datasets.Image(decode=False))
        out[split] = [dict(row) for row in raw]
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The same dataset built twice: two worker processes, then in-process."""
    base = tmp_path_factory.mktemp("synth")
    with_pool = synth.synthesize(base / "pool", N_CHARTS, seed=SEED, num_workers=2, image_size=SIZE)
    in_process = synth.synthesize(base / "inproc", N_CHARTS, seed=SEED, num_workers=1, image_size=SIZE)
    return {"pool": with_pool, "inproc": in_process, "base": base}


@pytest.fixture(scope="module")
def rows(built) -> dict[str, list[dict]]:
    return _raw_rows(built["pool"])


def _all_rows(rows):
    return rows["train"] + rows["test"]


# ---------------------------------------------------------------------------------------------
# An independent answer checker: finds the entities named in the query and recomputes the answer
# from the stored table. It shares no code with chartvlm.synth.


def _mentions(query: str, names: list[str]) -> list[str]:
    """Names occurring as whole words (case-sensitive), in order of appearance; longest name wins."""
    taken: list[tuple[int, int, str]] = []
    for name in sorted(set(names), key=len, reverse=True):
        for m in re.finditer(r"(?<!\w)" + re.escape(name) + r"(?!\w)", query):
            if all(m.end() <= s or m.start() >= e for s, e, _ in taken):
                taken.append((m.start(), m.end(), name))
    return [name for _, _, name in sorted(taken)]


def _fmt(value: Decimal) -> str:
    text = f"{value:f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def _expected_answer(query: str, qtype: str, table: dict) -> str:
    categories = table["categories"]
    series = {s["name"]: [Decimal(str(v)) for v in s["values"]] for s in table["series"]}
    multi = len(series) > 1
    only = next(iter(series))
    readable = table["value_labels"] or table["chart_type"] == "pie"
    largest_value = max(v for vs in series.values() for v in vs)

    def value(s, c):
        return series[s][categories.index(c)]

    threshold_match = re.search(r"\b(above|below) (\d+(?:\.\d+)?)\b", query)
    entity_text = query.replace(threshold_match.group(0), "") if threshold_match else query
    cats = _mentions(entity_text, categories)
    sers = _mentions(entity_text, list(series)) if multi else []
    one_series = sers[0] if sers else only

    def unique_best(named: dict, largest: bool) -> str:
        ranked = sorted(named.items(), key=lambda kv: kv[1], reverse=largest)
        assert ranked[0][1] != ranked[1][1], f"tie in {query!r}"
        if not readable:  # the winner must be visibly ahead on an unlabelled chart
            assert abs(ranked[0][1] - ranked[1][1]) >= Decimal("0.05") * largest_value, query
        return ranked[0][0]

    if qtype == "value_retrieval":
        assert len(cats) == 1, query
        return _fmt(value(sers[0] if multi else only, cats[0]))
    if qtype in ("argmax", "argmin"):
        largest = qtype == "argmax"
        if multi and len(cats) == 1 and not sers:
            return unique_best({s: value(s, cats[0]) for s in series}, largest)
        return unique_best(dict(zip(categories, series[one_series])), largest)
    if qtype in ("max_value", "min_value"):
        pool = series[sers[0]] if sers else [v for vs in series.values() for v in vs]
        return _fmt(max(pool) if qtype == "max_value" else min(pool))
    if qtype == "compare_yes_no":
        asks_greater = bool(re.search(r"\b(greater|higher|more|larger)\b", query))
        asks_less = bool(re.search(r"\b(less|lower|smaller|fewer)\b", query))
        assert asks_greater != asks_less, query
        if len(cats) == 2:
            a, b = value(one_series, cats[0]), value(one_series, cats[1])
        else:
            assert len(cats) == 1 and len(sers) == 2, query
            a, b = value(sers[0], cats[0]), value(sers[1], cats[0])
        assert a != b
        if not readable:
            assert abs(a - b) >= Decimal("0.05") * largest_value, query
        return "Yes" if (a > b) == asks_greater else "No"
    if qtype == "difference":
        if len(cats) == 2:
            a, b = value(one_series, cats[0]), value(one_series, cats[1])
            if "exceed" in query:
                assert a > b, query
        elif len(sers) == 2:
            assert len(cats) == 1, query
            a, b = value(sers[0], cats[0]), value(sers[1], cats[0])
        else:
            assert re.search(r"highest|largest", query) and re.search(r"lowest|smallest", query), query
            a, b = max(series[one_series]), min(series[one_series])
        return _fmt(abs(a - b))
    if qtype in ("sum", "average"):
        if len(cats) >= 2:
            pool = [value(one_series, c) for c in cats]
        elif len(cats) == 1:
            assert multi, query
            pool = [value(s, cats[0]) for s in series]
        else:
            pool = series[one_series]
        total = sum(pool)
        if qtype == "sum":
            return _fmt(total)
        return _fmt((total / len(pool)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))
    if qtype == "count":
        if threshold_match:
            threshold = Decimal(threshold_match.group(2))
            values = series[one_series]
            assert threshold not in values, f"threshold equals a value: {query!r}"
            above = threshold_match.group(1) == "above"
            return str(sum(1 for v in values if (v > threshold if above else v < threshold)))
        if "legend" in query:
            return str(len(series))
        return str(len(categories))
    if qtype == "legend_mapping":
        colours = {s["color"]: s["name"] for s in table["series"]}
        named = [c for c in colours if re.search(r"\b" + re.escape(c) + r"\b", query)]
        assert len(named) == 1, query
        return colours[named[0]]
    if qtype == "line_peak":
        assert table["chart_type"] == "line"
        return unique_best(dict(zip(categories, series[one_series])), largest=True)
    raise AssertionError(f"unknown question_type {qtype}")


# ---------------------------------------------------------------------------------------------
# Dataset-level tests


def test_same_seed_gives_identical_bytes_and_rows_for_any_worker_count(built, rows):
    assert _raw_rows(built["inproc"]) == rows
    assert sum(len(r) for r in rows.values()) >= N_CHARTS * 2


def test_different_seed_gives_different_charts(tmp_path):
    a = synth._make_chart_rows((SEED, 0, SIZE, 3))
    b = synth._make_chart_rows((SEED + 1, 0, SIZE, 3))
    assert a[0]["image"]["bytes"] != b[0]["image"]["bytes"]


def test_every_answer_is_recomputed_from_the_table(rows):
    checked = Counter()
    for row in _all_rows(rows):
        table = json.loads(row["table"])
        assert row["label"] == [_expected_answer(row["query"], row["question_type"], table)], row["query"]
        checked[row["question_type"]] += 1
    assert set(checked) == set(synth.QUESTION_TYPES), checked


def test_read_off_questions_only_on_charts_that_print_their_values(rows):
    for row in _all_rows(rows):
        table = json.loads(row["table"])
        if row["question_type"] in READ_OFF_FAMILIES or re.search(r"\b(above|below) \d", row["query"]):
            assert table["value_labels"] or table["chart_type"] == "pie", row["query"]
        if row["question_type"] == "legend_mapping":
            assert len(table["series"]) > 1


def test_splits_share_no_chart_and_hold_whole_charts(rows):
    train_ids = {r["chart_id"] for r in rows["train"]}
    test_ids = {r["chart_id"] for r in rows["test"]}
    assert not train_ids & test_ids
    assert len(train_ids) + len(test_ids) == N_CHARTS
    assert len(test_ids) == round(N_CHARTS * 0.2)
    # One chart id always has the same image and table.
    by_chart = {}
    for row in _all_rows(rows):
        key = (row["image"]["bytes"], row["table"], row["chart_type"])
        assert by_chart.setdefault(row["chart_id"], key) == key


def test_chart_types_and_question_families_all_appear(rows):
    assert {r["chart_type"] for r in _all_rows(rows)} == set(synth.CHART_TYPES)
    assert {r["question_type"] for r in _all_rows(rows)} == set(synth.QUESTION_TYPES)


def test_both_human_and_machine_questions_in_both_splits(rows):
    for split_rows in rows.values():
        assert {r["human_or_machine"] for r in split_rows} == {0, 1}
    share_human = sum(r["human_or_machine"] == 0 for r in _all_rows(rows)) / len(_all_rows(rows))
    assert 0.2 <= share_human <= 0.5


def test_labels_follow_chartqa_style(rows):
    for row in _all_rows(rows):
        (label,) = row["label"]
        assert label and label == label.strip()
        assert "%" not in label and "," not in label
        if re.fullmatch(r"-?[\d.]+", label):
            # Minimal digits: 12 not 12.0, 6.8 not 6.80, no exponent.
            assert re.fullmatch(r"-?(0|[1-9]\d*)(\.\d*[1-9])?", label), label


def test_questions_are_distinct_within_a_chart(rows):
    per_chart = Counter((r["chart_id"], r["query"]) for r in _all_rows(rows))
    assert max(per_chart.values()) == 1
    assert Counter(r["chart_id"] for r in _all_rows(rows)).most_common(1)[0][1] <= 3


def _png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append(data[pos + 4:pos + 8])
        pos += 12 + length
    return chunks


def test_images_are_rgb_pngs_of_the_requested_size_without_metadata(built, rows):
    from PIL import Image

    decoded = built["pool"]["train"][0]["image"]
    assert decoded.mode == "RGB" and decoded.size == SIZE
    for row in rows["test"]:
        data = row["image"]["bytes"]
        assert not {b"tEXt", b"iTXt", b"zTXt", b"tIME"} & set(_png_chunks(data))
        with Image.open(io.BytesIO(data)) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", SIZE)


def test_saved_schema_matches_the_chartqa_schema(built):
    ds = datasets.load_from_disk(str(built["base"] / "pool"))
    assert set(ds) == {"train", "test"}
    features = ds["train"].features
    assert isinstance(features["image"], datasets.Image)
    assert features["label"].feature.dtype == "string"
    assert features["human_or_machine"].dtype == "int64"
    assert list(features) == ["image", "query", "label", "human_or_machine", "chart_id", "chart_type",
                              "question_type", "table"]


def test_refuses_non_empty_out_dir_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "synthetic"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ChartVLMError, match="not empty"):
        synth.synthesize(out, 2, num_workers=1, image_size=(160, 120))
    assert (out / "keep.txt").read_text() == "mine"
    result = synth.synthesize(out, 2, num_workers=1, image_size=(160, 120), overwrite=True)
    assert not (out / "keep.txt").exists()
    assert sum(len(ds) for ds in result.values()) >= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]  # no temporary folders left


def test_failure_leaves_no_partial_dataset(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_render = synth.render_chart

    def failing_render(spec):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real_render(spec)

    monkeypatch.setattr(synth, "render_chart", failing_render)
    with pytest.raises(Exception, match="disk full"):
        synth.synthesize(tmp_path / "out", 5, num_workers=1, image_size=(160, 120))
    assert list(tmp_path.iterdir()) == []


def test_logs_the_rendering_rate(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="chartvlm.synth"):
        synth.synthesize(tmp_path / "out", 2, num_workers=1, image_size=(160, 120))
    assert any(re.search(r"\d+\.\d\d charts/s", r.getMessage()) for r in caplog.records)


@pytest.mark.parametrize("kwargs", [{"n_charts": 0}, {"test_fraction": 1.0}, {"questions_per_chart": 0},
                                    {"image_size": (10, 10)}])
def test_bad_arguments_raise_a_clear_error(tmp_path, kwargs):
    arguments = {"n_charts": 2, "num_workers": 1} | kwargs
    with pytest.raises(ChartVLMError, match="synthesize"):
        synth.synthesize(tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Unit tests on the pure parts (no rendering)


@pytest.mark.parametrize("value, text", [(12.0, "12"), (Decimal("6.80"), "6.8"), (1200, "1200"), (0.05, "0.05"),
                                         (Decimal("1.2E+3"), "1200"), (0, "0"), (98000, "98000")])
def test_format_number_is_minimal(value, text):
    assert synth.format_number(value) == text


def test_specs_are_deterministic_json_and_cover_every_type():
    specs = [synth.make_chart_spec(random.Random(f"3-{i}"), i) for i in range(200)]
    again = [synth.make_chart_spec(random.Random(f"3-{i}"), i) for i in range(200)]
    assert json.dumps(specs) == json.dumps(again)
    assert {s["chart_type"] for s in specs} == set(synth.CHART_TYPES)
    assert {s["style"]["font_family"] for s in specs} == set(synth.FONT_FAMILIES)
    for spec in specs:
        assert 400 <= spec["style"]["width"] <= 800 and 300 <= spec["style"]["height"] <= 600
        colours = [s["color"] for s in spec["series"]]
        assert len(set(colours)) == len(colours)
        values = [Decimal(str(v)) for s in spec["series"] for v in s["values"]]
        assert all(v > 0 and -v.as_tuple().exponent <= spec["decimals"] for v in values)
        if spec["chart_type"] == "pie":
            assert sum(values) == 100  # the printed percentages add up exactly
        if spec["chart_type"] in ("grouped_bar",) or (spec["chart_type"] == "line" and len(spec["series"]) > 1):
            assert len(spec["series"]) > 1


def test_derived_questions_over_many_charts_are_all_correct():
    families = Counter()
    for i in range(300):
        rng = random.Random(f"11-{i}")
        spec = synth.make_chart_spec(rng, i)
        table = json.loads(json.dumps(synth.chart_table(spec)))
        for q in synth.derive_questions(spec, rng, 3):
            assert q["label"] == [_expected_answer(q["query"], q["question_type"], table)], q["query"]
            families[q["question_type"]] += 1
    assert set(families) == set(synth.QUESTION_TYPES)
    assert min(families.values()) >= 20, families


def test_render_uses_the_spec_size_when_none_is_forced():
    from PIL import Image

    spec = synth.make_chart_spec(random.Random("5-0"), 0)
    png = synth.render_chart(spec)
    assert png == synth.render_chart(spec)
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (spec["style"]["width"], spec["style"]["height"])
        assert image.mode == "RGB"
