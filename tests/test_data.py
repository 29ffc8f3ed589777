"""chartvlm.data: every local format yields the same normalised rows; subsets; errors; hub probe."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
from PIL import Image  # noqa: E402

import chartvlm.data  # noqa: E402
from chartvlm import schema  # noqa: E402
from chartvlm.data import load_chartqa  # noqa: E402
from chartvlm.hub import ensure_hub_reachable, is_local_source  # noqa: E402
from chartvlm.errors import BadSampleError, ChartVLMError  # noqa: E402
from chartvlm.images import to_rgb  # noqa: E402

# Six rows, three images (RGB, RGBA with transparent pixels, palette), one row with two labels.
# Rows 0-2 are human-written, 3-5 augmented (the release layout lists human first).
ROWS = [
    {"image": "chart_rgb.png", "query": "What is the value of A?", "label": ["12"], "human_or_machine": 0},
    {"image": "chart_rgba.png", "query": "Which bar is the tallest?", "label": ["Blue"], "human_or_machine": 0},
    {"image": "chart_p.png", "query": "Is A greater than B?", "label": ["Yes", "yes"], "human_or_machine": 0},
    {"image": "chart_rgb.png", "query": "What is the difference?", "label": ["6.8"], "human_or_machine": 1},
    {"image": "chart_rgba.png", "query": "How many bars?", "label": ["3"], "human_or_machine": 1},
    {"image": "chart_p.png", "query": "What is the total?", "label": ["1625942"], "human_or_machine": 1},
]
# How the JSONL file writes the same labels (numbers as JSON numbers, single labels unwrapped).
JSONL_LABELS = [12.0, "Blue", ["Yes", "yes"], 6.8, 3, 1625942]


def _write_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    gradient = np.arange(8 * 6 * 3, dtype=np.uint8).reshape(6, 8, 3) * 5
    Image.fromarray(gradient, "RGB").save(folder / "chart_rgb.png")
    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 40, 90
    rgba[..., 3] = 255
    rgba[:2, :, :] = (10, 20, 30, 0)  # fully transparent band
    rgba[2, :, 3] = 128  # half transparent row
    Image.fromarray(rgba, "RGBA").save(folder / "chart_rgba.png")
    Image.fromarray(gradient, "RGB").quantize(colors=4).save(folder / "chart_p.png")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same six rows written in every local format; returns {name: (source, split)}."""
    root = tmp_path_factory.mktemp("formats")
    images = root / "images"
    _write_images(images)
    assert Image.open(images / "chart_rgba.png").mode == "RGBA"
    assert Image.open(images / "chart_p.png").mode == "P"

    # The original release layout: train/train_{human,augmented}.json + train/png/.
    release = root / "release" / "train"
    _write_images(release / "png")
    for kind, part in (("human", ROWS[:3]), ("augmented", ROWS[3:])):
        records = [{"imgname": r["image"], "query": r["query"],
                    "label": r["label"][0] if len(r["label"]) == 1 else r["label"]} for r in part]
        (release / f"train_{kind}.json").write_text(json.dumps(records))

    # JSONL: relative and absolute image paths, key aliases, numeric labels, an extra key.
    jsonl = root / "jsonl" / "mine.jsonl"
    _write_images(jsonl.parent / "imgs")
    lines = []
    for index, (row, label) in enumerate(zip(ROWS, JSONL_LABELS)):
        image = f"imgs/{row['image']}" if index != 1 else str(jsonl.parent / "imgs" / row["image"])
        line = {"image": image, ("question" if index % 2 else "query"): row["query"],
                ("answers" if index == 2 else "answer" if index == 3 else "label"): label,
                "human_or_machine": row["human_or_machine"], "source": f"s{index}"}
        lines.append(json.dumps(line))
    jsonl.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")

    # Arrow formats, built the way the hub's HuggingFaceM4/ChartQA is typed (ClassLabel origin).
    features = datasets.Features({
        "image": datasets.Image(),
        "query": datasets.Value("string"),
        "label": datasets.List(datasets.Value("string")),
        "human_or_machine": datasets.ClassLabel(names=["human", "machine"]),
    })
    arrow = datasets.Dataset.from_dict(
        {"image": [str(images / r["image"]) for r in ROWS], "query": [r["query"] for r in ROWS],
         "label": [r["label"] for r in ROWS], "human_or_machine": [r["human_or_machine"] for r in ROWS]},
        features=features,
    )
    arrow.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": arrow, "test": arrow.select([0, 1])}).save_to_disk(str(root / "saved_dict"))
    (root / "pq_hub" / "data").mkdir(parents=True)
    arrow.to_parquet(str(root / "pq_hub" / "data" / "train-00000-of-00001.parquet"))
    (root / "pq_split").mkdir()
    arrow.to_parquet(str(root / "pq_split" / "train-00000.parquet"))
    arrow.to_parquet(str(root / "single.parquet"))

    return {
        "release_root": (str(root / "release"), "train"),
        "release_split_dir": (str(release), "train"),
        "jsonl": (str(jsonl), "train"),
        "save_to_disk": (str(root / "saved"), "train"),
        "save_to_disk_dict": (str(root / "saved_dict"), "train"),
        "parquet_file": (str(root / "single.parquet"), "train"),
        "parquet_glob": (str(root / "pq_split" / "*.parquet"), "train"),
        "parquet_hub_folder": (str(root / "pq_hub"), "train"),
        "parquet_split_folder": (str(root / "pq_split"), "train"),
        "images": (str(images), None),
    }


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def _rows(dataset):
    """Core columns as plain Python, with the decoded image as mode + pixel array."""
    out = []
    for row in dataset:
        image = to_rgb(row["image"])
        out.append({"query": row["query"], "label": row["label"], "human_or_machine": row["human_or_machine"],
                    "row_id": row["row_id"], "mode": image.mode, "pixels": np.asarray(image).tolist()})
    return out


