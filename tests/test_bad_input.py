"""Bad input: every case of issue 5 gives a clear error naming the row, or a counted skip listed in
skipped.jsonl, never a stack trace from deep inside a library. Also huge and tiny images, the
on_bad_sample policy of training and evaluation, invalid configuration, and streaming JSONL loading.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import subprocess
import sys
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from chartvlm.collate import IGNORE_INDEX, collate_fn
from chartvlm.config import parse_config
from chartvlm.data import load_chartqa
from chartvlm.validate import SKIPPED_FILENAME, SkippedRows, validate_rows
from chartvlm.errors import BadSampleError, ChartVLMError
from chartvlm.images import check_image, model_image
from chartvlm.io import read_jsonl
from conftest import TEST_MAX_PIXELS, run_args

MB = 1 << 20


# ---- files ----------------------------------------------------------------------------------


def _png16(array: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG (Pillow cannot write one): color_type 0 grey, 2 RGB, 6 RGBA."""
    height, width = array.shape[:2]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG header announcing width x height pixels; Pillow refuses it before reading any pixel data."""
    chunks = [(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)), (b"IDAT", b""), (b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I", len(body)) + kind + body
                                        + struct.pack(">I", zlib.crc32(kind + body)) for kind, body in chunks)


SIZE = (40, 30)


def _write_images(folder) -> dict[str, tuple[int, int, int]]:
    """Chart files in every mode the issue lists; returns {file name: expected RGB pixel at (0, 0)}."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}

    def save(name, image, pixel, **kwargs):
        image.save(folder / name, **kwargs)
        expected[name] = pixel

    rgb = Image.new("RGB", SIZE, (200, 30, 30))
    save("rgb.png", rgb, (200, 30, 30))
    rgba = Image.new("RGBA", SIZE, (200, 40, 90, 255))
    rgba.paste((10, 20, 30, 0), (0, 0, 40, 5))  # a transparent band: drawn on white, not in its hidden colour
    save("rgba.png", rgba, (255, 255, 255))
    save("palette.png", rgb.quantize(colors=4), (200, 30, 30))
    palette = Image.new("P", SIZE, 1)
    palette.putpalette([0, 0, 0, 20, 200, 20] + [0] * 762)
    save("palette_transparent.png", palette, (255, 255, 255), transparency=1)
    save("gray.png", Image.new("L", SIZE, 77), (77, 77, 77))
    gray_alpha = Image.new("LA", SIZE, (77, 255))
    gray_alpha.paste((0, 0), (0, 0, 40, 5))
    save("gray_alpha.png", gray_alpha, (255, 255, 255))
    save("bilevel.png", Image.new("1", SIZE, 0), (0, 0, 0))
    save("cmyk.tif", Image.new("CMYK", SIZE, (0, 255, 255, 0)), (255, 0, 0))
    save("cmyk.jpg", Image.new("CMYK", SIZE, (0, 255, 255, 0)), None, quality=95)
    gray16 = np.full((SIZE[1], SIZE[0]), 65535, dtype=np.uint16)
    gray16[0, 0] = 32768  # 16-bit grey is scaled to 8 bits (32768 / 65535 * 255 -> 127), not clipped to white
    (folder / "gray16.png").write_bytes(_png16(gray16, 0))
    expected["gray16.png"] = (127, 127, 127)
    rgb16 = np.zeros((SIZE[1], SIZE[0], 3), dtype=np.uint16)
    rgb16[..., 0] = 65535
    rgb16[0, 0] = (0, 32768, 65535)
    (folder / "rgb16.png").write_bytes(_png16(rgb16, 2))
    expected["rgb16.png"] = (0, 128, 255)
    save("tiny.png", Image.new("RGB", (10, 10), (0, 0, 255)), (0, 0, 255))
    return expected


