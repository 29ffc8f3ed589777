"""GRPO rewards (issue 13) on hand-written completions: each built-in reward equals the metric or rule it names,
answers are taken after a reasoning block exactly as evaluation takes them, and user rewards load by name."""

from __future__ import annotations

import math

import pytest

from chartvlm.config import parse_config
from chartvlm.errors import ChartVLMError
from chartvlm.evaluate import prediction_record
from chartvlm.metrics import relaxed_accuracy as metric
from chartvlm.prompts import extract_answer
from chartvlm.rewards import BUILT_IN, build_rewards, completion_text, user_reward


def as_trl(texts: list[str]) -> list[list[dict]]:
    """Completions as TRL hands them to a reward: the assistant message of each."""
    return [[{"role": "assistant", "content": text}] for text in texts]


def rewards_of(texts, labels=None, *, reasoning=False, names=("relaxed_accuracy", "format"), ids=None,
               max_completion_length=32, buffer=None, metric_name="relaxed"):
    functions, _ = build_rewards({name: 1.0 for name in names}, metric=metric_name, reasoning=reasoning,
                                 max_completion_length=max_completion_length, length_penalty_buffer=buffer)
    labels = labels or [["0"]] * len(texts)
    ids = ids or [[0]] * len(texts)
    return {f.__name__: f(prompts=[[]] * len(texts), completions=as_trl(texts), completion_ids=ids, label=labels,
                          query=["q"] * len(texts))
            for f in functions}


# (completion, labels, reward) with the standard metric: chartqa.md's examples, several labels, and answers
# after a reasoning block.
ACCURACY_CASES = [
    ("42.0", ["42"], 1.0), ("105", ["100"], 1.0), ("95", ["100"], 1.0), ("105.2", ["100"], 0.0),
    ("62%", ["62"], 0.0), ("62%", ["0.62"], 1.0), ("0.5", ["50%"], 1.0), ("0.0", ["0"], 0.0),
    ("1,000", ["1000"], 0.0), ("1e3", ["1000"], 1.0), ("yes", ["Yes"], 1.0), ("Yes.", ["Yes"], 0.0),
    ("2015", ["2014"], 1.0), ("$42", ["42"], 0.0), ("Green Line", ["green line"], 1.0),
    ("  ten \n", ["12", "ten"], 1.0), ("12", ["12", "ten"], 1.0), ("eleven", ["12", "ten"], 0.0),
    ("<think>the first bar reads 40, the second 42</think> 42", ["42"], 1.0),
    ("<think>30 or 42?</think>\n\n30", ["42"], 0.0),
    ("reading the bars...</think>42", ["42"], 1.0),       # the block was opened by the prompt
    ("<think>never closed, 42", ["42"], 0.0),
    ("", ["42"], 0.0),
]


@pytest.mark.parametrize("text,labels,expected", ACCURACY_CASES)
def test_relaxed_accuracy_is_the_metric_of_the_answer_evaluation_scores(text, labels, expected):
    got = rewards_of([text], [labels], names=("relaxed_accuracy",))["relaxed_accuracy"]
    assert got == [expected]
    # What evaluation records for the same generated text (generate.py extracts the answer, then scores it).
    record = prediction_record({"query": "q", "label": labels}, 0, "test", extract_answer(text), "relaxed")
    assert record["correct"] == bool(expected)
    assert got == [metric(extract_answer(text), labels)]


def test_relaxed_accuracy_follows_the_configured_metric():
    # 95 against 100: right under the standard metric, wrong with the tolerance relative to the prediction.
    assert rewards_of(["95"], [["100"]], names=("relaxed_accuracy",))["relaxed_accuracy"] == [1.0]
    swapped = rewards_of(["105.2"], [["100"]], names=("relaxed_accuracy",), metric_name="relaxed_swapped")
    assert swapped["relaxed_accuracy"] == [1.0]


@pytest.mark.parametrize("text,bare,reasoned", [
    ("42", True, False),
    ("Democratic Republic of the Congo", True, False),
    ("  7.5 \n", True, False),
    ("The answer is 42 because the tallest bar reaches 42 on the axis", False, False),
    ("42\nThe tallest bar.", False, False),
    ("", False, False),
    ("<think>the second bar is tallest</think> B", False, True),
    ("<think>\nfirst 10, then 20\n</think>\n\n20", False, True),
    ("<think></think> B", False, False),                  # no reasoning in the block
    ("<think>a</think><think>b</think> B", False, False),  # two blocks
    ("<think>the second bar</think>", False, False),      # no answer
    ("B <think>because</think>", False, False),           # answer first
    ("<think>so B</think> B is the tallest bar, taller than A by about ten units", False, False),
    ("<analysis>B</analysis> B", False, False),
])
def test_format_rewards_a_bare_answer_or_reasoning_then_a_bare_answer(text, bare, reasoned):
    assert rewards_of([text], names=("format",))["format"] == [float(bare)]
    assert rewards_of([text], names=("format",), reasoning=True)["format"] == [float(reasoned)]


