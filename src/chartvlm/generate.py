"""Greedy answer generation, batched, from the same messages the model was trained on.

Batches are padded on the LEFT: the Qwen2.5-VL processor pads right by default, which makes
batched answers empty or garbled because new tokens would follow padding. Generation stops at
`<|im_end|>`, the token training taught the model to end an answer with.
"""

from __future__ import annotations

import contextlib

import torch

from chartvlm.images import to_rgb
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
    images = [to_rgb(message_image(conv)) for conv in conversations]
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


@torch.inference_mode()
def generate_answers(model, processor, conversations: list[list[dict]], max_new_tokens: int = 32,
                     device: str | torch.device | None = None) -> list[str]:
    """Greedy answers for a batch of formatted samples (their assistant turns, if any, are ignored)."""
    device = device or next(model.parameters()).device
    inputs = generation_inputs(conversations, processor).to(device)
    output = model.generate(**inputs, **generation_settings(processor, max_new_tokens))
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def text_generator(sample_data: list[dict], processor, model, device, MAX_SEQ_LEN: int = 128) -> tuple[str, str]:
    """The seed's function: (generated answer, ground truth) for one formatted sample.

    It is the batched path with a batch of one, so it can never drift from evaluation.
    """
    answer = generate_answers(model, processor, [sample_data], max_new_tokens=MAX_SEQ_LEN, device=device)[0]
    return answer, message_answer(sample_data)
