"""The HTML report (content, self-containment, compare mode, row cap) and the loss curve, plus a
headless-Chromium check that the page really renders and that the "errors only" filter works."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import re

import pytest
from PIL import Image, ImageDraw

from chartvlm.evaluate import EvalSettings, write_result
from chartvlm.report import plot_loss_curve, write_report

# (size, mode) per chart: wide ones are shrunk to 160 px, the small one is kept, odd modes converted.
CHART_SHAPES = [
    ((400, 300), "RGB"),
    ((320, 240), "RGBA"),
    ((800, 600), "P"),
    ((100, 80), "RGB"),
    ((640, 480), "L"),
    ((200, 400), "RGB"),
]
EXPECTED_THUMB_SIZES = [(160, 120), (160, 120), (160, 120), (100, 80), (160, 120), (160, 320)]


def _chart(index: int) -> Image.Image:
    (width, height), mode = CHART_SHAPES[index]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for bar in range(3):
        top = height * (bar + 1) // 5
        draw.rectangle(
            [10 + bar * width // 4, top, 10 + bar * width // 4 + width // 6, height - 5],
            fill=(40 * index, 90, 200 - 30 * bar),
        )
    return image.convert(mode)


def _rows(correct: list[bool], prefix: str) -> list[dict]:
    types = ["value", "argmax", "value", "yes/no", "argmax", "value"]
    return [
        {
            "id": f"q{index}",
            "question": f"Question {index}: what is <b>A</b> & B?",
            "labels": [str(10 * index), "alt"] if index == 0 else [str(10 * index)],
            "prediction": f"{prefix}-answer-{index}" if index != 5 else "",
            "correct": ok,
            "split": "human" if index < 3 else "augmented",
            "question_type": types[index],
            "chart_type": "bar",
        }
        for index, ok in enumerate(correct)
    ]


# Fine-tuned: human 1/3 (33.33), augmented 3/3 (100.00), overall 4/6 (66.67).
TUNED_CORRECT = [True, False, False, True, True, True]
# Base: human 1/3 (33.33, delta +0.00), augmented 2/3 (66.67, delta +33.33), overall 3/6 (50.00, +16.67).
BASE_CORRECT = [False, True, False, True, False, True]


PROMPT = "SYSTEM: You are a chart analyst.\nUSER: <image>{question}\nAnswer the question with a single word."


def _result(rows: list[dict], model: str, folder, **settings):
    """The results evaluation writes for these predictions (evaluate.write_result: the real schema)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = EvalSettings(model=model, adapter=None, dataset="synthetic-test", split="test", prompt=PROMPT,
                            max_new_tokens=16, generation={"max_new_tokens": 16, "do_sample": False},
                            min_pixels=3136, max_pixels=200704, **settings)
    return write_result(folder, settings, questions_timed=len(rows), seconds=1.85)


def _images(row: dict) -> Image.Image:
    return _chart(int(row["id"][1:]))


@pytest.fixture()
def tuned(tmp_path):
    rows = _rows(TUNED_CORRECT, "tuned")
    return _result(rows, "tiny-tuned", tmp_path / "tuned"), rows


@pytest.fixture()
def base(tmp_path):
    rows = _rows(BASE_CORRECT, "base")
    return _result(rows, "tiny-base", tmp_path / "base"), rows


def _data_uris(page: str, kind: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(rf"data:image/{kind};base64,([A-Za-z0-9+/=]+)", page)]


def _headline_row(page: str, name: str) -> list[str]:
    match = re.search(rf"<table class='headline'>.*?<tr><th>{name}</th>(.*?)</tr>", page, re.S)
    assert match, name
    return re.findall(r"<td[^>]*>(.*?)</td>", match.group(1))


