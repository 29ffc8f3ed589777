"""Inference-side helpers: how a trained model is asked (shared with `chartvlm serve`), answers about chart files,
and export of a merged model."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chartvlm.errors import ChartVLMError
from chartvlm.io import make_readable
from chartvlm.settings import InferenceSettings

logger = logging.getLogger(__name__)


# `InferenceSetup.conversation`'s system_message default: the one the model was trained with.
TRAINED = object()


@dataclass(frozen=True)
class InferenceSetup:
    """How a model is asked, without its weights: the settings it was trained with (settings.resolve), its
    processor with the trained pixel limits, its family, and the control strings user text may not hold.
    `chartvlm predict` and `chartvlm serve` build their conversations here, so they cannot drift apart."""

    asked: InferenceSettings
    processor: Any
    family: str | None
    controls: tuple[str, ...]

    def conversation(self, image, question: str, where: str, system_message: Any = TRAINED) -> list[dict]:
        """The conversation for one image and question, as predict and evaluation build it (the prompt style's
        question, the trained system prompt unless `system_message` is given; None: no system turn). Text
        holding a control string raises BadSampleError naming `where`."""
        from chartvlm.prompts import build_messages, check_system_message, check_user_text

        check_user_text(question, "question", where, self.controls)
        trained = system_message is TRAINED
        system = self.asked.system_message if trained else system_message
        if system is not None:
            check_system_message(system, "the trained system_message" if trained else where, self.controls)
        return build_messages(image, self.asked.style.question(question, self.family), system_message=system)


def inference_setup(model_path: str, adapter: str | None = None, flags: list[str] = (),
                    prog: str = "chartvlm predict") -> InferenceSetup:
    """Resolve how `model_path` (+ `adapter`) is asked (`flags` are config options, e.g. --max_new_tokens) and
    load its processor; no weights are read."""
    from chartvlm.config import parse_config
    from chartvlm.modeling import load_processor, model_type
    from chartvlm.prompts import control_tokens
    from chartvlm.settings import resolve

    asked = resolve(parse_config(list(flags), prog=prog), model_path, adapter)
    processor = load_processor(asked.trained_folder or model_path, asked.min_pixels, asked.max_pixels)
    return InferenceSetup(asked, processor, model_type(model_path), control_tokens(processor.tokenizer))


def predict(model_path: str, images: list[str], questions: list[str], adapter: str | None = None,
            max_new_tokens: int | None = None, batch_size: int = 8, force_adapter: bool = False,
            prompt_style: str = "chartvlm") -> list[str]:
    """Answers for (image file, question) pairs, batched, asked as the model was trained (settings.resolve:
    its system prompt, pixel limits and new-token limit, unless `max_new_tokens` is given)."""
    from chartvlm.errors import BadSampleError
    from chartvlm.generate import generate_answers
    from chartvlm.images import open_image
    from chartvlm.modeling import load_model

    flags = ["--prompt_style", prompt_style] + (["--max_new_tokens", str(max_new_tokens)] if max_new_tokens else [])
    setup = inference_setup(model_path, adapter, flags)
    conversations = []
    for number, (path, question) in enumerate(zip(images, questions), start=1):
        try:
            image = open_image(path, str(path))  # the decoding every other stage uses (EXIF orientation too)
            conversations.append(setup.conversation(image, question, f"--question {number} ({path})"))
        except BadSampleError as error:
            raise ChartVLMError(str(error)) from None
    model = load_model(model_path, adapter=adapter, force_adapter=force_adapter)
    model.eval()
    answers = []
    for start in range(0, len(conversations), batch_size):
        answers += generate_answers(model, setup.processor, conversations[start : start + batch_size],
                                    setup.asked.max_new_tokens, style=setup.asked.style,
                                    generation=setup.asked.generation)
    return answers


def export_merged(adapter: str, out: str, base_model: str | None = None, force_adapter: bool = False) -> Path:
    """Merge a LoRA adapter into its base and write a standalone model + processor folder.

    The folder loads with AutoModelForImageTextToText / AutoProcessor and can be served by engines
    such as vLLM. Written to a temporary folder first, so `out` is complete or absent.
    """
    import torch

    from chartvlm.config import parse_config
    from chartvlm.modeling import BASE_RECORD, load_model, load_processor
    from chartvlm.settings import resolve

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
    asked = resolve(parse_config([], prog="chartvlm export"), base, str(adapter_dir))
    processor = load_processor(str(adapter_dir), asked.min_pixels, asked.max_pixels)
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
