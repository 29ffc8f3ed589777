"""More than one process on CPU (gloo): DDP training and sharded evaluation under torchrun, the shipped
accelerate launcher configs, and the pieces (shards, merge, checks) in-process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chartvlm import distributed, evaluate
from chartvlm.config import parse_config
from chartvlm.errors import ChartVLMError
from chartvlm.evaluate import EvalSettings, run_eval, run_predictions
from chartvlm.results import EvalResult
from chartvlm.io import read_jsonl
from conftest import chart_rows, run_args

CONFIGS = Path(__file__).parents[1] / "configs" / "accelerate"

# Trains through the CLI under torchrun and records, per rank, the rows each batch held, the final LoRA
# weights and the calls that write files or generate outside the Trainer (rank 0's job alone).
TRAIN_PROBE = '''
import os, sys
import torch
import chartvlm.collate as collate
import chartvlm.config as run_config
import chartvlm.report as report
import chartvlm.train as train
from chartvlm.cli import main

out, rank = sys.argv[1], os.environ["RANK"]
record = {"seen": [], "lora": {}, "calls": {"config.save": 0, "plot_loss_curve": 0, "sample": 0}}
make_collator, save_outputs = collate.make_collator, train.save_outputs

def recording_collator(*args, **kwargs):
    collate_rows = make_collator(*args, **kwargs)
    def collate_and_record(rows):
        record["seen"].append([row["row_id"] for row in rows])
        return collate_rows(rows)
    return collate_and_record

def save_and_record(trainer, processor, config, base):
    record["lora"] = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}
    return save_outputs(trainer, processor, config, base)

def counted(name, function):
    def call(*args, **kwargs):
        record["calls"][name] += 1
        return function(*args, **kwargs)
    return call

collate.make_collator, train.save_outputs = recording_collator, save_and_record
run_config.RunConfig.save = counted("config.save", run_config.RunConfig.save)
report.plot_loss_curve = counted("plot_loss_curve", report.plot_loss_curve)
train.log_sample_generation = counted("sample", train.log_sample_generation)
code = main(["train", *sys.argv[2:]])
torch.save(record, f"{out}/rank{rank}.pt")
sys.exit(code)
'''


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Two CPU processes; --standalone picks a free rendezvous port (tests may run side by side)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], capture_output=True, text=True, env=env, timeout=timeout)


# --------------------------------------------------------------------------------------------
# Training: 2-process DDP
# --------------------------------------------------------------------------------------------


def ranks_in_step(out: Path) -> list[dict]:
    """The probe's records of both ranks, checked: DDP averages the gradients, so both ranks end with the same LoRA
    weights, and they moved; the one adapter written holds exactly those weights."""
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["lora"].keys() == ranks[1]["lora"].keys() and ranks[0]["lora"]
    assert all(torch.equal(ranks[0]["lora"][k], ranks[1]["lora"][k]) for k in ranks[0]["lora"])
    assert any(v.abs().sum() > 0 for k, v in ranks[0]["lora"].items() if "lora_B" in k)
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert set(saved) == {k.replace(".default", "") for k in ranks[0]["lora"]}
    assert all(torch.equal(saved[k.replace(".default", "")], v) for k, v in ranks[0]["lora"].items())
    return ranks


def test_ddp_training_on_two_processes_splits_the_data_and_the_ranks_agree(tiny_model_dir, chart_dataset_dir,
                                                                            tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    probe = tmp_path / "train_probe.py"
    probe.write_text(TRAIN_PROBE)
    result = torchrun(str(probe), str(out), *run_args(tiny_model_dir, chart_dataset_dir, out, "--max_steps", "2"))
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = ranks_in_step(out)

    # One shuffled order split by rank: 2 steps x 2 rows on each rank = 8 different training rows
    # (the dataloader collates one batch ahead, hence [:2]).
    seen = [ranks[r]["seen"][:2] for r in (0, 1)]
    assert [len(batch) for batch in seen[0] + seen[1]] == [2, 2, 2, 2]
    rows = [row for r in (0, 1) for batch in seen[r] for row in batch]
    assert len(set(rows)) == 8 and all(row.startswith("train-") for row in rows)

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    # 10 rows / (2 ranks x 2 per device) = 3 steps per epoch (a single process would take 5).
    assert state["log_history"][0]["epoch"] == pytest.approx(1 / 3)
    for name in ("chartvlm_config.yaml", "processor_config.json", "loss_curve.png", "adapter_config.json"):
        assert (out / name).exists(), name
    assert ranks[0]["calls"] == {"config.save": 2, "plot_loss_curve": 1, "sample": 1}
    assert ranks[1]["calls"] == {"config.save": 0, "plot_loss_curve": 0, "sample": 0}
    # Rank 0 logs progress, the other rank only warnings: one sample generation, one "saved".
    assert result.stderr.count("chartvlm.train: saved adapter") == 1
    assert result.stderr.count("[rank 0] chartvlm.train: sample before training") == 1


def test_ddp_grpo_on_two_processes_keeps_the_ranks_in_step(tiny_model_dir, chart_dataset_dir, tmp_path, monkeypatch):
    out = tmp_path / "grpo"
    out.mkdir()
    probe = tmp_path / "train_probe.py"
    probe.write_text(TRAIN_PROBE)
    # The user reward of tests/grpo_rewards.py varies across samples, so both ranks have something to learn.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    rewards = json.dumps({"grpo_rewards:distinct_characters": 1.0, "relaxed_accuracy": 1.0})
    result = torchrun(str(probe), str(out), *run_args(tiny_model_dir, chart_dataset_dir, out, "--max_steps", "2",
                                                      "--method", "grpo", "--num_generations", "2",
                                                      "--max_completion_length", "6", "--rewards", rewards))
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = ranks_in_step(out)
    state = json.loads((out / "trainer_state.json").read_text())
    rewarded = [entry for entry in state["log_history"] if "reward" in entry]
    assert [entry["step"] for entry in rewarded] == [1, 2] and all(entry["kl"] >= 0 for entry in rewarded)
    assert (out / "reward_curves.png").exists()
    assert ranks[0]["calls"] == {"config.save": 2, "plot_loss_curve": 1, "sample": 1}
    assert ranks[1]["calls"] == {"config.save": 0, "plot_loss_curve": 0, "sample": 0}
    # Sample completions are logged once, by rank 0.
    assert result.stderr.count("chartvlm.grpo: step 2 sample") == 4


# --------------------------------------------------------------------------------------------
# Evaluation: shards gathered into what a single process writes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scrambled_eval_setup(scrambled, tmp_path_factory):
    """The scrambled tiny model on disk (answers vary with the chart) and 7 test questions, 4 of them
    labelled with that model's own answer, so the metrics are neither 0 nor 100."""
    from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value

    from chartvlm.generate import generate_answers
    from chartvlm.prompts import format_data

    model, processor = scrambled
    root = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    rows = chart_rows(7)
    answers = generate_answers(model, processor, [format_data(row) for row in rows], max_new_tokens=2)
    assert len(set(answers)) > 1, "answers must vary, or equal predictions prove nothing"
    for i in range(0, 7, 2):
        rows[i]["label"] = [answers[i]]
    features = Features({"image": Image(), "query": Value("string"), "label": Sequence(Value("string")),
                         "human_or_machine": Value("int64")})
    DatasetDict({"test": Dataset.from_list(rows, features=features)}).save_to_disk(str(root / "data"))
    return root / "model", root / "data"


