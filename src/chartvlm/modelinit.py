"""Build randomly initialised Qwen vision-language models, tokenizers and processors offline.

Nothing can be downloaded from the Hugging Face Hub on our machines, so tests, CPU benchmarks and speed
measurements use models built in-process: a tokenizer (`chartvlm.tokenizer`: our small BPE, or the real
Qwen vocabulary with `tokenizer="qwen"`) with the family's control tokens and published chat template,
the family's stock processor classes and a random-weight model of the family's transformers class.

Presets (`PRESETS`):
- `tiny-<family>` for tests (`tiny` is tiny-qwen2.5-vl, the quick start's), `small` for the CPU benchmark;
- shape presets with a checkpoint's published config.json (`presets/*.json`, sources in presets/SOURCES.md):
  qwen2-vl-2b, qwen2.5-vl-3b/7b, qwen3-vl-2b/4b/8b, qwen3-vl-30b-a3b, qwen3.5-0.8b/4b/9b. Random weights, for
  speed and memory measurements only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from chartvlm.config import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from chartvlm.errors import ChartVLMError
from chartvlm.families import FAMILIES, Family
from chartvlm.io import make_readable

logger = logging.getLogger(__name__)

TOKENIZERS = ("ours", "qwen")
# Embedding rows of the released Qwen2/2.5/3 checkpoints (the vocabulary padded to a multiple of 128).
QWEN_EMBEDDING_ROWS = 151_936


@dataclass(frozen=True)
class Preset:
    family: str
    bpe_pieces: int = 2034            # our BPE's pieces (the control tokens come on top)
    published: str | None = None      # presets/<name>.json: a checkpoint's config.json
    text: dict[str, Any] = field(default_factory=dict)      # a tiny configuration
    vision: dict[str, Any] = field(default_factory=dict)
    tie_word_embeddings: bool = True


_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu"}
# mrope_section sums to half of the rotary dimensions (head_dim x partial_rotary_factor).
_ROPE_QWEN2 = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]}
_ROPE_QWEN3 = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
_ROPE_QWEN3_5 = {"rope_type": "default", "rope_theta": 10_000_000.0, "mrope_section": [2, 1, 1],
                 "mrope_interleaved": True, "partial_rotary_factor": 0.25}
_VISION_QWEN3 = {"depth": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64, "patch_size": 16,
                 "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
                 "hidden_act": "gelu_pytorch_tanh", "in_channels": 3}
_LINEAR_ATTENTION = {"num_hidden_layers": 4, "head_dim": 32, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
                     "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_conv_kernel_dim": 4,
                     "full_attention_interval": 2}
_EXPERTS = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}

PRESETS: dict[str, Preset] = {
    # The quick start's and the test suite's model (Qwen2.5-VL), and its bigger CPU-benchmark sibling.
    "tiny": Preset("qwen2_5_vl", text={**_TEXT, "rope_parameters": _ROPE_QWEN2}, vision={
        "depth": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64, "patch_size": 14,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [1],
        "tokens_per_second": 2, "hidden_act": "silu", "in_channels": 3}),
    "small": Preset("qwen2_5_vl", bpe_pieces=4082, text={
        **_TEXT, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 688,
        "rope_parameters": {**_ROPE_QWEN2, "mrope_section": [4, 6, 6]}}, vision={
        "depth": 4, "hidden_size": 128, "num_heads": 4, "intermediate_size": 256, "patch_size": 14,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [1, 3],
        "tokens_per_second": 2, "hidden_act": "silu", "in_channels": 3}),
    "tiny-qwen2-vl": Preset("qwen2_vl", text={**_TEXT, "rope_parameters": _ROPE_QWEN2}, vision={
        "depth": 2, "embed_dim": 32, "num_heads": 4, "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "in_channels": 3}),
    "tiny-qwen3-vl": Preset("qwen3_vl", text={**_TEXT, "head_dim": 16, "rope_parameters": _ROPE_QWEN3},
                            vision={**_VISION_QWEN3, "deepstack_visual_indexes": [0]}),
    "tiny-qwen3-vl-moe": Preset("qwen3_vl_moe", text={**_TEXT, **_EXPERTS, "head_dim": 16, "decoder_sparse_step": 1,
                                                      "rope_parameters": _ROPE_QWEN3},
                                vision={**_VISION_QWEN3, "deepstack_visual_indexes": [0]}),
    "tiny-qwen3.5": Preset("qwen3_5", text={**_TEXT, **_LINEAR_ATTENTION, "rope_parameters": _ROPE_QWEN3_5},
                           vision={**_VISION_QWEN3, "deepstack_visual_indexes": []}),
    "tiny-qwen3.5-moe": Preset("qwen3_5_moe", text={**_TEXT, **_LINEAR_ATTENTION, **_EXPERTS,
                                                    "shared_expert_intermediate_size": 32,
                                                    "rope_parameters": _ROPE_QWEN3_5},
                               vision={**_VISION_QWEN3, "deepstack_visual_indexes": []}),
    **{name: Preset(family, bpe_pieces=4082, published=name) for name, family in (
        ("qwen2-vl-2b", "qwen2_vl"), ("qwen2.5-vl-3b", "qwen2_5_vl"), ("qwen2.5-vl-7b", "qwen2_5_vl"),
        ("qwen3-vl-2b", "qwen3_vl"), ("qwen3-vl-4b", "qwen3_vl"), ("qwen3-vl-8b", "qwen3_vl"),
        ("qwen3-vl-30b-a3b", "qwen3_vl_moe"), ("qwen3.5-0.8b", "qwen3_5"), ("qwen3.5-4b", "qwen3_5"),
        ("qwen3.5-9b", "qwen3_5"))},
}
PRESETS["tiny-qwen2.5-vl"] = PRESETS["tiny"]
# One tiny preset per family, for the tests that run over every family.
TINY_PRESETS = {preset.family: name for name, preset in PRESETS.items() if name.startswith("tiny-")}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ChartVLMError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def published_config(name: str) -> dict:
    """The checkpoint's config.json a shape preset is built from."""
    return json.loads(resources.files("chartvlm").joinpath("presets", f"{name}.json").read_text(encoding="utf-8"))


