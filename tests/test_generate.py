"""Batched greedy generation equals one-at-a-time generation (left padding), and the seed's
text_generator is the same code path."""

import torch

from chartvlm.generate import generate_answers, generation_inputs, left_padding, text_generator
from chartvlm.prompts import format_data
from conftest import chart_rows


def conversations(n=4):
    rows = chart_rows(n)
    assert n == 1 or len({r["image"].size for r in rows}) >= 2, "need mixed image sizes in one batch"
    return [format_data(r) for r in rows]


def test_batched_equals_one_at_a_time(scrambled):
    model, processor = scrambled
    convs = conversations(4)
    batched = generate_answers(model, processor, convs, max_new_tokens=8)
    single = [generate_answers(model, processor, [c], max_new_tokens=8)[0] for c in convs]
    assert batched == single
    assert len(set(batched)) > 1 and all(batched), "outputs must vary, or the test proves nothing"


def test_right_padding_would_change_the_answers(scrambled):
    """Guards the setting: with the processor's default right padding, batched answers differ."""
    model, processor = scrambled
    convs = conversations(4)
    good = generate_answers(model, processor, convs, max_new_tokens=8)
    previous = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "right"
    try:
        inputs = processor(
            text=[processor.apply_chat_template(c[:2], tokenize=False, add_generation_prompt=True) for c in convs],
            images=[c[1]["content"][0]["image"] for c in convs], padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False,
                                 eos_token_id=processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                 pad_token_id=processor.tokenizer.pad_token_id)
        bad = [t.strip() for t in processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                                     skip_special_tokens=True)]
    finally:
        processor.tokenizer.padding_side = previous
    assert bad != good


def test_left_padding_is_restored(tiny):
    _, processor = tiny
    before = processor.tokenizer.padding_side
    inputs = generation_inputs(conversations(2), processor)
    assert processor.tokenizer.padding_side == before
    assert (inputs["attention_mask"][:, -1] == 1).all(), "last position must be real on every row"


def test_text_generator_returns_answer_and_ground_truth(scrambled):
    model, processor = scrambled
    sample = conversations(1)[0]
    answer, truth = text_generator(sample, processor, model, "cpu", 8)
    assert truth == sample[2]["content"][0]["text"]
    assert answer == generate_answers(model, processor, [sample], max_new_tokens=8)[0]