def eval_args(model_dir, data_dir, out) -> list[str]:
    return run_args(model_dir, data_dir, out, "--test_split", "test", "--eval_batch_size", "2",
                    "--eval_max_new_tokens", "2", "--eval_output_dir", str(out))


def test_sharded_eval_on_two_processes_equals_a_single_process_run(scrambled_eval_setup, tmp_path):
    model_dir, data_dir = scrambled_eval_setup
    single_dir, sharded_dir = tmp_path / "single", tmp_path / "sharded"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the torchrun ranks compute with one thread each
    try:
        single = run_eval(parse_config(eval_args(model_dir, data_dir, single_dir)), progress=False)["model"]
    finally:
        torch.set_num_threads(threads)
    expected = sorted(read_jsonl(single_dir / "predictions.jsonl"), key=lambda row: row["index"])
    assert 0 < single.overall["correct"] < single.overall["total"] == 7

    # An earlier run that stopped after 3 questions: the ranks take them over instead of redoing them.
    sharded_dir.mkdir()
    (sharded_dir / "run.json").write_text((single_dir / "run.json").read_text())
    (sharded_dir / "predictions.jsonl").write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in expected[:3]))

    result = torchrun("-m", "chartvlm.cli", "eval", *eval_args(model_dir, data_dir, sharded_dir))
    assert result.returncode == 0, result.stderr[-4000:]
    assert read_jsonl(sharded_dir / "predictions.jsonl") == expected  # same rows, index order
    sharded = EvalResult.load(sharded_dir)
    assert sharded.throughput["questions"] == 4
    sharded.throughput = single.throughput = None
    assert sharded == single
    assert not (sharded_dir / evaluate.SHARDS_DIRNAME).exists()
    assert (sharded_dir / "report.html").exists()
    assert result.stdout.count("model: overall") == 1 and result.stdout.count("report: ") == 1


