"""Serving-side helpers: answer questions about chart files, and export a merged model."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from chartvlm.errors import ChartVLMError
from chartvlm.io import make_readable

logger = logging.getLogger(__name__)


def _run_settings(folder: str | None) -> dict:
    from chartvlm.config import load_run_config

    return load_run_config(folder) if folder else {}


def predict(model_path: str, images: list[str], questions: list[str], adapter: str | None = None,
            max_new_tokens: int | None = None, batch_size: int = 8, force_adapter: bool = False) -> list[str]:
    """Answers for (image file, question) pairs, batched, with the training prompt and pixel limits."""
    from chartvlm.config import DataArguments, EvalArguments, ModelArguments
    from chartvlm.errors import BadSampleError
    from chartvlm.generate import generate_answers
    from chartvlm.images import open_image
    from chartvlm.modeling import load_model, load_processor
    from chartvlm.prompts import build_messages, check_user_text, control_tokens

    # The run that produced the adapter/model recorded its prompt and pixels; reuse them.
    saved = _run_settings(adapter) or _run_settings(model_path)
    data, model_cfg, evaluation = saved.get("data", {}), saved.get("model", {}), saved.get("eval", {})
    system = data.get("system_message", DataArguments.system_message)
    min_pixels = model_cfg.get("min_pixels", ModelArguments.min_pixels)
    max_pixels = model_cfg.get("max_pixels", ModelArguments.max_pixels)
    max_new_tokens = max_new_tokens or evaluation.get("max_new_tokens", EvalArguments.max_new_tokens)

    conversations = []
    for path, question in zip(images, questions):
        try:
            image = open_image(path, str(path))  # the decoding every other stage uses (EXIF orientation too)
        except BadSampleError as error:
            raise ChartVLMError(str(error)) from None
        conversations.append(build_messages(image, question, system_message=system))

    processor = load_processor(adapter or model_path, min_pixels, max_pixels)
    controls = control_tokens(processor.tokenizer)
    for where, (path, question) in enumerate(zip(images, questions), start=1):
        try:
            check_user_text(question, "question", f"--question {where} ({path})", controls)
            check_user_text(system, "system message", "the trained system_message", controls)
        except BadSampleError as error:
            raise ChartVLMError(str(error)) from None
    model = load_model(model_path, adapter=adapter, force_adapter=force_adapter)
    model.eval()
    answers = []
    for start in range(0, len(conversations), batch_size):
        answers += generate_answers(model, processor, conversations[start : start + batch_size], max_new_tokens)
    return answers


def export_merged(adapter: str, out: str, base_model: str | None = None, force_adapter: bool = False) -> Path:
    """Merge a LoRA adapter into its base and write a standalone model + processor folder.

    The folder loads with AutoModelForImageTextToText / AutoProcessor and can be served by engines
    such as vLLM. Written to a temporary folder first, so `out` is complete or absent.
    """
    import torch

    from chartvlm.modeling import BASE_RECORD, load_model, load_processor

    adapter_dir = Path(adapter)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise ChartVLMError(f"{adapter_dir}: no adapter_config.json (is this a LoRA output folder?)")
    base = base_model or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ChartVLMError(f"{config_file} names no base model; pass --model")
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ChartVLMError(f"{out_dir} exists and is not empty; choose a new folder")

    model = load_model(base, adapter=str(adapter_dir), merge_adapter=True, force_adapter=force_adapter,
                       dtype=torch.float32, device=torch.device("cpu"))
    processor = load_processor(str(adapter_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        for name in ("chartvlm_config.yaml", BASE_RECORD):  # what it was trained with, and from
            if (adapter_dir / name).exists():
                shutil.copy(adapter_dir / name, tmp / name)
        make_readable(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("merged %s into %s -> %s", adapter_dir, base, out_dir)
    return out_dir