def _embedding_rows(tokenizer) -> int:
    """A tiny preset's vocabulary rows: with the real vocabulary, the released checkpoints' padded size (the
    ids beyond the tokenizer exist in every Qwen checkpoint); with ours, exactly the tokenizer's size."""
    return QWEN_EMBEDDING_ROWS if len(tokenizer) > QWEN_EMBEDDING_ROWS // 2 else len(tokenizer)


def build_tokenizer_for(preset_name: str, tokenizer: str = "ours"):
    """The tokenizer of a preset: ours (compact for tiny presets, control tokens at the released ids at full
    size) or the real Qwen vocabulary."""
    from chartvlm.tokenizer import build_qwen_tokenizer, build_tokenizer

    preset = get_preset(preset_name)
    family = FAMILIES[preset.family]
    if tokenizer not in TOKENIZERS:
        raise ChartVLMError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {tokenizer!r}")
    if tokenizer == "qwen":
        return build_qwen_tokenizer(family)
    rows = None
    if preset.published:
        config = published_config(preset.published)
        rows = config.get("text_config", config)["vocab_size"]
    return build_tokenizer(family, preset.bpe_pieces, model_vocab_size=rows)


def build_processor(family: Family, tokenizer, min_pixels: int | None = None, max_pixels: int | None = None):
    """The family's stock processor around `tokenizer`: its image processor (patch size, normalisation), video
    processor and published chat template. Pixel limits default to DEFAULT_MIN_PIXELS / DEFAULT_MAX_PIXELS
    (chart-friendly, not the stock 12.8 M-pixel cap); they live in the image processor's `size` and survive
    save/load."""
    import transformers

    min_pixels = DEFAULT_MIN_PIXELS if min_pixels is None else int(min_pixels)
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    if not 0 < min_pixels <= max_pixels:
        raise ChartVLMError(f"build_processor: need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, "
                            f"max_pixels={max_pixels}")
    normalisation = {"image_mean": list(family.image_mean), "image_std": list(family.image_std)} \
        if family.image_mean else {}
    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=family.patch_size, merge_size=family.merge_size, min_pixels=min_pixels, max_pixels=max_pixels,
        **normalisation)
    video_processor = getattr(transformers, family.video_processor_class)()
    return getattr(transformers, family.processor_class)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=family.chat_template())