def test_shards_partition_the_questions_and_merge_back_in_index_order(scrambled, chart_dataset_dir, tmp_path):
    from chartvlm.data import load_chartqa

    model, processor = scrambled
    dataset = load_chartqa(str(chart_dataset_dir), split="train")  # 10 questions
    settings = EvalSettings(model="m", adapter=None, dataset="d", split="train", subset_seed=0,
                            max_new_tokens=3, batch_size=2)
    full = run_predictions(model, processor, dataset, tmp_path / "full", settings, progress=False)
    shards = []
    for rank in range(3):
        run_predictions(model, processor, dataset, tmp_path / f"s{rank}", settings, progress=False, shard=(rank, 3))
        shards.append(read_jsonl(tmp_path / f"s{rank}" / "predictions.jsonl"))
    assert [[row["index"] for row in rows] for rows in shards] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    rows = read_jsonl(tmp_path / "full" / "predictions.jsonl")
    merged = evaluate.merge_shards(shards[::-1] + [shards[0][:2]], 10, tmp_path)  # any order, duplicates
    assert merged == sorted(rows, key=lambda row: row["index"])
    assert full.overall["total"] == 10
    with pytest.raises(ChartVLMError, match="3 of 10 questions missing"):
        evaluate.merge_shards(shards[:2], 10, tmp_path)
    with pytest.raises(ChartVLMError, match=r"indices \[9\] beyond 9"):
        evaluate.merge_shards(shards, 9, tmp_path)


def test_a_shard_resumes_from_an_earlier_merged_file(tmp_path):
    merged, shard = tmp_path / "predictions.jsonl", tmp_path / "shards" / "rank1-of-2" / "predictions.jsonl"
    merged.write_text("".join(json.dumps({"index": i}) + "\n" for i in range(5)))
    shard.parent.mkdir(parents=True)
    shard.write_text(json.dumps({"index": 3}) + "\n")
    evaluate._seed_shard(merged, shard, 1, 2)
    assert [row["index"] for row in read_jsonl(shard)] == [3, 1]


# --------------------------------------------------------------------------------------------
# Launch environment and checks
# --------------------------------------------------------------------------------------------


