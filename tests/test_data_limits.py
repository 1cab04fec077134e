"""Settings the data layer used to cap or drop silently (issue 11, item 3): each is now an error
or a warning that says what happened and how many."""

import warnings

import numpy as np
import pytest
from conftest import example_study, phantom_image

from cxrlib.config import load_preset
from cxrlib.data.datasets import ConversationDataset, build_datasets
from cxrlib.data.mixture import MixtureError, mixture_weights
from cxrlib.inference import generate_reports


def test_more_images_than_the_phantom_draws_is_an_error(tmp_path):
    """``max_images_per_study: 5`` used to become 2 without a word."""
    cfg = load_preset("smoke", {"data": {"max_images_per_study": 5}})
    with pytest.raises(ValueError, match="at most 2 images per study"):
        build_datasets(cfg, tmp_path / "data", workers=1)


def test_a_task_asked_for_by_name_without_data_is_an_error():
    """A dict of task weights used to drop a task it could not build with only a warning."""
    sizes = {"cot_single": 10, "vqa": 5, "cot_multi_study": 0}
    with pytest.raises(MixtureError, match="cot_multi_study of the given weights have no data"):
        mixture_weights({"cot_single": 1.0, "cot_multi_study": 1.0}, sizes)
    study = dict(example_study(with_prior=False), split="train")
    cfg = load_preset("smoke")
    with pytest.raises(MixtureError, match="cot_multi_study"):
        ConversationDataset([study], None, None, cfg, tasks=["cot_single", "cot_multi_study"])
    # a named mixture still renormalises over what exists, with its warning
    with pytest.warns(UserWarning, match="no data for .*cot_multi_study"):
        mixture_weights("paper", dict.fromkeys(["cot_single", "vqa"], 3) | {"cot_multi_study": 0})


def test_a_sixth_image_is_reported():
    """Report conversations use the first 5 images; a study with more used to lose them silently."""
    study = dict(example_study(with_prior=False), split="train")
    frontal = study["images"][0]
    study["images"] = [dict(frontal, index=k) for k in range(6)]
    with pytest.warns(UserWarning, match="1 studies have more than 5 images.*1 images left out"):
        ConversationDataset([study], np.zeros((6, 8, 8), np.uint8), None, load_preset("smoke"),
                            tasks=["cot_multi_image"])  # fmt: skip


class _EchoBackend:
    name = "echo"

    def answer(self, chats, max_new_tokens):
        return [["Not found.", "report."] for _ in chats]


def test_studies_without_images_are_counted_in_report_generation():
    """A study without images used to vanish from the evaluated set without a count."""
    with_images = example_study(with_prior=False)
    without = dict(example_study(with_prior=False), study_id="EMPTY", images=[])
    images = np.stack([phantom_image(0), phantom_image(1)])
    with pytest.warns(UserWarning, match="1 of 2 studies have no images.*EMPTY"):
        records = generate_reports(_EchoBackend(), [with_images, without], images, mode="single",
                                   max_new_tokens=4, progress=False)  # fmt: skip
    assert {r["study_id"] for r in records} == {"EX1"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say when every study has images
        generate_reports(_EchoBackend(), [with_images], images, "single", max_new_tokens=4,
                         progress=False)  # fmt: skip
