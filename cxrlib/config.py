"""Presets as data: load, override, validate and save the resolved configuration.

The three built-in presets (``smoke``, ``tiny``, ``paper``) live in ``cxrlib/presets/*.yaml``.
``smoke`` and ``paper`` inherit ``tiny`` and override what differs. A preset may also be the path
of your own YAML file, the "copy the tiny preset" route::

    # my.yaml
    inherits: tiny          # a built-in preset, or another YAML file (relative to this one)
    name: my-run            # default: the file name without .yaml
    train: {phase2: {steps: 1000}}

    >>> cfg = load_preset("my.yaml")

A resolved config is a plain nested ``dict``; every artifact (dataset, checkpoint, metrics file)
is saved with it.

    >>> cfg = load_preset("smoke")
    >>> cfg["projector"]["num_queries"]
    4

**Validation.** Every resolved preset (the root ``tiny.yaml`` included) is checked at load time
against one schema, ``PresetSchema`` below, written with pydantic v2: one class per section,
unknown keys forbidden (``extra="forbid"``), strict types (``steps: "ten"`` or ``steps: 1.5`` is an
error, never coerced) and allowed values as ``Literal`` choices (schedules, mixtures, trainable
parts, LoRA target modules). A mistake fails in ``load_preset`` with a ``ConfigError`` that names
the key, the value and the allowed choices. Pydantic only checks: ``load_preset`` returns the
dict as it was read, so the saved config and the resume fingerprints see exactly the YAML's keys
and values. Checks between sections (patch grid, batch multiples) follow in ``validate``.

**Adding a key** to a preset: add it to ``tiny.yaml`` (the root every preset inherits) and add a
field to the matching section class below; nothing else reads the schema.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from cxrlib.constants import (
    EXTRA_TASKS,
    LORA_TARGETS,
    REAL_SOURCES,
    TASK_GROUPS,
    TRAINABLE_PARTS,
)
from cxrlib.data.mixture import MIXTURES

PRESET_DIR = Path(__file__).parent / "presets"
PRESETS = ("smoke", "tiny", "paper")
DEFAULT_PRESET = "tiny"
CONFIG_FILENAME = "config.json"
YAML_SUFFIXES = (".yaml", ".yml")

# The learning-rate schedules that ``transformers.get_scheduler`` builds from the warmup and total
# steps alone (others, e.g. cosine_with_min_lr, need extra arguments the presets do not carry).
SCHEDULES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
# data.source: the phantom path, `paper` (every real source with a root), or real sources joined
# by "+" (cxrlib.data.sources).
DATA_SOURCES = ("iu_phantom", "paper", *REAL_SOURCES)
TASKS = tuple(t for group in TASK_GROUPS.values() for t in group) + tuple(EXTRA_TASKS)


class ConfigError(ValueError):
    """A preset name, override or saved config that cannot be used."""


# ---------------------------------------------------------------------------------------------
# The schema: one class per section. Strict* types refuse "10" for 10 and 1 for True; a float
# field accepts an int (1 for 1.0).
# ---------------------------------------------------------------------------------------------
PositiveInt = Annotated[StrictInt, Field(ge=1)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
PositiveFloat = Annotated[StrictFloat, Field(gt=0)]
NonNegativeFloat = Annotated[StrictFloat, Field(ge=0)]
Fraction = Annotated[StrictFloat, Field(ge=0, lt=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataRoots(_Section):
    """``data.roots``: each real dataset's root folder (null = not available)."""

    mimic_cxr: StrictStr | None
    ms_cxr: StrictStr | None
    nih: StrictStr | None
    chexpert: StrictStr | None
    rsna: StrictStr | None
    siim: StrictStr | None
    vindr: StrictStr | None
    chestx_det10: StrictStr | None
    covid19_radiography: StrictStr | None
    brax: StrictStr | None
    slake: StrictStr | None
    mimic_cxr_vqa: StrictStr | None
    medical_diff_vqa: StrictStr | None
    radialog: StrictStr | None
    chest_imagenome: StrictStr | None
    covid_qu_ex: StrictStr | None


assert set(DataRoots.model_fields) == set(REAL_SOURCES), "one data.roots key per real source"


