"""Boxes as text: the 0-100 short-side convention, round trips, malformed strings, IoU."""

import numpy as np
import pytest

from cxrlib.data.boxes import (
    BoxParseError,
    box_iou,
    format_box,
    format_boxes,
    from_relative,
    is_visible,
    parse_box,
    parse_boxes,
    to_relative,
)


def test_square_image_is_plain_percent():
    assert to_relative([0, 0, 100, 50], (200, 200)) == [0, 0, 50, 25]


def test_tall_image_shifts_the_long_axis_by_half_the_excess():
    # (H, W) = (144, 128): the center crop drops 8 rows at the top and bottom.
    assert to_relative([0, 8, 128, 136], (144, 128)) == [0, 0, 100, 100]
    assert to_relative([0, 0, 64, 4], (144, 128)) == [0, 0, 50, 0]  # above the crop: clipped


def test_wide_image_shifts_x():
    assert to_relative([50, 0, 150, 100], (100, 200)) == [0, 0, 100, 100]


def test_matches_a_resize_and_center_crop_of_the_pixels():
    """Paint a box, resize the short side to S and center-crop like the ImageProcessor does."""
    h, w, size = 144, 128, 56
    box = [30, 50, 90, 110]
    img = np.zeros((h, w), np.uint8)
    img[box[1] : box[3], box[0] : box[2]] = 255
    new_h = round(h * size / w)  # shortest-edge resize (nearest neighbour is enough here)
    rows = (np.arange(new_h) * h / new_h).astype(int)
    cols = (np.arange(size) * w / size).astype(int)
    resized = img[rows][:, cols]
    top = (new_h - size) // 2
    crop = resized[top : top + size]
    ys, xs = np.nonzero(crop)
    seen = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    rel = to_relative(box, (h, w))
    assert np.allclose(np.array(rel) * size / 100, seen, atol=1.5)


@pytest.mark.parametrize("hw", [(144, 128), (128, 144), (100, 100), (582, 518)])
def test_round_trip_pixels_relative_pixels(hw):
    rng = np.random.default_rng(0)
    side = min(hw)
    for _ in range(50):
        rel = sorted(rng.integers(0, 101, 2).tolist())
        rel2 = sorted(rng.integers(0, 101, 2).tolist())
        box = [rel[0], rel2[0], rel[1], rel2[1]]
        px = from_relative(box, hw)
        assert to_relative(px, hw) == box
        assert all(
            abs(a - b) <= side / 100 for a, b in zip(from_relative(to_relative(px, hw), hw), px)
        )


def test_format_and_parse_round_trip():
    boxes = [[8, 9, 47, 72], [0, 0, 100, 100]]
    text = format_boxes(boxes)
    assert text == "[8,9,47,72], [0,0,100,100]"
    assert parse_boxes(text) == boxes
    assert parse_box(format_box(boxes[0])) == boxes[0]
    assert parse_boxes("Yes. [1,2,3,4].") == [[1, 2, 3, 4]]
    assert parse_boxes("cardiomegaly [1,2,3,4], [5,6,7,8], edema [0,0,9,9].") == [
        [1, 2, 3, 4],
        [5, 6, 7, 8],
        [0, 0, 9, 9],
    ]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("[1,2,3]", "4 comma-separated"),
        ("[1,2,3,4,5]", "4 comma-separated"),
        ("[1,2,300,4]", "0-100"),
        ("[-1,2,3,4]", "0-100"),
        ("[50,2,30,4]", "x2 < x1"),
        ("[1,50,3,4]", "y2 < y1"),
        ("[a,b,c,d]", "integers"),
        ("[1.5,2,3,4]", "integers"),
        ("no box here", "no '\\[x1"),
        ("", "no '\\[x1"),
    ],
)
def test_malformed_text_raises_a_clear_error(text, problem):
    with pytest.raises(BoxParseError, match=problem):
        parse_boxes(text)


def test_parse_box_needs_exactly_one():
    with pytest.raises(BoxParseError, match="exactly one"):
        parse_box("[1,2,3,4], [5,6,7,8]")


def test_lenient_parsing_skips_garbage():
    assert parse_boxes("[1,2,3,4], [9,9,1,1], [x]", strict=False) == [[1, 2, 3, 4]]
    assert parse_boxes("nothing", strict=False) == []


def test_format_rejects_unconverted_boxes():
    with pytest.raises(ValueError, match="outside 0-100"):
        format_box([0, 0, 120, 50])
    with pytest.raises(ValueError, match="4 integers"):
        format_box([0.5, 0, 10, 10])
    with pytest.raises(ValueError, match="height, width"):
        to_relative([0, 0, 1, 1], (0, 10))


def test_iou():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [10, 10, 20, 20]) == 0.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    assert box_iou([5, 5, 5, 5], [5, 5, 5, 5]) == 0.0  # degenerate, no division error


def test_visibility():
    assert is_visible([0, 0, 1, 1]) and not is_visible([0, 0, 100, 0])