def _expected_rows(image_dir):
    return [{"query": r["query"], "label": r["label"], "human_or_machine": r["human_or_machine"],
             "row_id": f"train-{i}", "mode": "RGB",
             "pixels": np.asarray(to_rgb(Image.open(os.path.join(image_dir, r["image"])))).tolist()}
            for i, r in enumerate(ROWS)]


@pytest.mark.parametrize("name", ["release_root", "release_split_dir", "jsonl", "save_to_disk", "save_to_disk_dict",
                                  "parquet_file", "parquet_glob", "parquet_hub_folder", "parquet_split_folder"])
def test_every_format_gives_the_same_normalised_rows(sources, cache, name):
    source, split = sources[name]
    dataset = load_chartqa(source, split=split, cache_dir=cache)
    assert dataset.features["image"] == datasets.Image()
    assert dataset.features["label"] == datasets.List(datasets.Value("string"))
    assert dataset.features["human_or_machine"] == datasets.Value("int64")
    assert dataset.column_names[:4] == ["image", "query", "label", "human_or_machine"]
    assert _rows(dataset) == _expected_rows(sources["images"][0])


def test_rgba_and_palette_images_become_rgb_with_transparency_on_white(sources, cache):
    dataset = load_chartqa(*sources["jsonl"], cache_dir=cache)
    rgba = to_rgb(dataset[1]["image"])
    assert rgba.mode == "RGB" and rgba.size == (8, 6)
    # The transparent band is drawn on white, not shown in the colour stored under it (10, 20, 30).
    assert rgba.getpixel((0, 0)) == (255, 255, 255)
    assert rgba.getpixel((0, 5)) == (200, 40, 90)
    assert to_rgb(dataset[2]["image"]).mode == "RGB"


def test_jsonl_keeps_extra_keys_and_stores_image_paths_not_bytes(sources, cache):
    path, split = sources["jsonl"]
    dataset = load_chartqa(path, split=split, cache_dir=cache)
    assert dataset["source"] == [f"s{i}" for i in range(6)]
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    first = raw[0]["image"]
    assert first["bytes"] is None
    assert first["path"] == os.path.join(os.path.dirname(path), "imgs", "chart_rgb.png")