class DataSection(_Section):
    source: StrictStr
    roots: DataRoots
    mimic_labels: Literal["chexpert", "negbio"]
    image_cache: StrictStr | None
    max_studies: PositiveInt | None
    render_size: Annotated[list[StrictInt], Field(min_length=2, max_length=2)]
    val_fraction: Fraction
    test_fraction: Fraction
    split_seed: StrictInt
    longitudinal_patients: NonNegativeInt
    max_images_per_study: PositiveInt
    samples_per_study: PositiveInt
    mixture: Any  # a name of MIXTURES or {task: weight >= 0}; checked below (one message)

    @field_validator("source")
    @classmethod
    def _known_source(cls, value):
        names = value.split("+")
        if value in ("iu_phantom", "paper"):
            return value
        unknown = [n for n in names if n not in REAL_SOURCES]
        if unknown:
            raise ValueError(
                f"unknown source(s) {unknown}; choose iu_phantom, paper, or names of "
                f"{', '.join(REAL_SOURCES)} joined by '+' (docs/datasets.md)"
            )
        return value

    @field_validator("mixture")
    @classmethod
    def _known_mixture(cls, value):
        choices = f"choose one of {', '.join(MIXTURES)} or give a dict of task weights"
        if isinstance(value, str):
            if value not in MIXTURES:
                raise ValueError(f"unknown mixture; {choices}")
        elif isinstance(value, dict):
            unknown = [t for t in value if t not in TASKS]
            if unknown:
                raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
            bad = {
                t: w
                for t, w in value.items()
                if isinstance(w, bool) or not isinstance(w, int | float) or w < 0
            }
            if bad:
                raise ValueError(f"task weights must be numbers >= 0, got {bad}")
        else:
            raise ValueError(f"not a mixture; {choices}")
        return value


class EncoderSection(_Section):
    hf_id: StrictStr | None
    image_size: PositiveInt
    patch_size: PositiveInt
    hidden_size: PositiveInt
    num_layers: PositiveInt
    num_heads: PositiveInt
    mlp_ratio: PositiveInt
    image_mean: Annotated[list[StrictFloat], Field(min_length=3, max_length=3)]
    image_std: Annotated[list[PositiveFloat], Field(min_length=3, max_length=3)]
    gradient_checkpointing: StrictBool = False


class ProjectorSection(_Section):
    depth: PositiveInt
    mlp_depth: PositiveInt
    hidden_size: PositiveInt
    num_queries: PositiveInt
    pos_emb: StrictBool


class LLMSection(_Section):
    hf_id: StrictStr | None
    vocab_size: PositiveInt
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    num_layers: PositiveInt
    num_heads: PositiveInt
    num_kv_heads: PositiveInt
    max_length: PositiveInt
    gradient_checkpointing: StrictBool = False


class LoRASection(_Section):
    r: PositiveInt
    alpha: PositiveFloat
    dropout: Fraction
    target_modules: Annotated[list[Literal[LORA_TARGETS]], Field(min_length=1)]


class TokenizerStage(_Section):
    min_frequency: PositiveInt


class _PretrainStage(_Section):
    steps: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    weight_decay: NonNegativeFloat
    warmup_steps: NonNegativeInt


class LMPretrainStage(_PretrainStage):
    seq_len: PositiveInt
    box_texts: NonNegativeInt
    text_instructions: NonNegativeInt = 0
    image_words: Literal["facts", "none"] = "facts"
    instruction_packing: Literal["cut", "whole"] = "cut"
    report_corpus: Literal["plain", "findings_then_report"] = "plain"
    abnormal_repeats: PositiveInt = 1
    rare_finding_power: NonNegativeFloat = 0.0  # conversations.rare_finding_repeats
    text_instruction_weights: dict[str, NonNegativeFloat] | None = None


class EncoderPretrainStage(_PretrainStage):
    mask_ratio: float = Field(0.4, gt=0, lt=1)  # share of patches hidden (masked-patch loss)
    label_weight: NonNegativeFloat = 0.5  # weight of the 13-finding head next to that loss
    # Masked-patch targets: "patch" standardises each patch (MAE's default: texture and edges
    # only); "image" keeps each patch's brightness, which is what an opacity or effusion changes.
    target_norm: Literal["patch", "image"] = "patch"


class _PhaseStage(_Section):
    steps: PositiveInt
    global_batch: PositiveInt
    micro_batch: PositiveInt
    lr: PositiveFloat
    weight_decay: NonNegativeFloat
    warmup_steps: NonNegativeInt
    schedule: Literal[SCHEDULES]
    grad_clip: PositiveFloat | None
    trainable: Annotated[list[Literal[TRAINABLE_PARTS]], Field(min_length=1)]