def test_length_penalty_is_dapos_soft_overlong_penalty():
    lengths = [1, 24, 25, 28, 31, 32]  # limit 32, buffer 8: free up to 24 tokens
    got = rewards_of(["x"] * len(lengths), names=("length_penalty",), ids=[[7] * n for n in lengths],
                     max_completion_length=32, buffer=8)["length_penalty"]
    assert got == [0.0, 0.0, -1 / 8, -4 / 8, -7 / 8, -1.0]
    # Default buffer: a quarter of the limit.
    default = rewards_of(["x"], names=("length_penalty",), ids=[[7] * 28], max_completion_length=32)
    assert default["length_penalty"] == [-0.5]


def test_rewards_keep_the_configured_order_names_and_weights():
    functions, weights = build_rewards({"format": 0.25, "relaxed_accuracy": 2, "grpo_rewards:distinct_characters": 1},
                                       metric="relaxed", reasoning=False, max_completion_length=16)
    # A user's reward is logged under the name the config gives it, so it cannot collide with a built-in one.
    assert [f.__name__ for f in functions] == ["format", "relaxed_accuracy", "grpo_rewards:distinct_characters"]
    assert weights == [0.25, 2.0, 1.0]
    assert all(isinstance(w, float) for w in weights)


def test_a_user_reward_is_called_as_trl_calls_it():
    function = user_reward("grpo_rewards:distinct_characters")
    assert function(completions=as_trl(["aab", "abc"]), prompts=[[], []], completion_ids=[[1], [2]]) == [0.2, 0.3]


@pytest.mark.parametrize("returned,message", [
    ([0.5], "returned 1 rewards for 2 completions"),
    ("0.5", "returned str, not a list"),
    (0.5, "returned float, not a list"),
    ([0.5, "high"], "returned 'high' for completion 1"),
    ([0.5, float("inf")], "returned inf for completion 1"),
    ([True, 0.0], "returned True for completion 0"),
])
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_user_reward_that_returns_the_wrong_thing_is_named(returned, message, is_async, monkeypatch):
    import asyncio
    import types

    module = types.ModuleType("wrong_rewards")
    if is_async:
        async def bad(completions, **_):
            return returned
    else:
        def bad(completions, **_):
            return returned
    module.bad = bad
    monkeypatch.setitem(__import__("sys").modules, "wrong_rewards", module)
    function = user_reward("wrong_rewards:bad")
    with pytest.raises(ChartVLMError, match="reward wrong_rewards:bad ") as error:
        result = function(completions=as_trl(["a", "b"]), prompts=[[], []], completion_ids=[[1], [2]])
        if is_async:
            asyncio.run(result)
    assert message in str(error.value)


def test_a_user_reward_may_leave_completions_unscored():
    import sys
    import types

    module = types.ModuleType("partial_rewards")
    module.some = lambda completions, **_: [None, float("nan"), 1]
    sys.modules["partial_rewards"] = module
    try:
        got = user_reward("partial_rewards:some")(completions=as_trl(["a", "b", "c"]))
    finally:
        del sys.modules["partial_rewards"]
    assert got[0] is None and math.isnan(got[1]) and got[2] == 1


def test_a_user_reward_module_in_the_working_folder_is_found(tmp_path, monkeypatch):
    import sys

    (tmp_path / "rewards_in_the_working_folder.py").write_text("def one(completions, **_):\n"
                                                                "    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])  # as a console script
    assert user_reward("rewards_in_the_working_folder:one")(completions=as_trl(["a"])) == [1.0]


@pytest.mark.parametrize("spec,message", [
    ("acuracy", "neither a chartvlm reward (relaxed_accuracy, format, length_penalty) nor 'module:function'"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("grpo_rewards:missing", "grpo_rewards.py) has no function 'missing'"),  # named with its file: which module was found
    ("grpo_rewards:", "neither a chartvlm reward"),
])
def test_a_reward_that_cannot_be_found_is_named(spec, message):
    with pytest.raises(ChartVLMError, match="rewards: ") as error:
        build_rewards({spec: 1.0}, metric="relaxed", reasoning=False, max_completion_length=16)
    assert message in str(error.value)


def test_completion_text_reads_every_form_trl_passes():
    assert completion_text("42") == "42"
    assert completion_text([{"role": "assistant", "content": "42"}]) == "42"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "4"},
                                                              {"type": "text", "text": "2"}]}]) == "42"
    assert completion_text([]) == ""


