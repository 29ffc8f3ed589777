"""Offline builders (the tiny Qwen2.5-VL of the quick start and the test suite; families.py covers every family):
token ids, chat format, save/reload, determinism, presets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chartvlm.errors import ChartVLMError
from chartvlm.families import FAMILIES
from chartvlm.modelinit import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    PRESETS,
    build_config,
    build_model,
    build_model_and_processor,
    build_processor,
    build_tokenizer_for,
    init_model,
)
from chartvlm.tokenizer import build_tokenizer

QWEN25 = FAMILIES["qwen2_5_vl"]
CHAT_TEMPLATE = QWEN25.chat_template()
CONTROL_TOKENS = [token.content for token in QWEN25.tokens]

SRC = Path(__file__).resolve().parents[1] / "src"
SMALL_MAX_PIXELS = 112 * 112  # keeps test batches small; each image <= 16 image tokens


@pytest.fixture(scope="module")
def tiny():
    return build_model_and_processor("tiny", seed=0, max_pixels=SMALL_MAX_PIXELS)


def _images() -> list[Image.Image]:
    """Two deterministic RGB images of different sizes."""
    rng = np.random.RandomState(0)
    return [
        Image.fromarray(rng.randint(0, 256, (84, 112, 3), dtype=np.uint8)),
        Image.fromarray(rng.randint(0, 256, (112, 56, 3), dtype=np.uint8)),
    ]


def _conversation(question: str, answer: str) -> list[dict]:
    return [
        {"role": "system", "content": [{"type": "text", "text": "You are a chart analyst."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def _batch(processor):
    texts = [
        processor.apply_chat_template(_conversation("Which bar is highest?", "Apple"), tokenize=False),
        processor.apply_chat_template(_conversation("What is the value in 2014?", "6.8"), tokenize=False),
    ]
    return processor(text=texts, images=_images(), return_tensors="pt", padding=True)


# ------------------------------------------------------------------ token ids


def test_control_tokens_follow_bpe_in_qwen_order_and_config_uses_tokenizer_ids(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids(CONTROL_TOKENS)
    first = ids[0]
    assert ids == list(range(first, first + len(CONTROL_TOKENS)))
    assert first == PRESETS["tiny"].bpe_pieces == 2034 and len(tok) == first + 22
    assert (tok.pad_token, tok.eos_token) == ("<|endoftext|>", "<|im_end|>")
    # Only the 14 tokens the released tokenizer marks special are skipped when decoding.
    assert tok.decode([ids[1], ids[14]], skip_special_tokens=True) == "<tool_call>"

    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") == processor.image_token_id
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>") == processor.video_token_id
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.text_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert cfg.text_config.bos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert cfg.text_config.vocab_size == len(tok)
    assert model.generation_config.eos_token_id == [tok.eos_token_id, tok.pad_token_id]
    assert model.generation_config.pad_token_id == tok.pad_token_id
    # Special tokens are atomic in text (never split into BPE pieces).
    assert tok("<|im_start|>user\n<|image_pad|>").input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok("<|im_start|>user\n<|image_pad|>").input_ids[-1] == cfg.image_token_id


def test_the_endoftext_embedding_row_is_not_zeroed(tiny):
    """The released checkpoints have no pad_token_id in their text config; with one, transformers zeroes that
    embedding row (<|endoftext|>) at initialisation, which no real checkpoint has."""
    model, processor = tiny
    assert model.config.text_config.pad_token_id is None
    row = model.get_input_embeddings().weight[processor.tokenizer.pad_token_id]
    assert row.abs().sum() > 0


def test_numbers_tokenise_digit_by_digit(tiny):
    tok = tiny[1].tokenizer
    assert tok.tokenize("1625942") == list("1625942")
    assert tok.tokenize("6.8") == ["6", ".", "8"]
    assert tok.tokenize("In 2014") == ["In", "Ġ", "2", "0", "1", "4"]
    text = "What is the value of Apple in 2014? 12.5 Yes No"
    assert tok.decode(tok(text).input_ids) == text
    # The trained BPE learned whole words from the built-in corpus (not just bytes).
    assert tok.tokenize("What is the value") == ["What", "Ġis", "Ġthe", "Ġvalue"]


def test_build_tokenizer_rejects_too_small_vocab():
    with pytest.raises(ChartVLMError, match="bpe_pieces=100"):
        build_tokenizer(QWEN25, 100)


# ------------------------------------------------------------------ chat template


def test_chat_template_matches_qwen25vl_format_exactly(tiny):
    processor = tiny[1]
    conversation = _conversation("Which bar is highest?", "Apple")
    expected = (
        "<|im_start|>system\nYou are a chart analyst.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which bar is highest?<|im_end|>\n"
        "<|im_start|>assistant\nApple<|im_end|>\n"
    )
    assert processor.chat_template == processor.tokenizer.chat_template == CHAT_TEMPLATE
    assert processor.apply_chat_template(conversation, tokenize=False) == expected
    assert processor.tokenizer.apply_chat_template(conversation, tokenize=False) == expected
    # Qwen's template renders content items without a "type" key too (ours once dropped them).
    untyped = [{"role": "user", "content": [{"image": "chart.png"}, {"text": "Q?"}]}]
    assert processor.apply_chat_template(untyped, tokenize=False).endswith(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n")


def test_chat_template_default_system_plain_string_and_generation_prompt(tiny):
    processor = tiny[1]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    assert processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    plain = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(plain, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


# ------------------------------------------------------------------ processor


def test_processor_default_pixel_limits_give_256_tokens_for_448px_image():
    processor = build_processor(QWEN25, build_tokenizer(QWEN25))
    size = processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    assert (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS) == (3136, 1_003_520)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}], tokenize=False
    )
    batch = processor(text=[text], images=[Image.new("RGB", (448, 448), "white")], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 32, 32]]
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == (448 // 28) ** 2 == 256
    assert "mm_token_type_ids" in batch


def test_processor_max_pixels_caps_image_tokens():
    processor = build_processor(QWEN25, build_tokenizer(QWEN25), max_pixels=224 * 224)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
    batch = processor(text=[text], images=[Image.new("RGB", (800, 600), "white")], return_tensors="pt")
    assert int((batch["input_ids"] == processor.image_token_id).sum()) <= (224 // 28) ** 2
    with pytest.raises(ChartVLMError, match="min_pixels"):
        build_processor(QWEN25, build_tokenizer(QWEN25), min_pixels=5000, max_pixels=4000)


# ------------------------------------------------------------------ model


def test_build_is_deterministic_per_seed_and_leaves_global_rng_alone(tiny):
    tokenizer = tiny[1].tokenizer
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_model("tiny", tokenizer, seed=0).state_dict()
    assert torch.equal(torch.rand(3), expected_next)
    b = tiny[0].state_dict()
    c = build_model("tiny", tokenizer, seed=1).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert all(v.dtype == torch.float32 for v in a.values())


def test_tiny_forward_backward_reaches_vision_tower(tiny):
    model, processor = tiny
    batch = _batch(processor)
    model.zero_grad()
    model.train()
    try:
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
    finally:
        model.eval()
    n_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert n_tokens == int(batch["image_grid_thw"].prod(-1).sum()) // 4
    assert out.logits.shape == (*batch["input_ids"].shape, len(processor.tokenizer))
    # Random init: loss is about ln(vocab); gradient flows into the vision patch embedding.
    assert abs(out.loss.item() - np.log(len(processor.tokenizer))) < 1.0
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied, as the 3B
    model.zero_grad()


def test_unknown_preset_is_a_clear_error(tiny):
    with pytest.raises(ChartVLMError, match="unknown model preset 'qwen-99b'"):
        build_model("qwen-99b", tiny[1].tokenizer)


# ------------------------------------------------------------------ save / reload


_RELOAD_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    sys.path.insert(0, sys.argv[3])
    from test_modelinit import _batch
    from chartvlm.modelinit import build_model_and_processor

    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
    processor = AutoProcessor.from_pretrained(sys.argv[1])
    batch = _batch(processor)
    with torch.no_grad():
        logits = model(**batch).logits
    torch.save({"batch": dict(batch), "logits": logits}, sys.argv[2] + ".pt")
    # The same build in a fresh process must give the same tokenizer and weights.
    fresh, fresh_proc = build_model_and_processor("tiny", seed=0)
    digest = hashlib.sha256()
    for k, v in sorted(fresh.state_dict().items()):
        digest.update(k.encode()); digest.update(v.numpy().tobytes())
    json.dump({
        "model_class": type(model).__name__,
        "processor_class": type(processor).__name__,
        "tokenizer_class": type(processor.tokenizer).__name__,
        "image_processor_class": type(processor.image_processor).__name__,
        "max_pixels": processor.image_processor.size["longest_edge"],
        "min_pixels": processor.image_processor.size["shortest_edge"],
        "chat_template": processor.chat_template,
        "tokenizer_chat_template": processor.tokenizer.chat_template,
        "vocab": processor.tokenizer.get_vocab(),
        "fresh_vocab": fresh_proc.tokenizer.get_vocab(),
        "eos": processor.tokenizer.eos_token, "pad": processor.tokenizer.pad_token,
        "dtype": str(model.dtype),
        "fresh_state_sha": digest.hexdigest(),
    }, open(sys.argv[2] + ".json", "w"))
    """
)