class Phase1Stage(_PhaseStage):
    # word-embedding alignment of the projector before the report pairs (tiny; 0 = off)
    align_steps: NonNegativeInt = 0
    align_lr: PositiveFloat = 1.0e-3
    align_batch: PositiveInt = 64
    align_target: Literal["description", "checklist"] = (
        "description"  # phases.word_alignment_targets
    )


class Phase2Stage(_PhaseStage):
    val_per_task: PositiveInt
    abnormal_repeats: PositiveInt = 1
    boxed_repeats: PositiveInt = 1
    rare_finding_power: NonNegativeFloat = 0.0  # conversations.rare_finding_repeats
    lr_scale: dict[Literal[TRAINABLE_PARTS], PositiveFloat] = {}


class TrainSection(_Section):
    tokenizer: TokenizerStage
    lm_pretrain: LMPretrainStage
    encoder_pretrain: EncoderPretrainStage
    phase1: Phase1Stage
    phase2: Phase2Stage
    checkpoint_every: PositiveInt
    log_every: PositiveInt


class InferenceSection(_Section):
    max_new_tokens: PositiveInt
    batch_size: PositiveInt


class EvalSection(_Section):
    bootstrap_samples: NonNegativeInt  # 0 = no confidence intervals
    max_test_studies: PositiveInt | None


class AblationSection(_Section):
    """``ablation``: notebook 08's arms (short phase-2 runs from the shared phase 1)."""

    steps: PositiveInt  # phase-2 steps of every arm (the same budget each)
    questions_per_task: PositiveInt  # grounding / naming / VQA test questions per task
    projector_tokens: list[PositiveInt] = []  # the default sweep's projector arms (own phase 1)


