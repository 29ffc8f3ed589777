"""Loading models and processors, and making them trainable (LoRA, QLoRA or full tuning)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from chartvlm.errors import ChartVLMError

logger = logging.getLogger(__name__)

# Module-name pattern of the vision tower in transformers 5.x Qwen2.5-VL (model.visual.*).
VISION_MODULES = r".*\bvisual\b.*"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def is_local(path_or_id: str) -> bool:
    return Path(path_or_id).exists()


def set_pixel_limits(processor, min_pixels: int, max_pixels: int) -> None:
    """Set the image resolution bounds once; they are saved with the processor."""
    image_processor = processor.image_processor
    image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if hasattr(image_processor, name):
            setattr(image_processor, name, value)


def load_processor(model_name_or_path: str, min_pixels: int | None = None, max_pixels: int | None = None):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_name_or_path)
    if min_pixels is not None and max_pixels is not None:
        set_pixel_limits(processor, min_pixels, max_pixels)
    return processor


def load_model(model_name_or_path: str, *, adapter: str | None = None, dtype: torch.dtype | None = None,
               device: torch.device | None = None, attn_implementation: str = "sdpa", quantize_4bit: bool = False,
               merge_adapter: bool = False):
    """A Qwen2.5-VL model from a hub id or folder, optionally with a LoRA adapter applied."""
    from transformers import AutoModelForImageTextToText

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if quantize_4bit:
        if device.type != "cuda":
            raise ChartVLMError("tuning=qlora needs a CUDA GPU (bitsandbytes 4-bit); use tuning=lora on this machine")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForImageTextToText.from_pretrained(model_name_or_path, **kwargs)
    if not quantize_4bit:
        model.to(device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if merge_adapter:
            model = model.merge_and_unload()
    return model


def lora_config(model_args):
    """LoRA on the language model by default: `q_proj`/`v_proj` already miss the vision tower, but
    `all-linear` and the MLP names would also match its 32 blocks."""
    from peft import LoraConfig

    targets = model_args.lora_target_modules
    target_modules = targets[0] if targets == ["all-linear"] else list(targets)
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=target_modules,
        exclude_modules=None if model_args.lora_include_vision else VISION_MODULES,
        bias="none",
        task_type="CAUSAL_LM",
    )


def vision_parameters(model):
    return [p for name, p in model.named_parameters() if ".visual." in f".{name}"]


def prepare_for_training(model, model_args):
    """Apply the tuning method; returns the model to hand to the trainer."""
    if model_args.tuning == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        if not model_args.train_vision_tower:
            for param in vision_parameters(model):
                param.requires_grad_(False)
    else:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if model_args.tuning == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, lora_config(model_args))
        if model_args.train_vision_tower:
            for param in vision_parameters(model):
                param.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("tuning=%s: %s of %s parameters trainable (%.2f%%)", model_args.tuning, f"{trainable:,}",
                f"{total:,}", 100 * trainable / max(total, 1))
    return model
