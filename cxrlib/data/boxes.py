"""Bounding boxes as text: the card's 0-100 convention, a strict parser and IoU.

M4CXR writes a box as ``[x1,y1,x2,y2]``: four integers in 0-100, no spaces, several boxes joined
by ``", "``. The numbers are relative to what the model SEES, not to the stored image:

1. the image ``(H, W)`` is resized so that its SHORT side equals ``encoder.image_size``
   (shortest-edge resize, aspect ratio kept);
2. the centre square of side ``encoder.image_size`` is cropped out (center crop).

So one unit is 1/100 of the short side, whatever ``encoder.image_size`` is, and the long axis
loses ``(long - short) / 2`` pixels at each end. In original-pixel terms (``s = min(H, W)``)::

    x_rel = 100 * (x_px - (W - s) / 2) / s        y_rel = 100 * (y_px - (H - s) / 2) / s

then rounded to integers and clipped to [0, 100]. The shift is zero on the short axis. This is
exactly what ``cxrlib.model.ImageProcessor`` does to the pixels (shortest-edge resize, then center
crop), so a box drawn in the processor's output at ``x_rel * image_size / 100`` lands on the same
anatomy. Part of a box outside the crop is clipped; a box entirely outside becomes degenerate
(zero width or height): ``is_visible`` tells, and the conversation builders skip such boxes.

    >>> to_relative([10, 20, 60, 100], image_hw=(144, 128))
    [8, 9, 47, 72]
    >>> format_boxes([[8, 9, 47, 72], [50, 50, 90, 95]])
    '[8,9,47,72], [50,50,90,95]'
    >>> parse_boxes("[8,9,47,72], [50,50,90,95]")
    [[8, 9, 47, 72], [50, 50, 90, 95]]

Introduced in notebook 01; the grounding metrics (``cxrlib.metrics``) use ``parse_boxes`` and
``box_iou``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

SCALE = 100  # boxes live in [0, SCALE] x [0, SCALE]
MIN_VISIBLE_SIDE = 1  # a relative box thinner than this (after clipping) is not worth asking about

_BOX_RE = re.compile(r"\[\s*([^\[\]]*?)\s*\]")
_INT_RE = re.compile(r"^[+-]?\d+$")


class BoxParseError(ValueError):
    """Text that is not a box (or a list of boxes) in the ``[x1,y1,x2,y2]`` 0-100 convention."""


def _check_image_hw(image_hw: Sequence[int]) -> tuple[int, int]:
    if len(image_hw) != 2 or min(image_hw) <= 0:
        raise ValueError(f"image_hw must be (height, width) with positive sides, got {image_hw}")
    return int(image_hw[0]), int(image_hw[1])


def _check_box(box: Sequence[float], what: str = "box") -> None:
    if len(box) != 4:
        raise ValueError(f"{what} must have 4 numbers [x1, y1, x2, y2], got {list(box)}")
    if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"{what} {list(box)} has x2 < x1 or y2 < y1; expected [x1, y1, x2, y2]")


def crop_offsets(image_hw: Sequence[int]) -> tuple[float, float, int]:
    """Where the center crop starts in original pixels: ``(x0, y0, side)``."""
    h, w = _check_image_hw(image_hw)
    side = min(h, w)
    return (w - side) / 2, (h - side) / 2, side


def to_relative(box_px: Sequence[float], image_hw: Sequence[int]) -> list[int]:
    """Convert a pixel box of an ``(H, W)`` image to the card's integer 0-100 box.

    Args:
        box_px: ``[x1, y1, x2, y2]`` in the stored image's pixels (x = column, y = row).
        image_hw: ``(height, width)`` of the stored image.

    Returns:
        ``[x1, y1, x2, y2]`` integers in 0-100 relative to the short side after the shortest-edge
        resize and center crop (long axis shifted by half the excess, then clipped).
    """
    _check_box(box_px, "box_px")
    x0, y0, side = crop_offsets(image_hw)
    offsets = (x0, y0, x0, y0)
    # Round half up (not Python's banker's rounding) so 12.5 -> 13 on every platform.
    rel = [math.floor(SCALE * (v - o) / side + 0.5) for v, o in zip(box_px, offsets)]
    return [min(SCALE, max(0, int(v))) for v in rel]


def from_relative(box_rel: Sequence[float], image_hw: Sequence[int]) -> list[float]:
    """Inverse of ``to_relative``: a 0-100 box back to the stored image's pixels.

    Args:
        box_rel: ``[x1, y1, x2, y2]`` in 0-100.
        image_hw: ``(height, width)`` of the stored image.

    Returns:
        Pixel ``[x1, y1, x2, y2]`` (floats) inside the center-cropped square of the image.
    """
    _check_box(box_rel, "box_rel")
    x0, y0, side = crop_offsets(image_hw)
    offsets = (x0, y0, x0, y0)
    return [float(v) * side / SCALE + o for v, o in zip(box_rel, offsets)]


def is_visible(box_rel: Sequence[int], min_side: int = MIN_VISIBLE_SIDE) -> bool:
    """True if a relative box keeps at least ``min_side`` units of width and height."""
    return box_rel[2] - box_rel[0] >= min_side and box_rel[3] - box_rel[1] >= min_side


def format_box(box_rel: Sequence[int]) -> str:
    """``[x1,y1,x2,y2]`` with no spaces; validates range and order first."""
    box = [int(v) for v in box_rel]
    if len(box) != 4 or any(v != float(r) for v, r in zip(box, box_rel)):
        raise ValueError(f"a box must be 4 integers, got {list(box_rel)}; use to_relative first")
    if any(v < 0 or v > SCALE for v in box):
        raise ValueError(f"box {box} has values outside 0-{SCALE}; use to_relative first")
    _check_box(box)
    return "[" + ",".join(str(v) for v in box) + "]"


def format_boxes(boxes: Sequence[Sequence[int]]) -> str:
    """Several boxes joined by ``", "`` (the card's multi-box answer)."""
    if not boxes:
        raise ValueError("format_boxes needs at least one box")
    return ", ".join(format_box(b) for b in boxes)


def parse_box(text: str) -> list[int]:
    """Parse exactly one ``[x1,y1,x2,y2]`` box (surrounding spaces allowed).

    Raises:
        BoxParseError: not exactly one well-formed box.
    """
    boxes = parse_boxes(text)
    if len(boxes) != 1:
        raise BoxParseError(f"expected exactly one box, found {len(boxes)} in {text!r}")
    return boxes[0]


def parse_boxes(text: str, strict: bool = True) -> list[list[int]]:
    """Parse the boxes in ``text``: a ``", "``-joined list, or boxes embedded in an answer.

    Args:
        text: e.g. ``"[1,2,30,40], [5,6,7,8]"`` or ``"Yes. [1,2,30,40]."``.
        strict: if True the text must contain at least one box and every bracketed group must be
            a valid box; if False malformed groups are skipped (what a grader wants: a model's
            garbage answer then yields ``[]`` instead of an exception).

    Returns:
        The boxes as lists of 4 ints, in order of appearance.

    Raises:
        BoxParseError: (strict only) no box, a group without 4 integers, a value outside 0-100,
            or x2 < x1 / y2 < y1.
    """
    if not isinstance(text, str):
        raise BoxParseError(f"expected box text, got {type(text).__name__}")
    boxes = []
    groups = _BOX_RE.findall(text)
    if strict and not groups:
        raise BoxParseError(f"no '[x1,y1,x2,y2]' box found in {text!r}")
    for group in groups:
        try:
            boxes.append(_parse_group(group))
        except BoxParseError:
            if strict:
                raise
    return boxes


def _parse_group(group: str) -> list[int]:
    parts = [p.strip() for p in group.split(",")]
    if len(parts) != 4:
        raise BoxParseError(f"a box needs 4 comma-separated integers, got [{group}]")
    if not all(_INT_RE.match(p) for p in parts):
        raise BoxParseError(f"box values must be integers, got [{group}]")
    box = [int(p) for p in parts]
    if any(v < 0 or v > SCALE for v in box):
        raise BoxParseError(f"box values must lie in 0-{SCALE}, got {box}")
    if box[2] < box[0] or box[3] < box[1]:
        raise BoxParseError(f"box {box} has x2 < x1 or y2 < y1")
    return box


def box_area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes (any common unit, e.g. 0-100).

    Two degenerate boxes (zero area) give 0.0, never a division error.
    """
    inter = box_area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0