def _write_broken_images(folder) -> None:
    (folder / "corrupt.png").write_bytes(b"these bytes are not an image" * 20)
    good = (folder / "rgb.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    flipped = bytearray(good)
    flipped[60] ^= 0xFF  # one flipped byte inside the pixel data: the PNG checksum catches it
    (folder / "flipped.png").write_bytes(bytes(flipped))
    (folder / "empty.png").write_bytes(b"")
    Image.new("RGB", (1000, 4), "white").save(folder / "thin.png")  # aspect 250:1, the processor refuses it
    (folder / "bomb.png").write_bytes(_bomb_png(20000, 10000))  # 2e8 pixels: Pillow's bomb limit


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_input") / "imgs"
    expected = _write_images(folder)
    _write_broken_images(folder)
    return folder, expected


def _line(image, query="What is the value?", label="12", **extra) -> str:
    return json.dumps({"image": image, "query": query, "label": label, **extra})


# One JSONL file holding every case: (line, stage, reason). "load": the loader rejects the line;
# "image": the validation pass rejects the row's image; "dup": an exact duplicate; "ok": a good row.
MESSY = [
    (_line("imgs/rgb.png"), "ok", ""),
    (_line("imgs/rgba.png", label=["Blue", "blue"]), "ok", ""),                          # several labels
    (_line("imgs/palette.png", label=6.80), "ok", ""),                                  # numeric label -> "6.8"
    (_line("imgs/gray16.png", query="Quelle part (%) ? 売上 📈 שלום", label="naïve"), "ok", ""),  # unusual unicode
    (_line("imgs/cmyk.tif"), "ok", ""),
    (_line("imgs/tiny.png"), "ok", ""),                                                 # a 10x10 image
    (_line("imgs/rgb.png"), "dup", ""),                                                 # duplicate of line 1
    (_line("imgs/gone.png"), "load", "image file not found"),
    (_line("imgs/rgb.png", query=""), "load", "question must be a non-empty string"),
    (_line("imgs/rgb.png", label=[]), "load", "answer list is empty"),
    (json.dumps({"image": "imgs/rgb.png", "query": "q?"}), "load", "no answer"),
    ("{this is not json", "load", "not valid JSON"),
    (b'{"image": "imgs/rgb.png", "query": "caf\xe9?", "label": "1"}', "load", "not valid UTF-8 (byte 0xe9"),
    ('{"image": "imgs/rgb.png", "query": "broken \\ud800 escape", "label": "1"}', "load", "lone UTF-16 surrogate"),
    (_line("imgs/rgb.png", label=float("nan")), "load", "not a finite number"),
    (_line("imgs/corrupt.png"), "image", "not an image format Pillow can read"),
    (_line("imgs/truncated.png"), "image", "image cannot be read"),
    (_line("imgs/thin.png"), "image", "200x the short side"),
]


def _lines(stage: str) -> list[int]:
    return [n for n, (_, kind, _) in enumerate(MESSY, start=1) if kind == stage]


def _reason(line: int) -> str:
    return MESSY[line - 1][2]


@pytest.fixture(scope="module")
def messy(images):
    """A JSONL file with every bad-input case among good rows, next to its images."""
    path = images[0].parent / "messy.jsonl"
    with open(path, "wb") as handle:
        for text, _, _ in MESSY:
            handle.write((text if isinstance(text, bytes) else text.encode()) + b"\n")
    return path


# ---- loaders: each case is a clear error naming file:line, or a counted skip -------------------


@pytest.mark.parametrize("line", _lines("load"))
def test_each_bad_jsonl_line_raises_naming_file_and_line_by_default(images, tmp_path, line):
    path = tmp_path / "one_bad.jsonl"
    text = MESSY[line - 1][0]
    path.write_bytes(MESSY[0][0].encode() + b"\n" + (text if isinstance(text, bytes) else text.encode()) + b"\n")
    (tmp_path / "imgs").symlink_to(images[0])
    with pytest.raises(BadSampleError) as info:
        load_chartqa(str(path), cache_dir=str(tmp_path / "cache"))
    assert info.value.where == f"{path}:2"
    assert _reason(line) in info.value.reason and "on_bad_sample=skip" in info.value.reason


def test_skip_policy_counts_logs_and_lists_every_bad_line(messy, tmp_path, caplog):
    skipped = SkippedRows("skip")
    with caplog.at_level(logging.WARNING, logger="chartvlm"):
        dataset = load_chartqa(str(messy), cache_dir=str(tmp_path / "cache"), on_bad_sample=skipped)
    bad = _lines("load")
    assert [(r["where"], r["row_id"], r["kind"]) for r in skipped.records] == \
        [(f"{messy}:{n}", f"train-{n - 1}", "bad") for n in bad]
    assert all(_reason(n) in r["reason"] for n, r in zip(bad, skipped.records))
    # Row ids keep the file's positions, so a kept row can be found in the file.
    assert dataset["row_id"] == [f"train-{n - 1}" for n in range(1, len(MESSY) + 1) if n not in bad]
    # The first five reasons are logged with file:line, then one line with the count.
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert logged == [f"skipped {messy}:{n}: {r['reason']}" for n, r in zip(bad[:5], skipped.records)]
    assert sum(f"skipped {len(bad)} bad rows" in r.getMessage() for r in caplog.records) == 1


def test_several_numeric_and_unicode_labels_are_kept_exactly(messy, tmp_path):
    dataset = load_chartqa(str(messy), cache_dir=str(tmp_path / "cache"), on_bad_sample="skip")
    rows = {row_id: (query, label) for row_id, query, label in zip(dataset["row_id"], dataset["query"],
                                                                   dataset["label"])}
    assert rows["train-1"][1] == ["Blue", "blue"]
    assert rows["train-2"][1] == ["6.8"]
    assert rows["train-3"] == ("Quelle part (%) ? 売上 📈 שלום", ["naïve"])


def test_arrow_sources_name_or_skip_the_bad_row(images, tmp_path):
    import datasets

    chart = str(images[0] / "rgb.png")
    rows = {"image": [chart, None, chart, chart, chart], "query": ["q?", "q?", "", "q?", "q?"],
            "label": [["1"], ["1"], ["1"], [], None]}
    features = datasets.Features({"image": datasets.Image(), "query": datasets.Value("string"),
                                  "label": datasets.List(datasets.Value("string"))})
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(saved))
    with pytest.raises(BadSampleError) as info:
        load_chartqa(str(saved))
    assert info.value.where == f"{saved}[1]" and info.value.reason.startswith("no image")
    skipped = SkippedRows("skip")
    dataset = load_chartqa(str(saved), on_bad_sample=skipped)
    assert dataset["row_id"] == ["train-0"] and dataset["query"] == ["q?"]
    assert [(r["where"], r["reason"]) for r in skipped.records] == [
        (f"{saved}[1]", "no image"), (f"{saved}[2]", "the question must be a non-empty string, got ''"),
        (f"{saved}[3]", "the answer list is empty"), (f"{saved}[4]", "no answer")]


