"""Greedy answer generation, batched, from the same messages the model was trained on.

Batches are padded on the LEFT: the Qwen processors pad right by default, which makes batched answers
empty or garbled because new tokens would follow padding. Generation stops at `<|im_end|>`, the token
training taught the model to end an answer with, and every decoding setting is explicit
(`generation_config`): nothing comes from a checkpoint's generation_config.json unless asked.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from dataclasses import dataclass

import torch

from chartvlm.images import model_image
from chartvlm.prompts import (END_TOKEN, PROMPT_STYLES, PromptStyle, extract_answer, message_answer, message_image,
                              prompt_messages, render)


@contextlib.contextmanager
def left_padding(processor):
    tokenizer = processor.tokenizer
    previous = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def generation_inputs(conversations: list[list[dict]], processor, style: PromptStyle = PROMPT_STYLES["chartvlm"]
                      ) -> dict:
    """Processor inputs for the prompt part of each conversation (rendered with the generation prompt),
    left-padded, with each image prepared as `style` says (`images.model_image`)."""
    texts = [render(processor, prompt_messages(conv), generation_prompt=True) for conv in conversations]
    images = [model_image(message_image(conv), processor, f"batch item {i}", style)
              for i, conv in enumerate(conversations)]
    with left_padding(processor):
        return processor(text=texts, images=images, padding=True, return_tensors="pt")


GENERATION_MODES = ("chartvlm", "checkpoint", "checkpoint-greedy")


def generation_config(model, processor, max_new_tokens: int, mode: str = "chartvlm"):
    """Every generation setting, explicit. `generate` fills each field a config leaves unset from the
    checkpoint's generation_config.json (Qwen's instruct checkpoints ship repetition_penalty 1.05 and sampling
    fields), so the config is swapped in for the checkpoint's while the model generates
    (`explicit_generation`). Modes:
    - chartvlm: greedy, no repetition penalty, stop on <|im_end|>, `max_new_tokens`; nothing from the checkpoint;
    - checkpoint: the checkpoint's generation_config.json as it is (sampling included), with `max_new_tokens`;
    - checkpoint-greedy: the checkpoint's fields with greedy decoding and the stop on <|im_end|> forced
      (what lmms-eval does)."""
    import copy

    from transformers import GenerationConfig

    if mode not in GENERATION_MODES:
        raise ValueError(f"generation mode must be one of {GENERATION_MODES}, got {mode!r}")
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id
    if mode == "checkpoint":
        config = copy.deepcopy(_base_model(model).generation_config)
        config.update(max_new_tokens=max_new_tokens, pad_token_id=config.pad_token_id if config.pad_token_id
                      is not None else pad)
        return config
    stop = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1,
            "eos_token_id": tokenizer.convert_tokens_to_ids(END_TOKEN), "pad_token_id": pad}
    if mode == "checkpoint-greedy":
        config = copy.deepcopy(_base_model(model).generation_config)
        config.update(**stop, temperature=None, top_p=None, top_k=None)
        return config
    return GenerationConfig(**stop, repetition_penalty=1.0, no_repeat_ngram_size=0)


def generation_record(config) -> dict:
    """The fields of a generation config that differ from transformers' defaults (what metrics.json shows)."""
    record = config.to_diff_dict()
    record.pop("transformers_version", None)
    return record


@contextlib.contextmanager
def explicit_generation(model, config):
    """`model` generates with `config` alone: nothing unset in it is filled from the checkpoint's own config."""
    base = _base_model(model)
    previous = base.generation_config
    base.generation_config = config
    try:
        yield
    finally:
        base.generation_config = previous


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class VisionCache:
    """Vision features of the charts of the latest batch, so the questions about one chart that a batch
    boundary splits still run the vision tower once. An entry matches only the exact same pixels."""

    def __init__(self):
        self.entries: list[tuple[tuple, torch.Tensor, tuple]] = []
        self.output_type = None  # the class get_image_features returned the features in

    def find(self, grid: tuple, pixels: torch.Tensor) -> tuple | None:
        return next((feats for g, p, feats in self.entries if g == grid and torch.equal(p, pixels)), None)


