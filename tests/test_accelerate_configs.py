"""The Accelerate config files of configs/accelerate/ against the installed accelerate's schema.

Each file goes through what ``accelerate launch --config_file FILE`` does before it starts any
process: accelerate's own config class (unknown top-level keys are an error there), the launch
command's argument check, and the environment it hands the processes, from which accelerate's
FSDP / DeepSpeed plugins are built. Nested keys (``fsdp_config``, ``deepspeed_config``) are copied
into the launch arguments without a check, so a typo there would be silently ignored: the test
compares them with the launch parser's options. No GPU and no DeepSpeed install are needed.
"""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
EXPECTED = {
    "single_gpu.yaml": DistributedType.NO,
    "ddp.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
    "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
    "deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
    "multi_node.yaml": DistributedType.MULTI_GPU,
}


def launch_args(path: Path):
    """The launch arguments ``accelerate launch --config_file path -m cxrlib.train`` would use.

    ``_validate_launch_command`` is private, but it is the one place accelerate fills and checks
    the arguments from a config file (accelerate has no public "check this file" call).
    """
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "cxrlib.train"])
    return _validate_launch_command(args)


def test_every_setup_has_a_file():
    assert {p.name for p in CONFIG_DIR.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_launches_with_bf16(name):
    path = CONFIG_DIR / name
    cfg = load_config_from_file(str(path))  # raises on unknown top-level keys
    assert cfg.distributed_type == EXPECTED[name]
    assert cfg.mixed_precision == "bf16"
    options = {a.dest for a in launch_command_parser()._actions}
    for key in list(cfg.fsdp_config) + list(cfg.deepspeed_config):
        assert key in options, f"{name}: '{key}' is no accelerate launch option (typo?)"
    args, _, _ = launch_args(path)
    assert args.mixed_precision == "bf16"
    assert args.use_fsdp == (name == "fsdp.yaml")
    assert args.use_deepspeed == name.startswith("deepspeed")
    assert args.num_processes == (1 if name == "single_gpu.yaml" else 16 if "node" in name else 2)


def test_fsdp_is_full_shard_of_the_llm_and_encoder_layers(monkeypatch):
    args, _, _ = launch_args(CONFIG_DIR / "fsdp.yaml")
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher sets
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["MistralDecoderLayer", "Dinov2Layer"]
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert not plugin.activation_checkpointing  # the presets' own option is used instead


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_stage_and_accumulation_left_to_cxrlib(monkeypatch, stage):
    args, defaults, mp_from_config = launch_args(CONFIG_DIR / f"deepspeed_zero{stage}.yaml")
    # what `accelerate launch` adds before its DeepSpeed launcher (accelerate/commands/launch.py)
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", raising=False)
    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    assert plugin.deepspeed_config["gradient_clipping"] == 1.0
    saves_whole = plugin.deepspeed_config["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"
    ]
    assert saves_whole == (stage == 3)


def test_multi_node_names_the_machines():
    args, _, _ = launch_args(CONFIG_DIR / "multi_node.yaml")
    assert args.num_machines == 2 and args.machine_rank == 0
    assert args.main_process_ip == "10.0.0.1" and args.main_process_port == 29500
    assert args.multi_gpu