def test_init_model_reloads_offline_with_identical_logits(tiny, tmp_path):
    model, processor = tiny
    out = init_model("tiny", tmp_path / "tiny-model", seed=0, max_pixels=SMALL_MAX_PIXELS)
    assert out == tmp_path / "tiny-model"
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()
    }
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-model"]  # no temp dir left behind

    # Reload in a fresh process with the hub switched off, so nothing in this process helps.
    result = tmp_path / "reloaded"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, str(out), str(result), str(Path(__file__).parent)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(Path(str(result) + ".json").read_text())
    reloaded = torch.load(str(result) + ".pt")

    assert info["model_class"] == "Qwen2_5_VLForConditionalGeneration"
    assert info["processor_class"] == "Qwen2_5_VLProcessor"
    assert info["tokenizer_class"] == type(processor.tokenizer).__name__
    assert info["image_processor_class"] == type(processor.image_processor).__name__
    assert (info["min_pixels"], info["max_pixels"]) == (DEFAULT_MIN_PIXELS, SMALL_MAX_PIXELS)
    assert info["chat_template"] == info["tokenizer_chat_template"] == CHAT_TEMPLATE
    assert info["vocab"] == processor.tokenizer.get_vocab() == info["fresh_vocab"]
    assert (info["eos"], info["pad"]) == ("<|im_end|>", "<|endoftext|>")
    assert info["dtype"] == "torch.float32"

    batch = _batch(processor)
    assert batch.keys() == reloaded["batch"].keys()
    for key in batch:
        assert torch.equal(batch[key], reloaded["batch"][key]), key
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.equal(logits, reloaded["logits"])

    import hashlib

    digest = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        digest.update(k.encode())
        digest.update(v.numpy().tobytes())
    assert info["fresh_state_sha"] == digest.hexdigest()