def encode_images_once(model, inputs: dict, cache: VisionCache | None = None) -> dict:
    """`inputs` with pixel_values replaced by the vision tower's output, computed once per distinct image:
    several questions about one chart (ChartQA has ~1.5 per chart) share its features. Identical pixels give
    identical features, so the answers do not change. An image's features are its projected embedding and,
    for Qwen3-VL, its DeepStack features of several vision layers (`deepstack_features`, one per layer).
    Needs `mm_encoder_outputs` (transformers >= 5); without it the inputs are returned as they are."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "mm_encoder_outputs" not in inspect.signature(base.forward).parameters or "pixel_values" not in inputs:
        return inputs
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    bounds = [0, *itertools.accumulate(t * h * w for t, h, w in grids)]
    pixels = [inputs["pixel_values"][bounds[i]:bounds[i + 1]] for i in range(len(grids))]
    features: list[tuple | None] = [None] * len(grids)  # per image: (embedding, deepstack features or None)
    first: dict[int, int] = {}  # image -> the first image with the same pixels, which gets encoded
    for i, grid in enumerate(grids):
        features[i] = cache.find(grid, pixels[i]) if cache is not None else None
        if features[i] is None:
            first[i] = next((j for j in first if first[j] == j and grids[j] == grid
                             and torch.equal(pixels[j], pixels[i])), i)
    todo = sorted({j for j in first.values()})
    output_type = cache.output_type if cache is not None else None
    if todo:
        encoded = model.get_image_features(torch.cat([pixels[j] for j in todo]), inputs["image_grid_thw"][todo])
        output_type = type(encoded)
        deepstack = getattr(encoded, "deepstack_features", None)
        computed = {j: (encoded.pooler_output[k], None if deepstack is None else tuple(layer[k] for layer in deepstack))
                    for k, j in enumerate(todo)}
        for i, j in first.items():
            features[i] = computed[j]
    if cache is not None:
        cache.entries = [(grids[i], pixels[i], features[i]) for i in range(len(grids))]
        cache.output_type = output_type
    shared = {k: v for k, v in inputs.items() if k != "pixel_values"}
    shared["mm_encoder_outputs"] = {"image": _image_output(output_type, features)}
    return shared


def _image_output(output_type, features: list[tuple]):
    """The vision tower's output object (of the class get_image_features returns) for per-image features."""
    pooler = tuple(embedding for embedding, _ in features)
    if features[0][1] is None:
        return output_type(pooler_output=pooler)
    deepstack = [tuple(stack[layer] for _, stack in features) for layer in range(len(features[0][1]))]
    return output_type(pooler_output=pooler, deepstack_features=deepstack)


@dataclass(frozen=True)
class Completion:
    """One generated answer and what the server reports about it (OpenAI's usage and finish_reason)."""

    answer: str             # the decoded text after any reasoning block, stripped (prompts.extract_answer)
    prompt_tokens: int      # the prompt's real (non-padding) tokens, image tokens included
    completion_tokens: int  # new tokens up to and including <|im_end|>
    stopped: bool           # ended with <|im_end|> (False: it reached max_new_tokens)


@torch.inference_mode()
def generate_completions(model, processor, conversations: list[list[dict]], max_new_tokens: int = 32,
                         device: str | torch.device | None = None, share_vision: bool = False,
                         vision_cache: VisionCache | None = None, inputs: dict | None = None,
                         style: PromptStyle = PROMPT_STYLES["chartvlm"], generation: str = "chartvlm"
                         ) -> list[Completion]:
    """`generate_answers` with the token counts and the stop reason of each answer (what `chartvlm serve`
    reports); the answers are the same."""
    device = device or next(model.parameters()).device
    inputs = (inputs if inputs is not None else generation_inputs(conversations, processor, style)).to(device)
    prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
    if share_vision:
        inputs = encode_images_once(model, inputs, vision_cache)
    config = generation_config(model, processor, max_new_tokens, generation)
    with explicit_generation(model, config):
        output = model.generate(**inputs, generation_config=config)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    texts = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    end = processor.tokenizer.convert_tokens_to_ids(END_TOKEN)
    completions = []
    for text, tokens, prompt in zip(texts, new_tokens, prompt_tokens):
        # A finished answer is followed by padding up to the batch's longest one.
        ends = (tokens == end).nonzero()
        count = int(ends[0, 0]) + 1 if len(ends) else int(tokens.numel())
        completions.append(Completion(extract_answer(text), int(prompt), count, bool(len(ends))))
    return completions


def generate_answers(model, processor, conversations: list[list[dict]], max_new_tokens: int = 32,
                     device: str | torch.device | None = None, share_vision: bool = False,
                     vision_cache: VisionCache | None = None, inputs: dict | None = None,
                     style: PromptStyle = PROMPT_STYLES["chartvlm"], generation: str = "chartvlm") -> list[str]:
    """Answers (greedy by default, `generation_config`) for a batch of formatted samples (their assistant turns,
    if any, are ignored), each the text after any reasoning block, stripped (`prompts.extract_answer`).

    share_vision: run the vision tower once per distinct image of the batch (and reuse `vision_cache`).
    inputs: the conversations' `generation_inputs` when already built (evaluation prepares them ahead).
    style: how images are prepared (prompts.PromptStyle); the messages are the caller's."""
    return [completion.answer for completion in
            generate_completions(model, processor, conversations, max_new_tokens, device=device,
                                 share_vision=share_vision, vision_cache=vision_cache, inputs=inputs, style=style,
                                 generation=generation)]


def text_generator(sample_data: list[dict], processor, model, device, MAX_SEQ_LEN: int = 128) -> tuple[str, str]:
    """The seed's function: (generated answer, ground truth) for one formatted sample.

    It is the batched path with a batch of one, so it can never drift from evaluation.
    """
    answer = generate_answers(model, processor, [sample_data], max_new_tokens=MAX_SEQ_LEN, device=device)[0]
    return answer, message_answer(sample_data)
