"""Training through TRL's SFTTrainer on the tiny model: what changes, what stays, resume."""

import json
import math
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from chartvlm.config import parse_config
from chartvlm.errors import ChartVLMError
from chartvlm.train import main as train_main
from conftest import run_args


def weights(model_dir, adapter=None):
    """State dict of a saved model (+ adapter), with the in-memory names transformers gives on load."""
    from chartvlm.modeling import load_model

    model = load_model(str(model_dir), adapter=adapter and str(adapter), device=torch.device("cpu"),
                       dtype=torch.float32)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_lora_run_changes_only_lora_weights(tiny_model_dir, chart_dataset_dir, tmp_path):
    from chartvlm.modeling import load_model

    out = tmp_path / "lora"
    config = parse_config(run_args(tiny_model_dir, chart_dataset_dir, out, "--max_steps", "2"))
    saved = train_main(config)

    state = json.loads((saved / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert state["global_step"] == 2 and len(losses) == 2 and all(math.isfinite(x) for x in losses)
    for name in ("adapter_model.safetensors", "adapter_config.json", "chartvlm_config.yaml",
                 "processor_config.json", "loss_curve.png"):
        assert (saved / name).exists(), name

    adapter = load_file(str(saved / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert not any("visual" in k for k in adapter), "LoRA must stay on the language model by default"
    # lora_B starts at zero: after training it must have moved.
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)

    # The base weights inside the trained model are the original ones.
    original = weights(tiny_model_dir)
    trained = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
               for k, v in weights(tiny_model_dir, saved).items() if "lora_" not in k}
    assert trained.keys() == original.keys()
    assert all(torch.equal(trained[k], original[k]) for k in original)


def test_a_picture_that_cannot_be_drawn_never_costs_the_trained_model(tiny_model_dir, chart_dataset_dir, tmp_path,
                                                                      monkeypatch, caplog):
    import chartvlm.report

    def broken(*args, **kwargs):
        raise ValueError("no such font")

    monkeypatch.setattr(chartvlm.report, "plot_loss_curve", broken)
    saved = train_main(parse_config(run_args(tiny_model_dir, chart_dataset_dir, tmp_path / "out", "--max_steps", "1")))
    assert (saved / "adapter_model.safetensors").exists() and (saved / "trainer_state.json").exists()
    assert not (saved / "loss_curve.png").exists()
    assert "loss_curve.png not drawn (ValueError: no such font); the model is saved" in caplog.text


def test_full_tuning_changes_base_weights_but_not_the_frozen_vision_tower(tiny_model_dir, chart_dataset_dir,
                                                                           tmp_path):
    out = tmp_path / "full"
    config = parse_config(run_args(tiny_model_dir, chart_dataset_dir, out, "--max_steps", "2", "--tuning", "full"))
    saved = train_main(config)
    before, after = weights(tiny_model_dir), weights(saved)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("language_model" in k for k in changed)
    assert not any("visual" in k for k in changed)


def test_resume_continues_from_the_saved_step(tiny_model_dir, chart_dataset_dir, tmp_path):
    out = tmp_path / "resume"
    common = ["--save_strategy", "steps", "--save_steps", "2"]
    train_main(parse_config(run_args(tiny_model_dir, chart_dataset_dir, out, "--max_steps", "2", *common)))
    assert (out / "checkpoint-2").is_dir()
    train_main(parse_config(run_args(tiny_model_dir, chart_dataset_dir, out, "--max_steps", "4", "--resume",
                                     "true", *common)))
    state = json.loads((out / "trainer_state.json").read_text())
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert state["global_step"] == 4
    assert steps == [1, 2, 3, 4], "resumed run must carry the first run's history and continue at step 3"


def test_unknown_config_key_fails_with_close_matches(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rat: 0.1\nlora_rank: 4\n")
    with pytest.raises(ChartVLMError) as err:
        parse_config(["--config", str(config)])
    message = str(err.value)
    assert "learning_rat" in message and "learning_rate" in message
    assert "lora_rank" in message and "lora_r" in message
    with pytest.raises(ChartVLMError, match="lora_alpah.*lora_alpha"):
        parse_config(["--lora_alpah", "3"])


def test_every_shipped_config_parses(tmp_path):
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        config = parse_config(["--config", str(path)])
        assert config.train.output_dir


def test_seed_yaml_equals_the_defaults():
    from pathlib import Path

    seed = parse_config(["--config", str(Path(__file__).parents[1] / "configs" / "seed.yaml")]).to_dict()
    defaults = parse_config([]).to_dict()
    assert seed == defaults
    assert defaults["model"]["lora_target_modules"] == ["q_proj", "v_proj"]
    assert defaults["train"]["learning_rate"] == 2e-5 and defaults["data"]["subset"] == 0.01


def test_train_against_unreachable_hub_fails_fast(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "chartvlm.cli", "train", "--output_dir", str(tmp_path / "o")],
                            capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 2
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in result.stderr and "quickstart" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 60, f"took {elapsed:.0f}s"