def test_jsonl_edit_is_not_served_from_a_stale_cache(tmp_path, cache):
    _write_images(tmp_path)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"image": "chart_rgb.png", "query": "q?", "label": "1"}) + "\n")
    assert load_chartqa(str(path), cache_dir=cache)["label"] == [["1"]]
    path.write_text(json.dumps({"image": "chart_rgb.png", "query": "q?", "label": "2"}) + "\n")
    assert load_chartqa(str(path), cache_dir=cache)["label"] == [["2"]]


@pytest.mark.parametrize("value, text", [(12.0, "12"), (12, "12"), (6.80, "6.8"), (-0.5, "-0.5"), (1e-07, "0.0000001"),
                                         (1e20, "100000000000000000000"), (True, "Yes"), (False, "No")])
def test_numeric_answers_are_printed_chartqa_style(value, text):
    assert schema.format_answer_number(value, "x") == text


def test_lmms_lab_schema_is_normalised(sources, tmp_path):
    images = sources["images"][0]
    lmms = datasets.Dataset.from_dict(
        {"type": ["human_test", "augmented_test"], "question": ["Q1?", "Q2?"], "answer": ["12", "Yes"],
         "image": [os.path.join(images, "chart_rgb.png"), os.path.join(images, "chart_rgba.png")]},
        features=datasets.Features({"type": datasets.Value("string"), "question": datasets.Value("string"),
                                    "answer": datasets.Value("string"), "image": datasets.Image()}),
    )
    lmms.save_to_disk(str(tmp_path / "lmms"))
    dataset = load_chartqa(str(tmp_path / "lmms"), split="test")
    assert dataset["query"] == ["Q1?", "Q2?"]
    assert dataset["label"] == [["12"], ["Yes"]]
    assert dataset["human_or_machine"] == [0, 1]
    assert dataset["row_id"] == ["test-0", "test-1"]
    assert to_rgb(dataset[1]["image"]).mode == "RGB"


def test_class_label_origin_goes_through_the_class_names(sources, tmp_path):
    images = sources["images"][0]
    reversed_names = datasets.Dataset.from_dict(
        {"image": [os.path.join(images, "chart_rgb.png")] * 2, "query": ["Q1?", "Q2?"], "label": [["1"], ["2"]],
         "human_or_machine": [0, 1]},
        features=datasets.Features({"image": datasets.Image(), "query": datasets.Value("string"),
                                    "label": datasets.List(datasets.Value("string")),
                                    "human_or_machine": datasets.ClassLabel(names=["augmented", "human"])}),
    )
    reversed_names.save_to_disk(str(tmp_path / "reversed"))
    assert load_chartqa(str(tmp_path / "reversed"))["human_or_machine"] == [1, 0]


def test_hub_source_is_loaded_with_the_split_and_normalised(sources, monkeypatch):
    images = sources["images"][0]
    calls = []
    hub_like = datasets.Dataset.from_dict(
        {"question": ["Q?"], "answer": ["3"], "type": ["augmented_test"],
         "image": [os.path.join(images, "chart_p.png")]},
    ).cast_column("image", datasets.Image())

    def probe(repo_id, repo_type="model", timeout=5.0):
        calls.append(("probe", repo_id, repo_type))

    def load_dataset(source, split, cache_dir=None):
        calls.append(("load", source, split))
        return hub_like

    monkeypatch.setattr(chartvlm.data, "ensure_hub_reachable", probe)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    dataset = load_chartqa("lmms-lab/ChartQA", split="test")
    assert calls == [("probe", "lmms-lab/ChartQA", "dataset"), ("load", "lmms-lab/ChartQA", "test")]
    assert (dataset["label"], dataset["human_or_machine"], dataset["row_id"]) == ([["3"]], [1], ["test-0"])


