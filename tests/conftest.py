"""Shared fixtures: a tiny random Qwen2.5-VL built in-process and small ChartQA-style datasets.

Everything is offline: HF_HUB_OFFLINE=1 is set for the whole session, so a test that touched the hub
by mistake would fail instead of hanging.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Content digests of test models are cached per session, not in the user's ~/.cache.
os.environ.setdefault("CHARTVLM_CACHE", tempfile.mkdtemp(prefix="chartvlm-test-cache-"))

import pytest  # noqa: E402

# 224x224 at most: 64 image tokens per chart keeps every CPU test fast.
TEST_MIN_PIXELS = 3136
TEST_MAX_PIXELS = 224 * 224


def chart_image(width: int, height: int, colour: tuple[int, int, int], bars: list[int]):
    """A crude bar chart, enough for the vision tower to see different inputs."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    step = width // (len(bars) + 1)
    for i, value in enumerate(bars):
        x = step * (i + 1)
        draw.rectangle([x - step // 3, height - value, x + step // 3, height - 1], fill=colour)
    return image


def chart_rows(n: int = 12) -> list[dict]:
    """n ChartQA rows with mixed image sizes, both splits and a multi-label row."""
    sizes = [(200, 150), (120, 220), (256, 256), (300, 120)]
    palette = [(200, 30, 30), (30, 30, 200), (30, 160, 30)]
    rows = []
    for i in range(n):
        bars = [(i * 7 + j * 13) % 90 + 10 for j in range(3)]
        top = max(range(3), key=lambda j: bars[j])
        rows.append({
            "image": chart_image(*sizes[i % len(sizes)], palette[i % 3], bars),
            "query": f"Which bar is the tallest in chart {i}?" if i % 2 else "What is the value of the first bar?",
            "label": [["A", "B", "C"][top]] if i % 2 else [str(bars[0])] + (["ten"] if i == 4 else []),
            "human_or_machine": i % 2,
        })
    return rows


@pytest.fixture(scope="session")
def tiny():
    """(model, processor): the tiny preset, random init, fp32, eval mode. Do not modify it in a test."""
    from chartvlm.modelinit import build_model_and_processor

    model, processor = build_model_and_processor("tiny", seed=0, min_pixels=TEST_MIN_PIXELS,
                                                 max_pixels=TEST_MAX_PIXELS)
    model.eval()
    return model, processor


def scramble(model, seed: int = 0):
    """Weights ~ N(0, 0.15): greedy outputs then vary with the input (the plain random init repeats one token,
    which would make generation tests vacuous)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    return model.eval()


@pytest.fixture(scope="session")
def scrambled(tiny):
    import copy

    model, processor = tiny
    return scramble(copy.deepcopy(model)), processor


# Every family's tiny preset with our tokenizer, and the families whose real vocabulary is available offline
# (PyPI dashscope's qwen.tiktoken) with it: the matrix behaviour tests run over.
FAMILY_KINDS = [(family, "ours") for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5",
                                                "qwen3_5_moe")]
TOKENIZER_KINDS = [("qwen2_5_vl", "ours"), ("qwen2_5_vl", "qwen")]
ALL_KINDS = FAMILY_KINDS + [(family, "qwen") for family in ("qwen2_vl", "qwen3_vl")] + [TOKENIZER_KINDS[1]]


@functools.lru_cache(maxsize=None)
def tiny_of(family: str, tokenizer: str = "ours", scrambled: bool = False):
    """(model, processor) of a family's tiny preset, built once per session. Do not modify the model."""
    from chartvlm.modelinit import TINY_PRESETS, build_model_and_processor

    model, processor = build_model_and_processor(TINY_PRESETS[family], seed=0, min_pixels=TEST_MIN_PIXELS,
                                                 max_pixels=TEST_MAX_PIXELS, tokenizer=tokenizer)
    return (scramble(model) if scrambled else model.eval()), processor


def kind_id(kind) -> str:
    return f"{kind[0]}-{kind[1]}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny preset saved to disk, as `chartvlm model init` writes it."""
    from chartvlm.modelinit import init_model

    return init_model("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0,
                      min_pixels=TEST_MIN_PIXELS, max_pixels=TEST_MAX_PIXELS)


@pytest.fixture(scope="session")
def chart_dataset_dir(tmp_path_factory):
    """A save_to_disk DatasetDict (train/val/test) of chart_rows."""
    from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value

    features = Features({"image": Image(), "query": Value("string"), "label": Sequence(Value("string")),
                         "human_or_machine": Value("int64")})
    rows = chart_rows(16)
    splits = DatasetDict({
        "train": Dataset.from_list(rows[:10], features=features),
        "val": Dataset.from_list(rows[10:13], features=features),
        "test": Dataset.from_list(rows[13:], features=features),
    })
    path = tmp_path_factory.mktemp("data") / "charts"
    splits.save_to_disk(str(path))
    return path


def run_args(model_dir, data_dir, out_dir, *extra: str) -> list[str]:
    """Command-line options for a tiny, fast training run."""
    return [
        "--model_name_or_path", str(model_dir), "--dataset", str(data_dir), "--subset", "1.0",
        "--output_dir", str(out_dir), "--eval_output_dir", str(out_dir / "eval"),
        "--min_pixels", str(TEST_MIN_PIXELS), "--max_pixels", str(TEST_MAX_PIXELS),
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
        "--optim", "adamw_torch", "--learning_rate", "1e-2", "--activation_checkpointing", "false",
        "--report_to", "none", "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
        "--max_new_tokens", "4", "--dataloader_num_workers", "0", "--seed", "0", *extra,
    ]


# --- headless browser (the report and the serve page) ---------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def chromium_paths() -> tuple[str, str]:
    """(browser, driver) paths; installs Debian's chromium + chromium-driver if missing and root."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install 'selenium>=4.20')")
    if not os.path.exists("/usr/bin/chromium"):
        if os.geteuid() != 0:
            pytest.skip("/usr/bin/chromium is missing and we are not root to apt-get install chromium chromium-driver")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium", "chromium-driver"]):
            try:
                subprocess.run(command, check=True, capture_output=True, text=True, timeout=900, env=env)
            except (OSError, subprocess.SubprocessError) as exc:
                detail = getattr(exc, "stderr", "") or ""
                pytest.skip(
                    f"could not install chromium for the browser test ({' '.join(command)}): {exc} {detail[-500:]}"
                )
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not os.path.exists("/usr/bin/chromium") or not os.path.exists(driver):
        pytest.skip("chromium or chromedriver still missing after apt-get install chromium chromium-driver")
    return "/usr/bin/chromium", driver


@pytest.fixture()
def browser(chromium_paths, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = chromium_paths
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.add_argument("--window-size=1400,1000")
    # An explicit driver path keeps Selenium Manager (which would go online) out of it.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()
