"""Greedy answer generation, batched, from the same messages the model was trained on.

Batches are padded on the LEFT: the Qwen2.5-VL processor pads right by default, which makes
batched answers empty or garbled because new tokens would follow padding. Generation stops at
`<|im_end|>`, the token training taught the model to end an answer with.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools

import torch

from chartvlm.images import model_image
from chartvlm.prompts import message_answer, message_image, prompt_messages


@contextlib.contextmanager
def left_padding(processor):
    tokenizer = processor.tokenizer
    previous = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def generation_inputs(conversations: list[list[dict]], processor) -> dict:
    """Processor inputs for the prompt part of each conversation, left-padded."""
    prompts = [prompt_messages(conv) for conv in conversations]
    texts = [processor.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    images = [model_image(message_image(conv), processor, f"batch item {i}") for i, conv in enumerate(conversations)]
    with left_padding(processor):
        return processor(text=texts, images=images, padding=True, return_tensors="pt")


def generation_settings(processor, max_new_tokens: int) -> dict:
    """Keyword arguments for `model.generate`: greedy, stop at <|im_end|>."""
    tokenizer = processor.tokenizer
    return {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
    }


class VisionCache:
    """Vision features of the charts of the latest batch, so the questions about one chart that a batch
    boundary splits still run the vision tower once. An entry matches only the exact same pixels."""

    def __init__(self):
        self.entries: list[tuple[tuple, torch.Tensor, torch.Tensor]] = []

    def find(self, grid: tuple, pixels: torch.Tensor) -> torch.Tensor | None:
        return next((feats for g, p, feats in self.entries if g == grid and torch.equal(p, pixels)), None)


def encode_images_once(model, inputs: dict, cache: VisionCache | None = None) -> dict:
    """`inputs` with pixel_values replaced by the vision tower's output, computed once per distinct image:
    several questions about one chart (ChartQA has ~1.5 per chart) share its features. Identical pixels give
    identical features, so the answers do not change. Needs `mm_encoder_outputs` (transformers >= 5);
    without it the inputs are returned as they are."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "mm_encoder_outputs" not in inspect.signature(base.forward).parameters or "pixel_values" not in inputs:
        return inputs
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    bounds = [0, *itertools.accumulate(t * h * w for t, h, w in grids)]
    pixels = [inputs["pixel_values"][bounds[i]:bounds[i + 1]] for i in range(len(grids))]
    features: list[torch.Tensor | None] = [None] * len(grids)
    first: dict[int, int] = {}  # image -> the first image with the same pixels, which gets encoded
    for i, grid in enumerate(grids):
        features[i] = cache.find(grid, pixels[i]) if cache is not None else None
        if features[i] is None:
            first[i] = next((j for j in first if first[j] == j and grids[j] == grid
                             and torch.equal(pixels[j], pixels[i])), i)
    todo = sorted({j for j in first.values()})
    if todo:
        encoded = model.get_image_features(torch.cat([pixels[j] for j in todo]),
                                           inputs["image_grid_thw"][todo]).pooler_output
        computed = dict(zip(todo, encoded))
        for i, j in first.items():
            features[i] = computed[j]
    if cache is not None:
        cache.entries = [(grids[i], pixels[i], features[i]) for i in range(len(grids))]
    shared = {k: v for k, v in inputs.items() if k != "pixel_values"}
    shared["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}
    return shared


@torch.inference_mode()
def generate_answers(model, processor, conversations: list[list[dict]], max_new_tokens: int = 32,
                     device: str | torch.device | None = None, share_vision: bool = False,
                     vision_cache: VisionCache | None = None, inputs: dict | None = None) -> list[str]:
    """Greedy answers for a batch of formatted samples (their assistant turns, if any, are ignored).

    share_vision: run the vision tower once per distinct image of the batch (and reuse `vision_cache`).
    inputs: the conversations' `generation_inputs` when already built (evaluation prepares them ahead)."""
    device = device or next(model.parameters()).device
    inputs = (inputs if inputs is not None else generation_inputs(conversations, processor)).to(device)
    if share_vision:
        inputs = encode_images_once(model, inputs, vision_cache)
    output = model.generate(**inputs, **generation_settings(processor, max_new_tokens))
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def text_generator(sample_data: list[dict], processor, model, device, MAX_SEQ_LEN: int = 128) -> tuple[str, str]:
    """The seed's function: (generated answer, ground truth) for one formatted sample.

    It is the batched path with a batch of one, so it can never drift from evaluation.
    """
    answer = generate_answers(model, processor, [sample_data], max_new_tokens=MAX_SEQ_LEN, device=device)[0]
    return answer, message_answer(sample_data)