def test_subset_by_fraction_and_count_is_seeded_and_in_original_order(sources):
    source, _ = sources["save_to_disk"]
    expected = sorted(np.random.default_rng(7).permutation(6)[:3].tolist())
    half = load_chartqa(source, subset=0.5, seed=7)
    assert half["row_id"] == [f"train-{i}" for i in expected]
    assert load_chartqa(source, subset=3, seed=7)["row_id"] == half["row_id"]
    assert load_chartqa(source, subset=0.5, seed=7)["row_id"] == half["row_id"]
    picks = {tuple(load_chartqa(source, subset=2, seed=seed)["row_id"]) for seed in range(6)}
    assert len(picks) > 1  # the seed matters
    small, large = (set(load_chartqa(source, subset=k, seed=3)["row_id"]) for k in (2, 4))
    assert small < large  # a smaller subset is nested in a larger one
    assert len(load_chartqa(source, subset=0.01)) == 1
    assert load_chartqa(source, subset=1.0)["row_id"] == [f"train-{i}" for i in range(6)]
    assert load_chartqa(source, subset=6)["row_id"] == [f"train-{i}" for i in range(6)]
    rows = load_chartqa(source, subset=2, seed=7)
    assert rows[0]["query"] == ROWS[int(rows[0]["row_id"].split("-")[1])]["query"]


@pytest.mark.parametrize("subset, words", [(0, ">= 1"), (-2, ">= 1"), (0.0, "(0, 1]"), (1.5, "(0, 1]"),
                                           (7, "only 6 rows"), (True, "fraction"), ("3", "fraction")])
def test_bad_subset_values_are_rejected(sources, subset, words):
    with pytest.raises(ChartVLMError, match=None) as info:
        load_chartqa(sources["save_to_disk"][0], subset=subset)
    assert words in str(info.value)


def test_dataset_dict_split_selection_and_missing_split(sources):
    source, _ = sources["save_to_disk_dict"]
    test = load_chartqa(source, split="test")
    assert test["query"] == [ROWS[0]["query"], ROWS[1]["query"]]
    assert test["row_id"] == ["test-0", "test-1"]
    with pytest.raises(ChartVLMError) as info:
        load_chartqa(source, split="val")
    assert "'val'" in str(info.value) and "train, test" in str(info.value)


def test_folder_without_the_split_lists_available_splits(sources):
    for name in ("parquet_hub_folder", "release_root"):
        with pytest.raises(ChartVLMError) as info:
            load_chartqa(sources[name][0], split="val")
        assert "available splits: train" in str(info.value)


def test_missing_image_names_file_and_line(tmp_path, cache):
    _write_images(tmp_path)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"image": "chart_rgb.png", "query": "q", "label": "1"}) + "\n"
                    + json.dumps({"image": "gone.png", "query": "q", "label": "1"}) + "\n")
    with pytest.raises(BadSampleError) as info:
        load_chartqa(str(path), cache_dir=cache)
    assert info.value.where == f"{path}:2"
    assert "image file not found" in info.value.reason and "gone.png" in info.value.reason