class PresetSchema(_Section):
    """A resolved preset: every key every preset must have, with its type and allowed values."""

    name: StrictStr
    seed: StrictInt
    data: DataSection
    encoder: EncoderSection
    projector: ProjectorSection
    llm: LLMSection
    lora: LoRASection
    train: TrainSection
    inference: InferenceSection
    eval: EvalSection
    ablation: AblationSection | None = None  # absent in configs saved before notebook 08


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _deep_merge(base: dict, override: dict) -> dict:
    """Return ``base`` updated by ``override`` (unknown keys are left for the schema to name)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_overrides(base: dict, override: dict) -> dict:
    """Nested overrides ``override`` applied on ``base`` (a copy; e.g. OVERRIDES plus an arm's)."""
    return _deep_merge(base, override)


def is_preset_file(name: str | Path) -> bool:
    """True when ``name`` is meant as the path of a YAML file rather than a built-in preset."""
    return isinstance(name, Path) or str(name).endswith(YAML_SUFFIXES)


def _builtin_choices() -> str:
    return (
        f"choose one of {', '.join(PRESETS)} (built-in), or give the path of a YAML file that "
        "inherits one (e.g. `inherits: tiny`)"
    )


def _read_yaml(name: str | Path, base_dir: Path | None = None) -> tuple[dict, Path]:
    """The raw mapping of a built-in preset or a user's YAML file, and the path it came from."""
    if is_preset_file(name):
        path = Path(name)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise ConfigError(f"preset file '{name}' does not exist: {_builtin_choices()}")
    else:
        path = PRESET_DIR / f"{name}.yaml"
        if name not in PRESETS or not path.exists():
            raise ConfigError(f"unknown preset '{name}': {_builtin_choices()}")
    with open(path) as f:
        raw = yaml.safe_load(f)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a YAML mapping (key: value lines), got {raw!r}")
    if is_preset_file(name):
        raw.setdefault("name", path.stem)
    return raw, path.resolve()


def _resolve(name: str | Path, base_dir: Path | None = None, seen: tuple = ()) -> dict:
    """Follow ``inherits`` (built-in names or paths relative to the inheriting file)."""
    raw, path = _read_yaml(name, base_dir)
    if path in seen:
        raise ConfigError(f"presets inherit in a circle: {' -> '.join(map(str, seen + (path,)))}")
    parent = raw.pop("inherits", None)
    if parent is None:
        return raw
    return _deep_merge(_resolve(parent, path.parent, seen + (path,)), raw)


def with_defaults(section: dict, schema: type[BaseModel]) -> dict:
    """``section`` with every key it omits set to ``schema``'s default (the one home of those
    defaults: ``load_preset`` validates the presets but keeps only the keys they spell out)."""
    defaults = {k: f.default for k, f in schema.model_fields.items() if not f.is_required()}
    return {**defaults, **section}


def load_preset(name: str | Path = DEFAULT_PRESET, overrides: dict | None = None) -> dict[str, Any]:
    """Resolve a preset (following ``inherits``), apply ``overrides`` and validate the result.

    Args:
        name: ``smoke``, ``tiny``, ``paper``, or the path of a YAML file (``*.yaml``/``*.yml``)
            that inherits one of them.
        overrides: nested dict of values to change, e.g. ``{"train": {"phase2": {"steps": 10}}}``.

    Returns:
        The fully resolved configuration as a nested dict.

    Raises:
        ConfigError: unknown preset, unknown key, wrong type or a value outside the allowed
            choices (every problem listed, each with its key and value).
    """
    cfg = _resolve(name)
    if overrides:
        cfg = _deep_merge(cfg, overrides)
    validate(cfg, where=f"preset '{name}'" + (" with overrides" if overrides else ""))
    return cfg


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class of the section at ``loc`` (None past the sections)."""
    model = PresetSchema
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        sub = field.annotation if field else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return None
        model = sub
    return model


_TYPE_NAMES = {
    "integer": "an integer",
    "number": "a number",
    "string": "text",
    "boolean": "true or false",
    "null": "null",
    "object": "a mapping",
}


def _schema_at(loc: tuple) -> dict | None:
    """The JSON schema of the value at ``loc`` (for "expected ..." hints)."""
    root = PresetSchema.model_json_schema()
    node = root
    for part in loc:
        if "$ref" in node:
            node = root["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        if isinstance(part, int):
            node = node.get("items")
        else:
            node = node.get("properties", {}).get(part)
        if node is None:
            return None
    if "$ref" in node:
        node = root["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _expected(schema: dict) -> str:
    """``{"type": "integer", "minimum": 1}`` -> ``an integer >= 1``."""
    if "anyOf" in schema:
        return " or ".join(_expected(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        items = schema.get("items", {})
        count = ""
        if "minItems" in schema and schema.get("minItems") == schema.get("maxItems"):
            count = f" of {schema['minItems']}"
        return f"a list{count}, each {_expected(items)}" if items else f"a list{count}"
    if "enum" in schema:
        return "one of " + ", ".join(map(str, schema["enum"]))
    text = _TYPE_NAMES.get(schema.get("type"), "a value")
    for key, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<=")):
        if key in schema:
            text += f" {op} {schema[key]}"
    if "exclusiveMaximum" in schema:
        text += f"{' and' if text.count(' ') > 1 else ''} < {schema['exclusiveMaximum']}"
    return text


def _describe(error: dict) -> str:
    """One line per pydantic error: the key, the value, what is allowed."""
    loc, kind, value = error["loc"], error["type"], error.get("input")
    path = _dotted(loc)
    if kind == "extra_forbidden":
        section = _section_at(loc[:-1])
        known = list(section.model_fields) if section else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return (
            f"unknown config key '{path}' = {value!r}{hint} (known keys here: {', '.join(known)})"
        )
    schema = _schema_at(loc)
    expected = f" (expected {_expected(schema)})" if schema and not kind.startswith("value") else ""
    if kind == "missing":
        return f"{path}: missing; every preset needs it{expected}"
    if kind == "literal_error":
        return f"{path} = {value!r}: not allowed; choose one of {error['ctx']['expected']}"
    msg = error["msg"].removeprefix("Value error, ")
    if kind == "float_type" and isinstance(value, str):
        msg += "; YAML reads 1e-4 as text: write 1.0e-4"
    return f"{path} = {value!r}: {msg}{expected}"


def validate(cfg: dict, where: str = "config") -> None:
    """Check ``cfg`` against ``PresetSchema``, then the constraints between sections.

    Raises ``ConfigError`` listing every problem; ``cfg`` itself is never changed.
    """
    try:
        PresetSchema.model_validate(cfg)
    except ValidationError as err:
        problems = "\n".join(f"  - {_describe(e)}" for e in err.errors())
        raise ConfigError(f"invalid {where}:\n{problems}") from None
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


def parse_overrides(items: Sequence[str]) -> dict:
    """``["train.phase1.steps=10", ...]`` -> ``{"train": {"phase1": {"steps": 10}}}`` (YAML values)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got '{item}'")
        key, value = item.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out
