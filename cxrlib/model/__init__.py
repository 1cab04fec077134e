"""The M4CXR model: Rad-DINO-style encoder, C-Abstractor, Mistral with LoRA (notebooks 02-05).

    >>> from cxrlib.model import ImageProcessor, build_model, set_trainable, save_trained
    >>> model = build_model(cfg, tokenizer, backbones_dir=out / "backbones")
    >>> set_trainable(model, cfg["train"]["phase1"]["trainable"])   # ["projector"]
    >>> pixel_values = ImageProcessor(cfg)([image])                  # (1, 3, S, S)

Files: ``processor.py`` (images), ``projector.py`` (C-Abstractor), ``m4cxr.py`` (splicing,
forward, cached greedy generation), ``build.py`` (builders, LoRA, trainable sets), ``io.py``
(save/load what was trained).
"""

from cxrlib.model.build import (
    PARTS,
    add_lora,
    build_encoder,
    build_llm,
    build_model,
    count_parameters,
    enable_gradient_checkpointing,
    encoder_config,
    has_lora,
    llm_config,
    set_trainable,
    upcast_trainable,
)
from cxrlib.model.io import load_trained, load_trained_weights, save_trained
from cxrlib.model.m4cxr import (
    M4CXR,
    GenerationResult,
    ImageTokenError,
    SequenceTooLongError,
    positions_from_mask,
)
from cxrlib.model.processor import (
    DegenerateImageError,
    ImageContentWarning,
    ImageError,
    ImageProcessor,
    check_image,
    check_image_content,
    load_image,
    to_uint8,
)
from cxrlib.model.projector import CAbstractor

__all__ = [
    "PARTS",
    "CAbstractor",
    "DegenerateImageError",
    "ImageContentWarning",
    "GenerationResult",
    "ImageError",
    "ImageProcessor",
    "ImageTokenError",
    "M4CXR",
    "SequenceTooLongError",
    "add_lora",
    "build_encoder",
    "build_llm",
    "build_model",
    "check_image",
    "check_image_content",
    "count_parameters",
    "enable_gradient_checkpointing",
    "encoder_config",
    "has_lora",
    "llm_config",
    "load_image",
    "load_trained",
    "load_trained_weights",
    "positions_from_mask",
    "save_trained",
    "set_trainable",
    "to_uint8",
    "upcast_trainable",
]
