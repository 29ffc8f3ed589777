"""Loading models and processors, and making them trainable (LoRA, QLoRA or full tuning)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from chartvlm.errors import ChartVLMError
from chartvlm.families import Family, family_of

logger = logging.getLogger(__name__)

# Written next to every trained model or adapter: which base it was trained from, by content.
BASE_RECORD = "chartvlm_base.json"


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


def check_model_folder(path_or_id: str) -> None:
    """Before anything is loaded: a local model path must exist and hold a model (a hub id is checked by
    data.ensure_hub_reachable). A training output folder that holds no model is a run that did not finish."""
    from chartvlm.hub import is_local_source

    path = Path(path_or_id).expanduser()
    if not is_local_source(path_or_id):
        return
    if not path.exists():
        raise ChartVLMError(f"{path_or_id}: no such model folder")
    if not path.is_dir() or (path / "config.json").is_file():
        return
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        raise ChartVLMError(f"{path_or_id} is a LoRA adapter, not a model: pass it as --adapter, with its base "
                            f"model ({base}) as the model")
    unfinished = "; it looks like a training output folder whose run did not finish: resume it with --resume true" \
        if any(path.glob("checkpoint-*")) else ""
    raise ChartVLMError(f"{path_or_id} holds no model (no config.json){unfinished}")


def model_type(path_or_id: str) -> str | None:
    """config.json's model_type of a model folder or hub id (None when it cannot be read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path_or_id).model_type
    except Exception:  # noqa: BLE001 - unreadable or unreachable: loading reports it
        return None


def base_record(model_name_or_path: str, model_type: str) -> dict:
    """What BASE_RECORD says about the base a run trained from: its name, architecture and content digest."""
    from chartvlm.fingerprint import model_digest

    return {"model_name_or_path": model_name_or_path, "model_type": model_type,
            "digest": model_digest(model_name_or_path)}


def check_adapter(adapter: str, model_path: str, force: bool = False) -> None:
    """Before any weight is loaded: `adapter` is a LoRA adapter folder, for `model_path`'s architecture, trained
    on `model_path` itself. An adapter trained on another base of the same shapes would load without a word
    and give wrong answers, so a different base (by content digest where recorded, else by name) is an error
    unless `force`."""
    folder = Path(adapter)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        reason = "no such folder" if not folder.exists() else "no adapter_config.json: not a LoRA adapter folder"
        raise ChartVLMError(f"adapter {adapter}: {reason}")
    if not any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ChartVLMError(f"adapter {adapter}: no adapter_model.safetensors (the adapter's weights)")
    recorded_file = folder / BASE_RECORD
    recorded = json.loads(recorded_file.read_text()) if recorded_file.is_file() else {
        "model_name_or_path": json.loads(config_file.read_text()).get("base_model_name_or_path")}
    given = model_type(model_path)
    if recorded.get("model_type") and given and given != recorded["model_type"]:
        raise ChartVLMError(f"adapter {adapter} is for a {recorded['model_type']} model, but {model_path} is a "
                            f"{given} model")
    from chartvlm.fingerprint import model_digest

    digest = model_digest(model_path) if recorded.get("digest") else None
    if digest is not None:
        same = digest == recorded["digest"]
    else:
        trained_on = recorded.get("model_name_or_path")
        same = trained_on is None or _same_name(trained_on, model_path)
    if same:
        return
    message = (f"adapter {adapter} was trained on {recorded.get('model_name_or_path')}"
               f"{' (other weights)' if digest is not None else ''}, not on {model_path}")
    if not force:
        raise ChartVLMError(f"{message}; give that base model, or pass --force_adapter true to apply it anyway")
    logger.warning("%s; applying it anyway (force_adapter)", message)


def _same_name(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return a.rstrip("/") == b.rstrip("/")


def load_processor(model_name_or_path: str, min_pixels: int | None = None, max_pixels: int | None = None):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_name_or_path)
    if min_pixels is not None and max_pixels is not None:
        set_pixel_limits(processor, min_pixels, max_pixels)
    return processor


def load_model(model_name_or_path: str, *, adapter: str | None = None, dtype: torch.dtype | None = None,
               device: torch.device | None = None, attn_implementation: str = "sdpa", quantize_4bit: bool = False,
               merge_adapter: bool = False, force_adapter: bool = False):
    """A Qwen2.5-VL model from a hub id or folder, optionally with a LoRA adapter applied (`check_adapter`
    first: an adapter of another base is refused unless `force_adapter`)."""
    from transformers import AutoModelForImageTextToText

    check_model_folder(model_name_or_path)
    if adapter:
        check_adapter(adapter, model_name_or_path, force_adapter)

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


