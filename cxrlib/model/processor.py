"""Image preprocessing: the one place a grayscale X-ray becomes the encoder's input tensor.

Training and inference both call ``ImageProcessor``; the geometry (shortest-edge resize to
``encoder.image_size``, then a center crop of that size) is the one ``cxrlib.data.boxes`` assumes
when it turns pixel boxes into the card's 0-100 boxes.

    >>> proc = ImageProcessor(cfg)
    >>> pixel_values = proc([image_a, image_b])   # uint8 (H, W) arrays -> (2, 3, S, S) float32

``paper`` uses Rad-DINO's own processor from the local Hugging Face cache (a transformers
``BitImageProcessor``: bicubic shortest-edge resize to 518, center crop 518, Rad-DINO's mean and
std). ``smoke``/``tiny`` build the same ``BitImageProcessor`` class from the preset, so the small
model sees images prepared exactly like the paper's, only smaller.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoImageProcessor, BitImageProcessor

from cxrlib.tokenizer import MissingWeightsError, missing_weights_message

BICUBIC = 3  # PIL.Image.BICUBIC, the resampling Rad-DINO's processor config names


class ImageError(ValueError):
    """An input image the model cannot take (wrong type, dtype or shape)."""


def check_image(image: np.ndarray, where: str = "image") -> np.ndarray:
    """Raise ``ImageError`` unless ``image`` is a 2-D uint8 array (a grayscale X-ray)."""
    if isinstance(image, torch.Tensor):
        image = image.numpy()
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{where} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageError(
            f"{where} has dtype {image.dtype}; expected uint8 grayscale (H, W). "
            "Convert with np.clip(img, 0, 255).astype(np.uint8)."
        )
    if image.ndim != 2:
        raise ImageError(
            f"{where} has shape {image.shape}; expected a grayscale (H, W) array "
            "(for an RGB array take one channel, e.g. img[..., 0])."
        )
    if min(image.shape) < 2:
        raise ImageError(f"{where} has shape {image.shape}; both sides must be at least 2 pixels")
    return image


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W) uint8 -> (3, H, W) uint8 tensor; read-only arrays (memmapped datasets) are copied
    first, because torch cannot share memory it is not allowed to write."""
    if not image.flags.writeable:
        image = image.copy()
    return torch.from_numpy(image).unsqueeze(0).expand(3, -1, -1)


def build_hf_processor(cfg: dict) -> BitImageProcessor:
    """The Hugging Face processor for a preset: Rad-DINO's (``paper``) or one built from ``cfg``."""
    enc = cfg["encoder"]
    if enc["hf_id"]:
        try:
            proc = AutoImageProcessor.from_pretrained(enc["hf_id"], local_files_only=True)
        except OSError as err:
            raise MissingWeightsError(missing_weights_message(enc["hf_id"])) from err
        crop = proc.crop_size["height"] if getattr(proc, "crop_size", None) else None
        if crop is not None and crop != enc["image_size"]:
            raise ValueError(
                f"{enc['hf_id']}'s processor crops to {crop} px but encoder.image_size is "
                f"{enc['image_size']}; set encoder.image_size: {crop} in the preset"
            )
        return proc
    size = enc["image_size"]
    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": size},
        resample=BICUBIC,
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(enc["image_mean"]),
        image_std=list(enc["image_std"]),
        do_convert_rgb=True,
    )


class ImageProcessor:
    """Grayscale uint8 ``(H, W)`` images -> normalised ``(N, 3, S, S)`` float tensors.

    Args:
        cfg: a resolved preset (``cxrlib.config.load_preset``); reads ``cfg["encoder"]``.
    """

    def __init__(self, cfg: dict):
        self.image_size = int(cfg["encoder"]["image_size"])
        self.hf = build_hf_processor(cfg)

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Preprocess a list of images.

        Args:
            images: grayscale uint8 arrays of shape (H, W); sizes may differ.

        Returns:
            FloatTensor (N, 3, S, S) with S = ``encoder.image_size``.
        """
        if isinstance(images, np.ndarray) and images.ndim == 2:
            images = [images]
        if len(images) == 0:
            raise ImageError("ImageProcessor got an empty list of images")
        # Gray -> 3 identical channels, channels first, so the HF processor never has to guess
        # the layout (an (H, 3) image would be ambiguous).
        tensors = [_to_tensor(check_image(img, f"image {i}")) for i, img in enumerate(images)]
        out = self.hf(images=tensors, return_tensors="pt", input_data_format="channels_first")
        return out["pixel_values"].float()

    def __repr__(self) -> str:
        return f"ImageProcessor(image_size={self.image_size}, hf={type(self.hf).__name__})"