def test_rewards_and_weights_come_from_yaml_or_a_json_flag(tmp_path):
    config = parse_config(["--rewards", '{"relaxed_accuracy": 1, "length_penalty": -0.5}'])
    assert config.grpo.rewards == {"relaxed_accuracy": 1, "length_penalty": -0.5}
    path = tmp_path / "grpo.yaml"
    path.write_text("method: grpo\ngrpo:\n  rewards: {format: 0.2, relaxed_accuracy: 1.0}\n  num_generations: 4\n")
    config = parse_config(["--config", str(path)])
    assert config.train.method == "grpo" and config.grpo.num_generations == 4
    assert list(config.grpo.rewards) == ["format", "relaxed_accuracy"]
    assert set(BUILT_IN) == {"relaxed_accuracy", "format", "length_penalty"}


@pytest.mark.parametrize("flags,message", [
    (["--rewards", "{relaxed_accuracy: 1"], "rewards must be a JSON object"),
    (["--rewards", "{}"], "non-empty mapping"),
    (["--rewards", '{"format": "high"}'], "the weight of 'format' must be a finite number"),
    (["--rewards", '{"format": NaN}'], "finite number"),
    (["--length_penalty_buffer", "0"], "length_penalty_buffer must be at least 1"),
    (["--method", "grpo", "--packing", "true"], None),  # refused when training starts (train.check_config)
    (["--init_adapter", "x", "--tuning", "full"], "merge it into its base first"),

])
def test_bad_grpo_options_are_one_clear_message(flags, message):
    if message is None:
        from chartvlm.train import check_config

        with pytest.raises(ChartVLMError, match="packing is for method sft"):
            check_config(parse_config(flags))
        return
    with pytest.raises(ChartVLMError) as error:
        parse_config(flags)
    assert message in str(error.value)


def test_reasoning_sets_the_prompt_and_the_room_to_think_unless_the_user_did():
    from chartvlm.prompts import REASONING_SYSTEM_MESSAGE, SYSTEM_MESSAGE

    plain = parse_config([])
    assert plain.data.system_message == SYSTEM_MESSAGE and plain.eval.eval_max_new_tokens == 32
    reasoned = parse_config(["--reasoning", "true"])
    assert reasoned.data.system_message == REASONING_SYSTEM_MESSAGE
    assert reasoned.eval.eval_max_new_tokens == reasoned.eval.max_new_tokens == 1024
    chosen = parse_config(["--reasoning", "true", "--max_completion_length", "300", "--eval_max_new_tokens", "400",
                           "--system_message", "Think, then answer."])
    assert chosen.data.system_message == "Think, then answer."
    assert (chosen.eval.max_new_tokens, chosen.eval.eval_max_new_tokens) == (300, 400)
    assert math.isfinite(chosen.grpo.beta) and chosen.grpo.beta == 0.04


@pytest.mark.parametrize("trained_with", [False, True], ids=["plain-model", "reasoning-model"])
def test_a_reasoning_flag_at_evaluation_wins_over_what_the_model_was_trained_with(trained_with, tmp_path):
    """`eval --reasoning X` on a model trained the other way: the prompt and the room to think follow the flag.
    The same flag as trained changes nothing (the trained prompt and limits stay), and a harness's fixed
    new-token limit stays whatever the flag."""
    from chartvlm.prompts import REASONING_SYSTEM_MESSAGE, SYSTEM_MESSAGE
    from chartvlm.settings import resolve

    parse_config(["--method", "grpo", "--reasoning", str(trained_with).lower(), "--system_message", "Be brief.",
                  "--max_new_tokens", "300", "--eval_max_new_tokens", "300"]).save(tmp_path)
    trained = ("Be brief.", 300, 300)
    other = (SYSTEM_MESSAGE, 128, 32) if trained_with else (REASONING_SYSTEM_MESSAGE, 1024, 1024)
    for flags, reasoning, expected in (([], trained_with, trained),
                                       (["--reasoning", str(trained_with).lower()], trained_with, trained),
                                       (["--reasoning", str(not trained_with).lower()], not trained_with, other)):
        settings = resolve(parse_config(flags), str(tmp_path), log=False)
        assert settings.reasoning is reasoning, flags
        assert (settings.system_message, settings.max_new_tokens, settings.eval_max_new_tokens) == expected, flags
    harness = resolve(parse_config(["--prompt_style", "lmms-eval", "--reasoning", str(not trained_with).lower()]),
                      str(tmp_path), log=False)
    assert (harness.system_message, harness.eval_max_new_tokens, harness.reasoning) == (None, 16, False)


def test_a_grpo_run_s_config_saved_before_loss_type_reached_grpo_still_evaluates(tmp_path):
    """Such files record SFT's loss_type nll under method grpo: evaluation reads them; training says what to do."""
    from chartvlm.train import check_config

    (tmp_path / "old.yaml").write_text("train:\n  method: grpo\n  loss_type: nll\n")
    config = parse_config(["--config", str(tmp_path / "old.yaml")])
    with pytest.raises(ChartVLMError, match="records SFT's nll: drop the line"):
        check_config(config)