def test_release_json_that_is_not_utf8_names_the_file(tmp_path):
    split_dir = tmp_path / "test"
    split_dir.mkdir()
    (split_dir / "test_human.json").write_bytes(b'[{"imgname": "x.png", "query": "caf\xe9", "label": "1"}]')
    with pytest.raises(ChartVLMError, match=r"test_human.json: not valid UTF-8 \(byte 0xe9"):
        load_chartqa(str(tmp_path), split="test")


def test_a_utf8_byte_order_mark_is_not_a_bad_row(images, tmp_path):
    path = images[0].parent / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _line("imgs/rgb.png").encode() + b"\n")
    assert load_chartqa(str(path), cache_dir=str(tmp_path / "cache"))["query"] == ["What is the value?"]


def test_a_source_whose_rows_are_all_bad_is_an_error(images, tmp_path):
    path = images[0].parent / "all_bad.jsonl"
    path.write_text("{oops\n" + _line("imgs/gone.png") + "\n")
    with pytest.raises(ChartVLMError, match=r"every row is bad \(2 rows, each listed with its reason in skipped.jsonl\)"):
        load_chartqa(str(path), cache_dir=str(tmp_path / "cache"), on_bad_sample="skip")
    broken = images[0].parent / "all_broken_images.jsonl"
    broken.write_text(_line("imgs/corrupt.png") + "\n" + _line("imgs/thin.png") + "\n")
    dataset = load_chartqa(str(broken), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ChartVLMError, match=r"broken \(train\): no usable rows left \(2 checked\)"):
        validate_rows(dataset, SkippedRows("skip"), "broken (train)")