@pytest.mark.parametrize("bad_line, reason", [
    ("{not json", "not valid JSON"),
    (json.dumps({"image": "chart_rgb.png", "label": "1"}), "no question"),
    (json.dumps({"image": "chart_rgb.png", "query": "q"}), "no answer"),
    (json.dumps({"image": "chart_rgb.png", "query": "q", "label": []}), "empty"),
    (json.dumps({"image": "chart_rgb.png", "query": "q", "label": "1", "human_or_machine": 2}), "human_or_machine"),
    (json.dumps(["a", "list"]), "JSON object"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, cache, bad_line, reason):
    _write_images(tmp_path)
    good = json.dumps({"image": "chart_rgb.png", "query": "q", "label": "1"})
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\n{good}\n{bad_line}\n")
    with pytest.raises(BadSampleError) as info:
        load_chartqa(str(path), cache_dir=cache)
    assert info.value.where == f"{path}:3"
    assert reason in info.value.reason


def test_release_json_missing_image_names_file_and_index(tmp_path, cache):
    split_dir = tmp_path / "val"
    _write_images(split_dir / "png")
    records = [{"imgname": "chart_rgb.png", "query": "q", "label": "1"},
               {"imgname": "nope.png", "query": "q", "label": "2"}]
    (split_dir / "val_human.json").write_text(json.dumps(records))
    with pytest.raises(BadSampleError) as info:
        load_chartqa(str(tmp_path), split="val", cache_dir=cache)
    assert info.value.where == f"{split_dir / 'val_human.json'}[1]"


def test_missing_local_path_and_unknown_file_type(tmp_path):
    with pytest.raises(ChartVLMError, match="no such file or folder"):
        load_chartqa(str(tmp_path / "nothing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ChartVLMError, match="unsupported file type"):
        load_chartqa(str(tmp_path / "x.csv"))


@pytest.mark.parametrize("source, local", [
    ("HuggingFaceM4/ChartQA", False), ("lmms-lab/ChartQA", False), ("chartqa", False),
    ("./data", True), ("/abs/path", True), ("data/train.jsonl", True), ("a/b/c", True),
    ("shards/*.parquet", True), ("~/charts", True),
])
def test_is_local_source(source, local):
    assert is_local_source(source) is local


# ---- hub probe ------------------------------------------------------------------------------


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """No cached repos, online mode, and the hub endpoint on a closed loopback port."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    return tmp_path / "hub"


@pytest.mark.parametrize("repo_type", ["model", "dataset"])
def test_unreachable_hub_fails_fast_with_the_quickstart_hint(empty_hub_cache, repo_type):
    start = time.monotonic()
    with pytest.raises(ChartVLMError) as info:
        ensure_hub_reachable("chartvlm-tests/not-cached", repo_type=repo_type, timeout=5.0)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "127.0.0.1:9" in message and "chartvlm-tests/not-cached" in message
    assert "make quickstart" in message and "synthetic charts + a tiny model" in message


def test_load_chartqa_from_unreachable_hub_fails_fast(empty_hub_cache):
    start = time.monotonic()
    with pytest.raises(ChartVLMError, match="make quickstart"):
        load_chartqa("chartvlm-tests/not-cached", split="test")
    assert time.monotonic() - start < 10


def test_offline_mode_fails_without_network(empty_hub_cache, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(HfApi, "repo_info", lambda *a, **k: pytest.fail("network used in offline mode"))
    with pytest.raises(ChartVLMError) as info:
        ensure_hub_reachable("chartvlm-tests/not-cached", repo_type="dataset")
    assert "HF_HUB_OFFLINE" in str(info.value) and "make quickstart" in str(info.value)


def test_cached_repos_and_local_paths_need_no_network(empty_hub_cache, monkeypatch, tmp_path):
    from huggingface_hub import HfApi

    asked = []

    def closed_hub(self, repo_id, **kwargs):
        asked.append(repo_id)
        raise ConnectionError("refused")

    monkeypatch.setattr(HfApi, "repo_info", closed_hub)
    model = empty_hub_cache / "models--org--tiny" / "snapshots" / "abc123"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (empty_hub_cache / "models--org--tiny" / "refs").mkdir()
    (empty_hub_cache / "models--org--tiny" / "refs" / "main").write_text("abc123")
    ensure_hub_reachable("org/tiny", repo_type="model")
    dataset = empty_hub_cache / "datasets--org--charts" / "snapshots" / "abc123"
    dataset.mkdir(parents=True)
    (dataset / "README.md").write_text("# charts")
    ensure_hub_reachable("org/charts", repo_type="dataset")
    prepared = tmp_path / "datasets" / "org___chart_qa" / "default" / "0.0.0" / "abc"
    prepared.mkdir(parents=True)
    ensure_hub_reachable("org/ChartQA", repo_type="dataset")
    ensure_hub_reachable(str(tmp_path), repo_type="model")
    assert asked == []
    # A model folder without config.json does not count as cached: the hub is asked.
    (empty_hub_cache / "models--org--partial" / "snapshots" / "abc123").mkdir(parents=True)
    with pytest.raises(ChartVLMError, match="Cannot reach"):
        ensure_hub_reachable("org/partial", repo_type="model")
    assert asked == ["org/partial"]
