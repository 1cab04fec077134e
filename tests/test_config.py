"""Presets resolve, inherit, validate (one pydantic schema, root preset included) and save."""

import shutil

import pytest
import torch
import yaml

from cxrlib import config as C
from cxrlib.config import (
    PRESETS,
    SCHEDULES,
    ConfigError,
    Phase2Stage,
    load_config,
    load_preset,
    num_patches,
    save_config,
    with_defaults,
)
from cxrlib.constants import LORA_TARGETS


def _keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, prefix + k + ".")
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_presets_resolve_with_the_same_structure(name):
    cfg = load_preset(name)
    assert cfg["name"] == name
    assert _keys(cfg) == _keys(load_preset("tiny"))


def test_paper_preset_carries_the_official_settings():
    cfg = load_preset("paper")
    assert cfg["encoder"]["hf_id"] == "microsoft/rad-dino"
    assert cfg["llm"]["hf_id"] == "mistralai/Mistral-7B-Instruct-v0.2"
    assert num_patches(cfg) == 1369
    assert cfg["projector"] == {
        "depth": 3,
        "mlp_depth": 2,
        "hidden_size": 1024,
        "num_queries": 361,
        "pos_emb": True,
    }
    assert cfg["lora"] == {
        "r": 8,
        "alpha": 32,
        "dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],
    }
    p1, p2 = cfg["train"]["phase1"], cfg["train"]["phase2"]
    assert (p1["lr"], p1["weight_decay"], p1["warmup_steps"], p1["global_batch"]) == (
        3e-4,
        0.01,
        500,
        256,
    )
    assert (p2["lr"], p2["weight_decay"], p2["warmup_steps"], p2["global_batch"]) == (
        1e-4,
        1e-4,
        500,
        64,
    )
    assert p1["trainable"] == ["projector"]
    assert p2["trainable"] == ["lora", "projector", "encoder"]
    # the card draws studies uniformly: none of tiny's class balance
    phase2 = with_defaults(p2, Phase2Stage)
    assert (phase2["abnormal_repeats"], phase2["boxed_repeats"], phase2["rare_finding_power"]) == (
        1,
        1,
        0,
    )
    assert cfg["llm"]["max_length"] == 4095
    assert cfg["inference"]["max_new_tokens"] == 500


def test_default_is_tiny():
    assert load_preset()["name"] == "tiny"


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="smoke, tiny, paper"):
        load_preset("huge")


def test_overrides_apply_and_unknown_keys_are_rejected():
    cfg = load_preset("smoke", {"train": {"phase2": {"steps": 7}}})
    assert cfg["train"]["phase2"]["steps"] == 7
    with pytest.raises(ConfigError, match="train.phase2.stepz"):
        load_preset("smoke", {"train": {"phase2": {"stepz": 7}}})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"projector": {"num_queries": 5}}, "not a square"),
        ({"encoder": {"image_size": 50}}, "not a multiple"),
        ({"projector": {"num_queries": 25}}, "exceeds"),
        ({"data": {"render_size": [8, 8]}}, "too small"),
        ({"train": {"phase1": {"global_batch": 5, "micro_batch": 2}}}, "not a multiple"),
    ],
)
def test_impossible_settings_fail_early(override, message):
    with pytest.raises(ConfigError, match=message):
        load_preset("smoke", override)


def test_save_and_load_round_trip(tmp_path):
    cfg = load_preset("smoke")
    save_config(cfg, tmp_path)
    assert load_config(tmp_path) == cfg
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path / "elsewhere")


# --- the schema (issue 11, item 2) ------------------------------------------------------------


@pytest.fixture
def preset_dir(tmp_path, monkeypatch):
    """A copy of the built-in presets that a test may break; load_preset reads it."""
    target = tmp_path / "presets"
    shutil.copytree(C.PRESET_DIR, target)
    monkeypatch.setattr(C, "PRESET_DIR", target)
    return target


def _edit_yaml(path, edit):
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw))