def test_jsonl_loading_streams(images, tmp_path):
    """Python memory while loading does not grow with the number of lines: rows are never all held."""
    folder = images[0].parent

    def peak(n):
        path = folder / f"stream_{n}.jsonl"
        path.write_text("".join(_line("imgs/rgb.png", query=f"What is the value of bar {i}? " + "x" * 200,
                                      label=str(i)) + "\n" for i in range(n)))
        tracemalloc.start()
        dataset = load_chartqa(str(path), cache_dir=str(tmp_path / f"cache{n}"))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert len(dataset) == n
        return top

    peak(10)  # the first load imports parts of datasets and pyarrow: not the loader's own memory
    small, large = peak(300), peak(2000)
    # Holding 1,700 more rows of ~300 characters at once would add over 1 MB.
    assert large - small < MB / 2, (small / MB, large / MB)


# ---- the validation pass: images are checked once, before a run uses them ------------------------


@pytest.mark.parametrize("name, reason", [
    ("corrupt.png", "not an image format Pillow can read"), ("truncated.png", "image cannot be read"),
    ("flipped.png", "broken PNG file"), ("empty.png", "image cannot be read"), ("gone.png", "image file not found"),
    ("thin.png", "more than 200x the short side"), ("bomb.png", "decompression bomb"),
])
def test_unusable_images_are_bad_samples(images, name, reason):
    with pytest.raises(BadSampleError) as info:
        check_image({"bytes": None, "path": str(images[0] / name)}, "data (test) row test-7")
    assert info.value.where == "data (test) row test-7"
    assert reason in info.value.reason


def test_corrupt_embedded_bytes_are_a_bad_sample():
    with pytest.raises(BadSampleError, match="embedded image bytes"):
        check_image({"bytes": b"\x89PNG garbage", "path": None}, "row 3")
    with pytest.raises(BadSampleError, match="no image"):
        check_image({"bytes": None, "path": None}, "row 3")


def test_validation_under_the_error_policy_names_the_row(messy, tmp_path):
    dataset = load_chartqa(str(messy), cache_dir=str(tmp_path / "cache"), on_bad_sample="skip")
    with pytest.raises(BadSampleError) as info:
        validate_rows(dataset, SkippedRows("error"), "messy (train)")
    first = _lines("image")[0]
    assert info.value.where == f"{messy}:{first}", "a bad image is named by its file and line"
    assert _reason(first) in info.value.reason and "corrupt.png" in info.value.reason


@pytest.mark.parametrize("drop", [True, False])
def test_validation_skips_bad_images_and_drops_duplicates_only_when_asked(messy, tmp_path, drop):
    dataset = load_chartqa(str(messy), cache_dir=str(tmp_path / "cache"), on_bad_sample="skip")
    skipped = SkippedRows("skip")
    kept, sizes = validate_rows(dataset, skipped, "messy", measure=lambda row, w, h: (w, h), drop_duplicates=drop)
    duplicate = _lines("dup")
    assert kept["row_id"] == [f"train-{n - 1}" for n in sorted(_lines("ok") + ([] if drop else duplicate))]
    assert sizes == [SIZE] * 5 + [(10, 10)] + ([] if drop else [SIZE])
    assert skipped.duplicates == 1
    dropped = sorted([(n, "bad") for n in _lines("image")] + ([(duplicate[0], "duplicate")] if drop else []))
    assert [(r["row_id"], r["kind"]) for r in skipped.records] == [(f"train-{n - 1}", kind) for n, kind in dropped]


def test_skipped_jsonl_is_written_atomically_with_every_record(tmp_path, caplog):
    skipped = SkippedRows("skip", log_first=2)
    with caplog.at_level(logging.WARNING, logger="chartvlm"):
        for i in range(7):
            skipped.bad(BadSampleError(f"f.jsonl:{i + 1}", f"reason {i}"), f"train-{i}")
        path = skipped.write(tmp_path / "run")
    assert read_jsonl(path) == [{"where": f"f.jsonl:{i + 1}", "row_id": f"train-{i}", "kind": "bad",
                                 "reason": f"reason {i}"} for i in range(7)]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [SKIPPED_FILENAME]
    assert [r.getMessage() for r in caplog.records] == [
        "skipped f.jsonl:1: reason 0", "skipped f.jsonl:2: reason 1",
        f"left out 7 rows (7 bad); all listed in {path}"]
    SkippedRows("skip").write(tmp_path / "empty")
    assert (tmp_path / "empty" / SKIPPED_FILENAME).read_text() == ""
    with pytest.raises(ChartVLMError, match="on_bad_sample must be one of skip, error"):
        SkippedRows("ignore")