def test_init_model_refuses_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(ChartVLMError, match="not empty"):
        init_model("tiny", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------ presets


@pytest.mark.parametrize(
    "preset, n_params, n_vision, vocab, tied",
    [
        # Known sizes of the real checkpoints: 3.75 B (3B-Instruct) and 8.29 B (7B-Instruct).
        ("qwen2.5-vl-3b", 3_754_622_976, 668_684_288, 151_936, True),
        ("qwen2.5-vl-7b", 8_292_166_656, 676_550_144, 152_064, False),
    ],
)
def test_full_size_presets_have_real_parameter_counts(preset, n_params, n_vision, vocab, tied):
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer_for(preset)
    config = build_config(preset, tokenizer)
    assert config.text_config.vocab_size == vocab > len(tokenizer)
    assert config.tie_word_embeddings is tied
    # Our small BPE at full size puts the control tokens at their released ids.
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|image_pad|>"]) == [151643, 151645,
                                                                                                  151655]
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert sum(p.numel() for p in model.model.visual.parameters()) == n_vision


@pytest.mark.parametrize("preset", sorted(name for name, preset in PRESETS.items() if not preset.published))
def test_tiny_preset_invariants(preset):
    spec = PRESETS[preset]
    text = spec.text
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    rope = text["rope_parameters"]
    rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    assert sum(rope["mrope_section"]) == rotary // 2
    assert max(spec.vision.get("fullatt_block_indexes", [0])) < spec.vision["depth"]
    width = spec.vision.get("hidden_size", spec.vision.get("embed_dim"))
    assert width % spec.vision["num_heads"] == 0