def test_a_typo_in_the_root_preset_fails_every_preset(preset_dir):
    def rename(raw):
        section = raw["train"]["lm_pretrain"]
        section["warmup_step"] = section.pop("warmup_steps")

    warmup = yaml.safe_load((preset_dir / "tiny.yaml").read_text())["train"]["lm_pretrain"]
    warmup = warmup["warmup_steps"]
    _edit_yaml(preset_dir / "tiny.yaml", rename)
    for name in PRESETS:
        with pytest.raises(ConfigError) as err:
            load_preset(name)
        message = str(err.value)
        assert f"unknown config key 'train.lm_pretrain.warmup_step' = {warmup}" in message
        assert "did you mean 'warmup_steps'?" in message
        if name != "smoke":  # smoke sets its own warmup_steps
            assert "train.lm_pretrain.warmup_steps: missing" in message


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ({"train": {"phase2": {"steps": "ten"}}}, "train.phase2.steps = 'ten'", "an integer >= 1"),
        ({"train": {"phase1": {"steps": 2.5}}}, "train.phase1.steps = 2.5", "valid integer"),
        ({"train": {"phase1": {"schedule": "cosin"}}}, "schedule = 'cosin'", "'cosine'"),
        ({"data": {"mixture": "papr"}}, "data.mixture = 'papr'", "paper, uniform"),
        ({"data": {"mixture": 5}}, "data.mixture = 5", "not a mixture"),
        ({"data": {"max_studies": "all"}}, "max_studies = 'all'", "an integer >= 1 or null"),
        ({"data": {"mixture": {"vqa": 1.0, "vqa2": 1.0}}}, "['vqa2']", "difference_vqa"),
        ({"train": {"phase2": {"trainable": ["lora", "projektor"]}}}, "trainable[1]", "'llm'"),
        ({"lora": {"target_modules": ["q_proj", "query"]}}, "target_modules[1]", "'o_proj'"),
        ({"lora": {"dropout": 1.5}}, "lora.dropout = 1.5", "less than 1"),
        ({"train": {"phase2": {"lr": "1e-4"}}}, "lr = '1e-4'", "write 1.0e-4"),
        ({"projector": {"pos_emb": "yes"}}, "pos_emb = 'yes'", "valid boolean"),
        ({"data": {"render_size": [72]}}, "render_size", "at least 2 items"),
        ({"inference": {"max_new_tokens": 0}}, "max_new_tokens = 0", "greater than or equal"),
    ],
)
def test_wrong_values_fail_at_load_with_key_value_and_choices(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        load_preset("smoke", override)
    assert key in str(err.value) and allowed in str(err.value)


def test_validation_returns_the_yaml_values_unchanged():
    cfg = load_preset("tiny")
    raw = yaml.safe_load((C.PRESET_DIR / "tiny.yaml").read_text())
    assert cfg == raw  # the root preset: no key added, no value coerced (alpha stays int 32)
    assert type(cfg["lora"]["alpha"]) is int and type(cfg["data"]["render_size"]) is list


def test_every_allowed_schedule_builds_in_transformers():
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for name in SCHEDULES:
        get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=10)


def test_lora_targets_are_the_llms_linear_layers():
    from cxrlib.model import build_model

    model = build_model(load_preset("smoke"), None, meta=True)
    linear = {n.rsplit(".", 1)[-1] for n, m in model.llm.named_modules() if isinstance(m, torch.nn.Linear)}  # fmt: skip
    assert linear - {"lm_head"} == set(LORA_TARGETS)


def test_a_users_yaml_file_inherits_a_preset(tmp_path):
    path = tmp_path / "my_run.yaml"
    path.write_text("inherits: tiny\ntrain:\n  phase2: {steps: 7}\n")
    cfg = load_preset(str(path))
    assert cfg["name"] == "my_run" and cfg["train"]["phase2"]["steps"] == 7
    tiny = load_preset("tiny")
    assert cfg["train"]["phase1"] == tiny["train"]["phase1"]
    # a file may inherit another file, relative to itself
    (tmp_path / "child.yml").write_text("inherits: my_run.yaml\nname: child\nseed: 3\n")
    child = load_preset(tmp_path / "child.yml")
    assert (child["name"], child["seed"], child["train"]["phase2"]["steps"]) == ("child", 3, 7)


def test_a_users_yaml_file_is_validated_by_the_same_schema(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("inherits: tiny\ntrain:\n  phase2: {schedule: cosin}\n")
    with pytest.raises(ConfigError, match="train.phase2.schedule = 'cosin': not allowed"):
        load_preset(str(path))
    with pytest.raises(ConfigError, match="smoke, tiny, paper"):
        load_preset(str(tmp_path / "missing.yaml"))
    (tmp_path / "loop.yaml").write_text("inherits: loop.yaml\n")
    with pytest.raises(ConfigError, match="circle"):
        load_preset(str(tmp_path / "loop.yaml"))


def test_notebooks_take_a_users_file(tmp_path, monkeypatch):
    from cxrlib.notebook import setup

    monkeypatch.setenv("CXR_OUTPUT_ROOT", str(tmp_path / "build"))
    path = tmp_path / "mine.yaml"
    path.write_text("inherits: smoke\n")
    run = setup(str(path), figure_dir=str(tmp_path / "figures"))
    assert run.out == tmp_path / "build" / "mine"  # build/<name>, not build/<path>
    assert run.cfg["train"] == load_preset("smoke")["train"]