def test_report_has_numbers_embedded_images_and_no_urls(tmp_path, tuned):
    metrics, rows = tuned
    path = write_report(tmp_path / "sub" / "report.html", metrics, rows, _images)
    assert "<p class='muted'>tiny-tuned · synthetic-test · test</p>" in page_of(path)
    assert path == tmp_path / "sub" / "report.html"
    page = path.read_text(encoding="utf-8")

    assert _headline_row(page, "overall") == ["66.67", "4 / 6"]
    assert _headline_row(page, "human") == ["33.33", "1 / 3"]
    assert _headline_row(page, "augmented") == ["100.00", "3 / 3"]
    assert "<th>argmax</th><td class='num'>50.00</td><td class='num'>2</td>" in page  # by question type

    # Self-contained: no http(s) anywhere, no src/href pointing outside the page.
    assert not re.search(r"https?:", page)
    sources = re.findall(r"(?:src|href)=['\"]([^'\"]*)", page)
    assert len(sources) == 7 and all(source.startswith("data:image/") for source in sources)

    thumbs = _data_uris(page, "jpeg")
    assert [Image.open(io.BytesIO(data)).size for data in thumbs] == EXPECTED_THUMB_SIZES
    assert all(Image.open(io.BytesIO(data)).format == "JPEG" for data in thumbs)
    (chart,) = _data_uris(page, "png")
    chart_image = Image.open(io.BytesIO(chart))
    chart_image.load()
    assert chart_image.format == "PNG" and chart_image.width > 300

    # One row per prediction, correctness on the row element, text escaped.
    assert re.findall(r"<tr data-correct='([01])'", page) == ["1", "0", "0", "1", "1", "1"]
    assert "Question 1: what is &lt;b&gt;A&lt;/b&gt; &amp; B?" in page
    assert "<b>A</b>" not in page
    assert "USER: &lt;image&gt;{question}\nAnswer the question with a single word." in page
    assert "<th>max_new_tokens</th><td>16</td>" in page and "<th>do_sample</th><td>false</td>" in page
    assert "<th>seconds</th><td>1.85</td>" in page and "<th>prompt style</th><td>chartvlm</td>" in page
    assert "<th>pixels</th><td>min 3,136, max 200,704</td>" in page
    assert "<th>questions</th><td>6 (the whole split)</td>" in page
    assert "tuned-answer-3" in page and "(empty)" in page
    assert "<td>0 <span class='muted'>|</span> alt</td>" in page  # both labels of q0
    assert "id='errors-only'" in page and "errors only" in page
    # Written atomically: no temporary file left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]


def page_of(path) -> str:
    return path.read_text(encoding="utf-8")


def test_report_compare_mode_shows_base_and_fine_tuned(tmp_path, tuned, base):
    metrics, rows = tuned
    path = write_report(tmp_path / "compare.html", metrics, rows, _images, baseline=base, title="base vs tuned")
    page = path.read_text(encoding="utf-8")

    assert _headline_row(page, "overall") == ["50.00", "66.67", "+16.67", "6"]
    assert _headline_row(page, "human") == ["33.33", "33.33", "+0.00", "3"]
    assert _headline_row(page, "augmented") == ["66.67", "100.00", "+33.33", "3"]
    assert "<title>base vs tuned</title>" in page
    # Both models' predictions are in the table, and rows carry both correctness flags.
    for index in range(5):
        assert f"tuned-answer-{index}" in page and f"base-answer-{index}" in page
    assert re.findall(r"<tr data-correct='([01])' data-base-correct='([01])'", page) == [
        (str(int(t)), str(int(b))) for t, b in zip(TUNED_CORRECT, BASE_CORRECT, strict=True)
    ]
    # Fixed: q0 and q4; broken: q1.
    assert "(base wrong, fine-tuned right): <b>2</b>; broken (base right, fine-tuned wrong): <b>1</b>" in page
    assert "tiny-base" in page and "tiny-tuned" in page
    assert "different prompt" not in page  # same prompt, no warning
    assert len(_data_uris(page, "jpeg")) == 6 and len(_data_uris(page, "png")) == 1
    assert not re.search(r"https?:", page)


def test_report_compare_warns_when_prompts_differ(tmp_path, tuned, base):
    base_metrics, base_rows = base
    base_metrics = dataclasses.replace(base_metrics, prompt="Other prompt", generation={"max_new_tokens": 1024})
    page = write_report(tmp_path / "r.html", *tuned, _images, baseline=(base_metrics, base_rows)).read_text()
    assert "evaluated with a different prompt" in page and "<pre>Other prompt</pre>" in page
    assert "different generation settings" in page and "<th>max_new_tokens</th><td>1024</td>" in page


def test_report_caps_table_rows_and_survives_a_missing_image(tmp_path, tuned):
    metrics, rows = tuned
    calls = []

    def images(row):
        calls.append(row["id"])
        if row["id"] == "q1":
            raise FileNotFoundError("charts/q1.png")
        return _images(row)

    page = write_report(tmp_path / "r.html", metrics, rows, images, max_rows=4).read_text()
    assert calls == ["q0", "q1", "q2", "q3"]  # omitted rows are not even loaded
    assert len(re.findall(r"<tr data-correct=", page)) == 4
    assert "Showing the first 4 of 6 predictions; 2 omitted (max_rows=4)." in page
    assert "image unavailable: charts/q1.png" in page
    assert "1 chart image(s) could not be loaded" in page
    assert len(_data_uris(page, "jpeg")) == 3
    # The headline still covers all 6 predictions.
    assert _headline_row(page, "overall") == ["66.67", "4 / 6"]


