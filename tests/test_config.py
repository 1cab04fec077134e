"""Presets resolve, inherit, validate and save."""

import pytest

from cxrlib.config import (
    PRESETS,
    ConfigError,
    load_config,
    load_preset,
    num_patches,
    save_config,
)


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