def test_rank_and_cpu_launch_come_from_the_launcher_environment(monkeypatch):
    for name in ("ACCELERATE_USE_CPU", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(name, "0")  # so that teardown restores the variable even if the code sets it
        monkeypatch.delenv(name)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    assert distributed.init_process_group() is False
    distributed.configure_cpu_launch()
    assert "ACCELERATE_USE_CPU" not in os.environ
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (1, 2, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    distributed.configure_cpu_launch()
    assert os.environ["ACCELERATE_USE_CPU"] == "true"


def test_training_refuses_a_launch_the_trainer_does_not_see(tiny_model_dir, chart_dataset_dir, tmp_path,
                                                            monkeypatch):
    from chartvlm.train import check_config

    config = parse_config(run_args(tiny_model_dir, chart_dataset_dir, tmp_path))  # built as one process
    check_config(config)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ChartVLMError, match="launched as 2 processes but the Trainer sees 1.*--use_cpu true"):
        check_config(config)


def test_fsdp_with_a_sharded_state_dict_is_refused_before_training():
    from types import SimpleNamespace

    from torch.distributed.fsdp import StateDictType

    def trainer(kind):
        state = SimpleNamespace(fsdp_plugin=SimpleNamespace(state_dict_type=kind))
        return SimpleNamespace(is_fsdp_enabled=True, accelerator=SimpleNamespace(state=state))

    distributed.check_final_save(trainer(StateDictType.FULL_STATE_DICT))
    distributed.check_final_save(SimpleNamespace(is_fsdp_enabled=False))
    with pytest.raises(ChartVLMError, match="SHARDED_STATE_DICT.*FULL_STATE_DICT"):
        distributed.check_final_save(trainer(StateDictType.SHARDED_STATE_DICT))


# --------------------------------------------------------------------------------------------
# Shipped accelerate configs
# --------------------------------------------------------------------------------------------


def launch_args(config_file: Path):
    """What `accelerate launch --config_file F --num_processes 2` resolves (its own parser and checks)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    args, defaults, _ = _validate_launch_command(
        parser.parse_args(["--config_file", str(config_file), "--num_processes", "2", "main.py"]))
    return parser, args, defaults


def plugin_env(monkeypatch, env: dict) -> None:
    for key, value in env.items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)


def test_every_accelerate_config_is_one_accelerate_accepts():
    from accelerate.commands.config.config_args import ClusterConfig

    found = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert found == ["ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"]
    expected = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "deepspeed_zero2.yaml": "DEEPSPEED",
                "deepspeed_zero3.yaml": "DEEPSPEED"}
    for name in found:
        config = ClusterConfig.from_yaml_file(str(CONFIGS / name))  # unknown top-level keys raise
        assert config.distributed_type.value == expected[name], name
        parser, args, _ = launch_args(CONFIGS / name)
        assert args.num_processes == 2 and args.num_machines == 1 and args.mixed_precision == "no", name
        # Nested keys become launch flags; accelerate silently ignores a misspelt one, so check them here.
        flags = {action.dest for action in parser._actions}
        for key in [*config.fsdp_config, *config.deepspeed_config]:
            assert key in flags, f"{name}: {key} is not an accelerate launch option"


def test_fsdp_config_wraps_the_qwen2_5_vl_layers(monkeypatch, tiny):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import StateDictType

    _, args, _ = launch_args(CONFIGS / "fsdp.yaml")
    assert args.use_fsdp
    plugin_env(monkeypatch, prepare_multi_gpu_env(args))
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT and not plugin.cpu_ram_efficient_loading
    model, _ = tiny
    plugin.set_auto_wrap_policy(model)  # raises if a class name is not in the model
    wrapped = {cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]}
    assert wrapped == {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"} == set(model._no_split_modules)


@pytest.mark.parametrize("name,stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_configs_leave_batch_and_precision_to_the_training_config(monkeypatch, name, stage):
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    _, args, defaults = launch_args(CONFIGS / name)
    assert args.use_deepspeed
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    plugin_env(monkeypatch, env)
    config = DeepSpeedPlugin().deepspeed_config  # builds without DeepSpeed installed
    assert config["zero_optimization"]["stage"] == stage
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] == (stage == 3)
    assert all(config[key] == "auto" for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                                  "gradient_clipping"))


@pytest.mark.slow
def test_accelerate_launch_with_the_ddp_config_runs_two_cpu_processes(tiny_model_dir, chart_dataset_dir, tmp_path):
    """`accelerate launch --cpu` would start one process; the DDP config with --num_processes 2 starts two."""
    import socket

    out = tmp_path / "accelerate"
    with socket.socket() as free:  # accelerate's default port may be taken by a test running beside this one
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml"),
         "--num_processes", "2", "--main_process_port", str(port), "-m", "chartvlm.cli", "train",
         *run_args(tiny_model_dir, chart_dataset_dir, out, "--max_steps", "2")],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["log_history"][0]["epoch"] == pytest.approx(1 / 3)
    assert result.stderr.count("chartvlm.train: saved adapter") == 1