def lora_config(model_args, family: Family):
    """LoRA on the language model by default: `q_proj`/`v_proj` already miss the vision tower, but `all-linear`
    and the MLP names would also match its blocks. `auto` is the family's choice (families.Family.lora_targets).
    With train_vision_tower (train_projector) the whole tower (the projector) trains and is saved with the
    adapter (`modules_to_save`): PEFT saves adapter tensors only, so a module made trainable any other way
    would train and then be lost."""
    from peft import LoraConfig

    targets = model_args.lora_target_modules
    if targets == ["auto"]:
        targets = list(family.lora_targets)
    target_modules = targets[0] if targets == ["all-linear"] else list(targets)
    saved_whole = [family.vision_tower] if model_args.train_vision_tower else \
        list(family.projectors) if model_args.train_projector else None
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=target_modules,
        exclude_modules=None if model_args.lora_include_vision else rf".*\b{family.vision_tower}\b.*",
        modules_to_save=saved_whole,
        bias="none",
        task_type="CAUSAL_LM",
    )


def vision_parameters(model, family: Family | None = None):
    """The vision tower's parameters (its projector included)."""
    tower = (family or family_of(_unwrapped(model))).vision_tower
    return [p for name, p in model.named_parameters() if f".{tower}." in f".{name}"]


def projector_parameters(model, family: Family | None = None):
    family = family or family_of(_unwrapped(model))
    return [p for name, p in model.named_parameters()
            if f".{family.vision_tower}." in f".{name}" and any(f".{proj}." in f".{name}" for proj in family.projectors)]


def _unwrapped(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prepare_for_training(model, model_args, new_adapter: bool = True):
    """Apply the tuning method; returns the model to hand to the trainer. With LoRA, model_args.init_adapter is
    continued (its own rank and targets), else a new adapter is put on; new_adapter=False leaves that to the
    trainer (TRL's GRPOTrainer, given lora_config: it then takes the reference model by disabling the adapter),
    which must call `check_lora_model` after."""
    family = family_of(model)
    if model_args.tuning == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        if not model_args.train_vision_tower:
            for param in vision_parameters(model, family):
                param.requires_grad_(False)
            for param in projector_parameters(model, family) if model_args.train_projector else ():
                param.requires_grad_(True)
        log_trainable(model, model_args.tuning)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if model_args.tuning == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if model_args.init_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, model_args.init_adapter, is_trainable=True)
        adapter = model.peft_config["default"]
        saved_whole = set(adapter.modules_to_save or ())
        asked = set(lora_config(model_args, family).modules_to_save or ())
        if saved_whole != asked:
            raise ChartVLMError(f"init_adapter {model_args.init_adapter} trains {sorted(saved_whole) or 'no module'} "
                                f"whole, but train_vision_tower/train_projector ask for {sorted(asked) or 'none'}: "
                                "set them as the adapter was trained")
        logger.info("continuing the adapter %s (rank %s, its own targets)", model_args.init_adapter, adapter.r)
    elif new_adapter:
        model = get_peft_model(model, lora_config(model_args, family))
    else:
        return model
    check_lora_model(model, family)
    log_trainable(model, model_args.tuning)
    return model


def check_lora_model(model, family: Family) -> None:
    """A LoRA-wrapped model: everything that trains is saved, and what LoRA leaves out is said."""
    from chartvlm.checkpoints import check_trainable_parameters_are_saved

    check_trainable_parameters_are_saved(model)
    warn_uncovered_layers(model, family)
    if family.moe:
        logger.info("%s experts are fused 3-D parameters: LoRA adapts the attention layers, the experts and "
                    "the router stay as they are", family.title)


def log_trainable(model, tuning: str) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("tuning=%s: %s of %s parameters trainable (%.2f%%)", tuning, f"{trainable:,}", f"{total:,}",
                100 * trainable / max(total, 1))


def warn_uncovered_layers(model, family: Family) -> None:
    """Say when LoRA adapts only some decoder layers: Qwen3.5's linear-attention layers (3 of every 4) have no
    q_proj/v_proj, so the seed's targets miss most of its language model."""
    import re

    layers = set()
    adapted = set()
    for name, _ in model.named_modules():
        found = re.search(r"language_model\.layers\.(\d+)\.", name + ".")
        if found:
            layers.add(int(found.group(1)))
            if "lora_A" in name:
                adapted.add(int(found.group(1)))
    missing = sorted(layers - adapted)
    if missing and adapted:
        logger.warning("LoRA adapts %d of %d %s decoder layers (not %s); lora_target_modules auto adds %s",
                       len(adapted), len(layers), family.title, ", ".join(map(str, missing[:8])) +
                       ("..." if len(missing) > 8 else ""), ", ".join(family.lora_targets))