def test_report_of_a_real_evaluation_shows_what_metrics_json_holds(tiny_model_dir, chart_dataset_dir, tmp_path):
    """Built from a real `chartvlm eval` run with a test subset: the subtitle, the subset line, the prompt style,
    the pixels and every generation setting are the ones metrics.json holds."""
    from chartvlm.config import parse_config
    from chartvlm.evaluate import run_eval
    from conftest import run_args

    config = parse_config(run_args(tiny_model_dir, chart_dataset_dir, tmp_path, "--test_split", "train",
                                   "--test_subset", "4", "--eval_max_new_tokens", "3"))
    result = run_eval(config, progress=False)["model"]
    page = (tmp_path / "eval" / "report.html").read_text(encoding="utf-8")
    assert f"<p class='muted'>{tiny_model_dir} · {chart_dataset_dir} · train</p>" in page
    assert result.subset_line() == "evaluating 4 of 10 questions: test_subset=4 (seed 42)"
    assert f"<p class='warn'>{result.subset_line()}</p>" in page
    assert "<th>questions</th><td>4 of 10 (test_subset=4, seed 42)</td>" in page
    assert "<th>prompt style</th><td>chartvlm</td>" in page and "<th>repetition_penalty</th><td>1</td>" in page
    assert "<th>max_new_tokens</th><td>3</td>" in page and "<th>mode</th><td>chartvlm</td>" in page
    assert "settings" not in re.sub(r"<h2>Generation settings</h2>", "", page), "no raw settings cell"
    assert _headline_row(page, "overall")[1] == f"{result.overall['correct']} / 4"


def test_report_overwrites_existing_file(tmp_path, tuned):
    target = tmp_path / "r.html"
    target.write_text("old")
    write_report(target, *tuned, _images)
    assert target.read_text().startswith("<!DOCTYPE html>")


def test_plot_loss_curve(tmp_path):
    history = [
        {"loss": 2.5, "learning_rate": 1e-4, "step": 10, "epoch": 0.1},
        {"loss": 1.9, "step": 20},
        {"eval_loss": 2.0, "step": 20},
        {"loss": 1.2, "step": 30},
        {"eval_loss": 1.4, "step": 30},
        {"train_loss": 1.8, "train_runtime": 12.0, "step": 30},
        {"learning_rate": 5e-5},
    ]
    path = plot_loss_curve(history, tmp_path / "plots" / "loss.png")
    assert path == tmp_path / "plots" / "loss.png"
    image = Image.open(path)
    image.load()
    assert image.format == "PNG" and image.size == (700, 400)
    # The curves are actually drawn: the blue training line and the orange eval line are present.
    colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours
    assert sorted(p.name for p in path.parent.iterdir()) == ["loss.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600

    only_eval = plot_loss_curve([{"eval_loss": 1.0, "step": 5}], tmp_path / "eval.png")
    assert only_eval is not None and only_eval.exists()


def test_plot_loss_curve_without_points_writes_nothing(tmp_path):
    assert plot_loss_curve([], tmp_path / "a.png") is None
    assert plot_loss_curve([{"train_loss": 1.0, "step": 3}, {"loss": 2.0}], tmp_path / "b.png") is None
    assert list(tmp_path.iterdir()) == []


# --- headless browser ---------------------------------------------------------------------

def test_report_renders_in_headless_chromium(tmp_path, tuned, base, browser):
    from selenium.webdriver.common.by import By

    metrics, rows = tuned
    path = write_report(tmp_path / "report.html", metrics, rows, _images, baseline=base)
    browser.get(path.as_uri())

    headline = browser.find_element(By.CSS_SELECTOR, "table.headline").text
    assert "66.67" in headline and "50.00" in headline and "+16.67" in headline and "100.00" in headline

    # Every image (6 thumbnails + the chart) decoded by the browser, at the expected size.
    decoded = browser.execute_script(
        "return Array.from(document.images).map(function (img) {"
        " return [img.id, img.complete, img.naturalWidth, img.naturalHeight]; });"
    )
    assert len(decoded) == 7
    chart = [entry for entry in decoded if entry[0] == "accuracy-chart"]
    assert len(chart) == 1 and chart[0][1] and chart[0][2] > 300
    thumbs = [(w, h) for name, complete, w, h in decoded if name != "accuracy-chart" and complete]
    assert thumbs == EXPECTED_THUMB_SIZES

    table_rows = browser.find_elements(By.CSS_SELECTOR, "#predictions tbody tr")
    assert [row.get_attribute("data-correct") for row in table_rows] == ["1", "0", "0", "1", "1", "1"]
    assert all(row.is_displayed() for row in table_rows)
    assert browser.find_element(By.ID, "row-count").text == "6 of 6 rows shown"
    assert "base-answer-1" in table_rows[1].text and "tuned-answer-1" in table_rows[1].text

    checkbox = browser.find_element(By.ID, "errors-only")
    checkbox.click()
    assert [row.is_displayed() for row in table_rows] == [not ok for ok in TUNED_CORRECT]
    assert browser.find_element(By.ID, "row-count").text == "2 of 6 rows shown"
    checkbox.click()
    assert all(row.is_displayed() for row in table_rows)