# ---- the collator: every image mode, huge and tiny images, unusable rows ---------------------------


@pytest.mark.parametrize("name", ["rgb.png", "rgba.png", "palette.png", "palette_transparent.png", "gray.png",
                                  "gray_alpha.png", "bilevel.png", "cmyk.tif", "cmyk.jpg", "gray16.png",
                                  "rgb16.png", "tiny.png"])
def test_every_image_mode_reaches_the_processor_as_rgb(tiny, images, name):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    _, processor = tiny
    folder, expected = images
    width, height = check_image({"bytes": None, "path": str(folder / name)}, name)
    image = model_image(str(folder / name), processor, name)
    assert image.mode == "RGB" and image.size == (width, height)
    if expected[name] is not None:
        assert image.getpixel((0, 0)) == expected[name]
    else:  # a lossy CMYK JPEG: close to its red
        assert np.abs(np.subtract(image.getpixel((5, 5)), (255, 0, 0))).max() <= 8
    batch = collate_fn([{"image": Image.open(folder / name), "query": "q?", "label": ["1"]}], processor)
    h, w = smart_resize(height, width, factor=28, min_pixels=processor.image_processor.size["shortest_edge"],
                        max_pixels=TEST_MAX_PIXELS)
    assert batch["image_grid_thw"].tolist() == [[1, h // 14, w // 14]]


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    """A 10000x10000 chart: 1e8 pixels, above Pillow's warning threshold and below its refusal limit."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    image = Image.new("RGB", (10000, 10000), "white")
    image.paste((200, 30, 30), (1000, 2000, 4000, 10000))
    image.save(path, compress_level=1)
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_huge_image_is_shrunk_right_after_decoding(tiny, huge_png):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    _, processor = tiny
    assert check_image({"bytes": None, "path": str(huge_png)}, "huge") == (10000, 10000)
    image = Image.open(huge_png)
    image.load()  # as datasets hands it over: decoded
    tracemalloc.start()
    batch = collate_fn([{"image": image, "query": "What is the value?", "label": ["1"]}], processor)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # The processor gets the small image: its uint8 and float copies of the full one (0.3, 1.2 GB) never exist.
    assert peak < 32 * MB, f"{peak / MB:.0f} MB"
    side, _ = smart_resize(10000, 10000, factor=28, min_pixels=3136, max_pixels=TEST_MAX_PIXELS)  # 196
    assert batch["image_grid_thw"].tolist() == [[1, side // 14, side // 14]]
    # The shrunk chart is still the chart: the red block covers 10%-40% of the width, 20%-100% of the height.
    small = model_image(str(huge_png), processor)
    assert small.size == (side, side)
    assert small.getpixel((50, 150)) == (200, 30, 30) and small.getpixel((150, 150)) == (255, 255, 255)


def test_collator_names_the_row_of_an_unusable_sample(tiny, images):
    _, processor = tiny
    folder, _ = images
    good = {"image": Image.open(folder / "rgb.png"), "query": "q?", "label": ["1"], "row_id": "train-0"}
    cases = [
        ({"image": {"bytes": b"garbage", "path": None}}, "not an image format Pillow can read"),
        ({"image": str(folder / "gone.png")}, "image file not found"),
        ({"image": str(folder / "truncated.png")}, "image cannot be decoded"),
        ({"image": Image.new("RGB", (1000, 4))}, "more than 200x the short side"),
        ({"image": None}, "expected a chart image, got NoneType"),
        ({"query": "  "}, "the question must be a non-empty string"),
        ({"label": []}, "no answer"),
        ({"label": None}, "no answer"),
    ]
    for change, reason in cases:
        with pytest.raises(BadSampleError) as info:
            collate_fn([good, {**good, "row_id": "train-5", **change}], processor)
        assert info.value.where == "row train-5" and reason in info.value.reason, (change, str(info.value))


def test_collator_supervises_the_first_of_several_labels_and_unicode_exactly(tiny, images):
    _, processor = tiny
    folder, _ = images
    rows = [{"image": Image.open(folder / "rgb.png"), "query": "Quelle part ? 売上 📈", "label": ["naïve 📈", "x"]},
            {"image": Image.open(folder / "tiny.png"), "query": "What?", "label": ["6.8", "6.80"]}]
    batch = collate_fn(rows, processor)
    supervised = [processor.tokenizer.decode(ids[labels != IGNORE_INDEX])
                  for ids, labels in zip(batch["input_ids"], batch["labels"])]
    assert supervised == ["naïve 📈<|im_end|>", "6.8<|im_end|>"]
    assert "Quelle part ? 売上 📈" in processor.tokenizer.decode(batch["input_ids"][0])


# ---- training and evaluation runs ------------------------------------------------------------------


def _no_model(*args, **kwargs):
    raise AssertionError("model loaded")


def test_training_skips_bad_rows_lists_them_and_trains_on_the_rest(tiny_model_dir, messy, tmp_path):
    from chartvlm.train import main as train_main

    saved = train_main(parse_config(run_args(tiny_model_dir, messy, tmp_path / "run", "--max_steps", "1")))
    records = read_jsonl(saved / SKIPPED_FILENAME)
    # Loader rejections first (file:line), then the validation pass in row order (images, the duplicate).
    at_image_pass = sorted([(n, "bad") for n in _lines("image")] + [(_lines("dup")[0], "duplicate")])
    assert [(r["row_id"], r["kind"]) for r in records] == [(f"train-{n - 1}", "bad") for n in _lines("load")] \
        + [(f"train-{n - 1}", kind) for n, kind in at_image_pass]
    assert [r["where"] for r in records[: len(_lines("load"))]] == [f"{messy}:{n}" for n in _lines("load")]
    state = json.loads((saved / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and math.isfinite(state["log_history"][0]["loss"])


def test_samples_over_max_length_are_dropped_and_listed(messy, tmp_path):
    from chartvlm.train import drop_overlong

    dataset = load_chartqa(str(messy), cache_dir=str(tmp_path / "cache"), on_bad_sample="skip").select(range(4))
    skipped = SkippedRows("skip")
    kept, lengths = drop_overlong(dataset, [90, 130, 100, 131], 100, "messy (train)", skipped)
    assert kept["row_id"] == ["train-0", "train-2"] and lengths == [90, 100]
    assert [(r["where"], r["kind"], r["reason"]) for r in skipped.records] == [
        ("messy (train) row train-1", "too_long", "130 tokens, longer than max_length=100"),
        ("messy (train) row train-3", "too_long", "131 tokens, longer than max_length=100")]


def test_evaluation_refuses_bad_rows_by_default_before_loading_a_model(tiny_model_dir, messy, tmp_path,
                                                                      monkeypatch):
    import chartvlm.modeling
    from chartvlm.evaluate import run_eval

    monkeypatch.setattr(chartvlm.modeling, "load_model", _no_model)
    config = parse_config(run_args(tiny_model_dir, messy, tmp_path, "--test_split", "test"))
    with pytest.raises(BadSampleError) as info:
        run_eval(config, progress=False)
    first = _lines("load")[0]
    assert info.value.where == f"{messy}:{first}" and _reason(first) in info.value.reason
    assert "on_bad_sample=skip" in str(info.value)


def test_evaluation_with_skip_scores_the_rest_and_records_what_it_left_out(tiny_model_dir, messy, tmp_path):
    from chartvlm.evaluate import run_eval

    config = parse_config(run_args(tiny_model_dir, messy, tmp_path, "--test_split", "test", "--on_bad_sample", "skip",
                                   "--eval_max_new_tokens", "2", "--eval_batch_size", "8", "--report", "false"))
    result = run_eval(config, progress=False)["model"]
    out = tmp_path / "eval"
    left_out = _lines("load") + _lines("image")
    assert [r["row_id"] for r in read_jsonl(out / SKIPPED_FILENAME)] == [f"test-{n - 1}" for n in left_out]
    # Duplicates are never dropped from an evaluation: reported, and each one is scored.
    scored = sorted(_lines("ok") + _lines("dup"))
    assert [row["id"] for row in read_jsonl(out / "predictions.jsonl")] == [f"test-{n - 1}" for n in scored]
    assert result.overall["total"] == len(scored)
    questions = result.questions
    assert (questions["on_bad_sample"], questions["skipped"], questions["duplicated"]) == ("skip", len(left_out), 1)
    assert questions["in_split"] == len(scored) + len(left_out) and questions["evaluated"] == len(scored)


def test_cli_reports_a_bad_row_without_a_stack_trace(tiny_model_dir, messy, tmp_path):
    args = run_args(tiny_model_dir, messy, tmp_path, "--test_split", "test")
    result = subprocess.run([sys.executable, "-m", "chartvlm.cli", "eval", *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert f"{messy}:{_lines('load')[0]}: image file not found" in result.stderr
    assert "on_bad_sample=skip" in result.stderr and "Traceback" not in result.stderr


# ---- invalid configuration fails before any model is loaded ---------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--on_bad_sample_policy", "skip"], "(?s)unknown configuration key.*did you mean: on_bad_sample"),
    (["--eval_batch_size", "0"], "eval_batch_size must be at least 1"),
    (["--max_new_tokens", "0"], "max_new_tokens must be at least 1"),
    (["--learning_rate", "-1"], "learning_rate must not be negative"),
    (["--num_train_epochs", "-1"], "num_train_epochs must be positive"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be at least 1"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be at least 1"),
    (["--lora_r", "-4"], "lora_r and lora_alpha must be positive"),
    (["--max_length", "-1"], "max_length must be positive"),
    (["--min_pixels", "5000", "--max_pixels", "4000"], "min_pixels <= max_pixels"),
    (["--subset", "-3"], "subset must be"),
])
def test_invalid_values_fail_with_what_to_change(flags, message):
    with pytest.raises(ChartVLMError, match=message):
        parse_config(flags)


def test_an_invalid_policy_in_a_yaml_file_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  on_bad_sample: ignore\n")
    with pytest.raises(ChartVLMError, match="on_bad_sample must be skip or error"):
        parse_config(["--config", str(path)])


def test_qlora_without_cuda_fails_before_loading_anything(tiny_model_dir, messy, tmp_path, monkeypatch):
    import torch

    import chartvlm.modeling
    from chartvlm.train import main as train_main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(chartvlm.modeling, "load_model", _no_model)
    monkeypatch.setattr(chartvlm.modeling, "load_processor", _no_model)
    with pytest.raises(ChartVLMError, match="qlora needs a CUDA GPU"):
        train_main(parse_config(run_args(tiny_model_dir, messy, tmp_path, "--tuning", "qlora")))


def test_finishing_an_evaluation_streams_the_predictions(tmp_path):
    """Sorting predictions.jsonl into dataset order and summarising it hold no row text: Python memory
    grows by well under 1 KB per question (the rows themselves take ~1.5 KB each as Python objects)."""
    import random

    from chartvlm.evaluate import EvalSettings, _put_in_dataset_order, write_result

    settings = EvalSettings(model="m", adapter=None, dataset="d", split="test", subset_seed=0)

    def peak(n):
        out = tmp_path / str(n)
        out.mkdir()
        rows = [{"id": f"test-{i}", "index": i, "question": f"What does the orange bar represent? ({i})",
                 "labels": ["Public"], "prediction": "Public" if i % 3 else "", "correct": bool(i % 3),
                 "split": "augmented" if i % 2 else "human", "question_type": "legend", "chart_type": None}
                for i in range(n)]
        random.Random(0).shuffle(rows)
        (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        del rows
        tracemalloc.start()
        _put_in_dataset_order(out / "predictions.jsonl")
        metrics = write_result(out, settings, questions_timed=n, seconds=1.0)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert [r["index"] for r in read_jsonl(out / "predictions.jsonl")] == list(range(n))
        assert metrics.overall["correct"] == sum(1 for i in range(n) if i % 3)
        return top

    small, large = peak(1000), peak(10000)
    assert (large - small) / 9000 < 600, (small / MB, large / MB)
