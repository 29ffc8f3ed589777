"""What a model is asked with: prompt style, system prompt, pixel limits, new-token limits and decoding.

A trained folder (a LoRA adapter, a full model, a merged export) records the run's configuration in
chartvlm_config.yaml. Evaluation, predict, the quick start, export and serving resolve their settings here,
in one order: a flag (or a YAML key) the user gave > what the trained folder recorded > the defaults, and
then the prompt style's fixed settings (a harness's pixels, new-token limit, no system prompt), unless a
flag chose otherwise. What was inherited and what a flag overrode is logged: a model evaluated with another
system prompt or other pixels than it was trained with loses accuracy silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from chartvlm.prompts import PromptStyle, prompt_style

logger = logging.getLogger(__name__)

# (section, option) a trained folder carries into inference.
INHERITED = (("data", "system_message"), ("data", "reasoning"), ("model", "min_pixels"),
             ("model", "max_pixels"), ("eval", "max_new_tokens"), ("eval", "eval_max_new_tokens"))


@dataclass(frozen=True)
class InferenceSettings:
    style: PromptStyle
    system_message: str | None      # None: no system turn (the template adds its default, if any)
    min_pixels: int
    max_pixels: int
    max_new_tokens: int             # predict and serving
    eval_max_new_tokens: int        # evaluation
    generation: str                 # generate.generation_config's mode
    trained_folder: str | None      # where inherited values came from
    reasoning: bool = False         # the system prompt asks for <think>...</think> before the answer


def resolve(config, model_path: str, adapter: str | None = None, log: bool = True) -> InferenceSettings:
    """The settings to ask `model_path` (+ `adapter`) with, from `config` (a RunConfig) and the trained folder."""
    from chartvlm.config import CONFIG_FILENAME, REASONING_DERIVED, load_run_config

    folder = next((f for f in (adapter, model_path) if f and (Path(f) / CONFIG_FILENAME).is_file()), None)
    saved = load_run_config(folder) if folder else {}
    # A reasoning flag other than the model's brings its prompt and token limits (`eval --reasoning false` asks a
    # reasoning model for bare answers); one equal to the model's changes nothing.
    chosen = set(config.explicit)
    if "reasoning" in chosen and bool(saved.get("data", {}).get("reasoning", False)) != config.data.reasoning:
        chosen |= set(REASONING_DERIVED)
    values, inherited, overridden = {}, [], []
    for section, name in INHERITED:
        current = getattr(getattr(config, section), name)
        recorded = saved.get(section, {}).get(name, current)
        if name in chosen:
            values[name] = current
            if recorded != current:
                overridden.append(name)
        else:
            values[name] = recorded
            if name in saved.get(section, {}):
                inherited.append(name)
    style = prompt_style(config.eval.prompt_style)
    fixed = []
    if style.pixels and not {"min_pixels", "max_pixels"} & config.explicit:
        values["min_pixels"], values["max_pixels"] = style.pixels
        fixed.append(f"pixels {style.pixels[0]:,}-{style.pixels[1]:,}")
    if style.max_new_tokens:
        limited = [name for name in ("max_new_tokens", "eval_max_new_tokens") if name not in config.explicit]
        for name in limited:
            values[name] = style.max_new_tokens
        if limited:
            fixed.append(f"at most {style.max_new_tokens} new tokens")
    if not style.system:
        fixed.append("no system prompt")
    generation = config.eval.generation_config or style.generation
    if log:
        if inherited:
            logger.info("as trained (%s): %s", Path(folder) / CONFIG_FILENAME,
                        ", ".join(_show(name, values[name]) for name in inherited))
        if overridden:
            logger.warning("flags override what %s was trained with: %s", folder,
                           ", ".join(f"{_show(name, values[name])} (trained: "
                                     f"{_show_value(saved_value(saved, name))})" for name in overridden))
        if fixed:
            logger.info("prompt style %s: %s", style.name, ", ".join(fixed))
    return InferenceSettings(style=style, system_message=values["system_message"] if style.system else None,
                             min_pixels=values["min_pixels"], max_pixels=values["max_pixels"],
                             max_new_tokens=values["max_new_tokens"],
                             eval_max_new_tokens=values["eval_max_new_tokens"], generation=generation,
                             trained_folder=folder, reasoning=bool(values["reasoning"]) and style.system)


def saved_value(saved: dict, name: str):
    return next((section[name] for section in saved.values() if isinstance(section, dict) and name in section), None)


def _show(name: str, value) -> str:
    return f"{name}={_show_value(value)}"


def _show_value(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"