def build_config(preset_name: str, tokenizer):
    """The model configuration of a preset, with every token id taken from `tokenizer` (which equals the
    published ids for shape presets and for the real vocabulary)."""
    import transformers

    preset = get_preset(preset_name)
    family = FAMILIES[preset.family]
    config_class = getattr(transformers, family.config_class)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in
           ("<|endoftext|>", family.end_token, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    if preset.published:
        config = config_class.from_dict(published_config(preset.published))
        expected = {"<|image_pad|>": config.image_token_id, "<|video_pad|>": config.video_token_id,
                    "<|vision_start|>": config.vision_start_token_id, "<|vision_end|>": config.vision_end_token_id}
        wrong = {token: (ids[token], want) for token, want in expected.items() if ids[token] != want}
        if wrong:
            raise ChartVLMError(f"preset {preset_name}: the tokenizer's ids differ from the published ones: {wrong}")
        return config
    rows = _embedding_rows(tokenizer)
    # No pad_token_id in the text config: the released checkpoints have none there, and transformers would
    # zero that embedding row (<|endoftext|>) at initialisation.
    text_config = {**preset.text, "vocab_size": rows, "bos_token_id": ids["<|endoftext|>"],
                   "eos_token_id": ids[family.end_token], "tie_word_embeddings": preset.tie_word_embeddings}
    vision_config = {**preset.vision, "out_hidden_size": preset.text["hidden_size"]}
    if family.model_type == "qwen2_vl":  # its vision config names the merger's output width hidden_size
        vision_config = {**preset.vision, "hidden_size": preset.text["hidden_size"]}
    return config_class(text_config=text_config, vision_config=vision_config, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=preset.tie_word_embeddings)


def build_model(preset_name: str, tokenizer, seed: int = 0, device=None, dtype=None):
    """A randomly initialised model of `preset_name` (fp32 on the CPU unless `device`/`dtype` say otherwise:
    built there directly, which is how the bench makes a 3B model on a GPU in seconds); identical weights for
    the same seed and device.

    The global torch RNG state is left untouched (the seed applies inside a forked RNG). On the CPU, shape
    presets need their full size in host memory (e.g. ~15 GB for qwen2.5-vl-3b in fp32)."""
    import torch
    import transformers
    from transformers import GenerationConfig

    preset = get_preset(preset_name)
    family = FAMILIES[preset.family]
    config = build_config(preset_name, tokenizer)
    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # parameters are created in `dtype`: no fp32 copy of a big model
        try:
            model = getattr(transformers, family.model_class)(config)
        finally:
            torch.set_default_dtype(default)
    pad_id, eos_id = tokenizer.convert_tokens_to_ids([family.pad_token, family.end_token])
    # As the released checkpoints' generation_config: stop on <|im_end|> or <|endoftext|>; greedy.
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=[eos_id, pad_id],
                                               pad_token_id=pad_id, do_sample=False)
    model.eval()
    return model


def build_model_and_processor(preset: str = "tiny", seed: int = 0, min_pixels: int | None = None,
                              max_pixels: int | None = None, tokenizer: str = "ours", device=None, dtype=None):
    """Build model + processor in-process (no files, no network); deterministic per seed."""
    family = FAMILIES[get_preset(preset).family]
    built = build_tokenizer_for(preset, tokenizer)
    processor = build_processor(family, built, min_pixels=min_pixels, max_pixels=max_pixels)
    model = build_model(preset, built, seed=seed, device=device, dtype=dtype)
    logger.info("built %s %s (%.2fM params, %s tokenizer, seed %d)", preset, family.title,
                model.num_parameters() / 1e6, tokenizer, seed)
    return model, processor


def init_model(preset: str, out_dir: str | os.PathLike, seed: int = 0, min_pixels: int | None = None,
               max_pixels: int | None = None, tokenizer: str = "ours") -> Path:
    """Write a random `preset` model + tokenizer + processor (+ chat template) to `out_dir`.

    The directory is written under a temporary name next to it and renamed at the end, so a
    crash never leaves a half-written model. Loadable offline with
    `AutoModelForImageTextToText.from_pretrained(out_dir)` / `AutoProcessor.from_pretrained(out_dir)`.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ChartVLMError(f"init_model: {out} already exists and is not empty; choose a new directory")
    model, processor = build_model_and_processor(preset, seed=seed, min_pixels=min_pixels, max_pixels=max_pixels,
                                                 tokenizer=tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of an earlier crashed run of this process id
    tmp.mkdir()
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        make_readable(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote random %s model to %s", preset, out)
    return out
