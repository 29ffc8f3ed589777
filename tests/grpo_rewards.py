"""A user's own GRPO reward, named in tests as "grpo_rewards:distinct_characters" (rewards: module:function)."""


def distinct_characters(completions, **kwargs):
    """Varies from one sampled completion to the next, so a random tiny model's groups have advantages to learn."""
    return [len(set(completion[0]["content"])) / 10 for completion in completions]


def unscored(completions, **kwargs):
    """Scores nothing (None for every completion): TRL then logs None as the reward's mean."""
    return [None] * len(completions)
