"""Presets as data: load, override, validate and save the resolved configuration.

The three presets (``smoke``, ``tiny``, ``paper``) live in ``cxrlib/presets/*.yaml``. ``smoke`` and
``paper`` inherit ``tiny`` and override what differs. A resolved config is a plain nested ``dict``;
every artifact (dataset, checkpoint, metrics file) is saved with it.

    >>> cfg = load_preset("smoke")
    >>> cfg["projector"]["num_queries"]
    4
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"
PRESETS = ("smoke", "tiny", "paper")
DEFAULT_PRESET = "tiny"
CONFIG_FILENAME = "config.json"


class ConfigError(ValueError):
    """A preset name, override or saved config that cannot be used."""


def _deep_merge(base: dict, override: dict, where: str = "") -> dict:
    """Return ``base`` updated by ``override``; keys unknown to ``base`` are an error."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}.{key}" if where else key
        if key not in out:
            raise ConfigError(f"unknown config key '{path}'; known keys here: {sorted(out)}")
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _deep_merge(out[key], value, path)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(name: str) -> dict:
    path = PRESET_DIR / f"{name}.yaml"
    if name not in PRESETS or not path.exists():
        raise ConfigError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    with open(path) as f:
        return yaml.safe_load(f)


def load_preset(name: str = DEFAULT_PRESET, overrides: dict | None = None) -> dict[str, Any]:
    """Resolve a preset (following ``inherits``) and apply ``overrides``.

    Args:
        name: ``smoke``, ``tiny`` or ``paper``.
        overrides: nested dict of values to change, e.g. ``{"train": {"phase2": {"steps": 10}}}``.

    Returns:
        The fully resolved configuration as a nested dict.
    """
    raw = _read_yaml(name)
    parent = raw.pop("inherits", None)
    cfg = _deep_merge(load_preset(parent), raw) if parent else raw
    if overrides:
        cfg = _deep_merge(cfg, overrides)
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    """Check the constraints that would otherwise fail deep inside a model or a data loader."""
    enc, proj = cfg["encoder"], cfg["projector"]
    if enc["image_size"] % enc["patch_size"]:
        raise ConfigError(
            f"encoder.image_size {enc['image_size']} is not a multiple of "
            f"encoder.patch_size {enc['patch_size']}"
        )
    side = int(round(proj["num_queries"] ** 0.5))
    if side * side != proj["num_queries"]:
        raise ConfigError(f"projector.num_queries {proj['num_queries']} is not a square number")
    grid = enc["image_size"] // enc["patch_size"]
    if side > grid:
        raise ConfigError(
            f"projector.num_queries {proj['num_queries']} ({side}x{side}) exceeds the "
            f"encoder's {grid}x{grid} patch grid"
        )
    h, w = cfg["data"]["render_size"]
    if min(h, w) < 16:
        raise ConfigError(f"data.render_size {h}x{w} is too small (minimum 16 pixels)")
    for phase in ("phase1", "phase2"):
        p = cfg["train"][phase]
        if p["global_batch"] % p["micro_batch"]:
            raise ConfigError(
                f"train.{phase}.global_batch {p['global_batch']} is not a multiple of "
                f"micro_batch {p['micro_batch']}"
            )


def num_patches(cfg: dict) -> int:
    """Patch tokens per image produced by the encoder (CLS dropped)."""
    grid = cfg["encoder"]["image_size"] // cfg["encoder"]["patch_size"]
    return grid * grid


def save_config(cfg: dict, directory: str | Path) -> Path:
    """Write the resolved config as ``config.json`` into ``directory`` and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_FILENAME
    path.write_text(json.dumps(cfg, indent=2))
    return path


def load_config(directory: str | Path) -> dict:
    """Read the ``config.json`` saved beside an artifact."""
    path = Path(directory) / CONFIG_FILENAME
    if not path.exists():
        raise ConfigError(
            f"no {CONFIG_FILENAME} in {directory}: was this artifact saved by cxrlib?"
        )
    return json.loads(path.read_text())
