"""Every conversation format with the card's exact strings, on a hand-written study record."""

import copy

import numpy as np
import pytest
from conftest import example_study

from cxrlib.constants import IMAGE_TOKEN, TASK_GROUPS
from cxrlib.data.boxes import parse_boxes
from cxrlib.data.conversations import (
    ALL_TASKS,
    ConversationError,
    build_conversation,
    cot_answer,
    find_phrase,
    report_user_turns,
    supported_tasks,
)

FINDINGS = (
    "enlarged cardiomediastinum, cardiomegaly, lung opacity, lung lesion, edema, consolidation, "
    "pneumonia, atelectasis, pneumothorax, pleural effusion, pleural other, fracture, support devices"
)
REPORT = (
    "The heart is mildly enlarged. There is a moderate left pleural effusion. "
    "Possible right basilar atelectasis. No pneumothorax."
)
# example_study boxes on a (144, 128) image -> 0-100 space (8 rows cropped top and bottom)
CARDIO, EFFUSION = "[27,45,82,86]", "[55,68,94,99]"


def build_all(task, study=None, n=40):
    study = study or example_study()
    convs = [build_conversation(task, study, np.random.default_rng(s)) for s in range(n)]
    assert all(c is not None for c in convs)
    return convs


def first_user(c):
    return c["turns"][0]["user"]


def check_images(conv):
    text = " ".join(t["user"] for t in conv["turns"])
    assert text.count(IMAGE_TOKEN) == len(conv["images"])
    assert not any(IMAGE_TOKEN in t["assistant"] for t in conv["turns"])


def test_cot_answer():
    labels = {"Cardiomegaly": 1, "Edema": -1, "Pleural Effusion": 1, "Pneumonia": 0}
    assert cot_answer(labels) == "cardiomegaly, pleural effusion."
    assert cot_answer({"Edema": -1, "Atelectasis": 0, "Fracture": None}) == "Not found."


def test_cot_single():
    conv = build_all("cot_single")[0]
    assert [t["user"] for t in conv["turns"]] == [
        f"radiology image: <image> Which of the following findings are present in the radiology "
        f"image? Findings: {FINDINGS}",
        "Based on the previous conversation, provide a description of the findings in the "
        "radiology image.",
    ]
    assert [t["assistant"] for t in conv["turns"]] == ["cardiomegaly, pleural effusion.", REPORT]
    assert conv["images"] in ([0], [1])


def test_cot_multi_image():
    conv = build_all("cot_multi_image")[0]
    assert first_user(conv) == (
        "radiology images: <image> <image> Which of the following findings are present in the "
        f"radiology images? Findings: {FINDINGS}"
    )
    assert conv["turns"][1]["user"] == (
        "Based on the previous conversation, provide a description of the findings in the "
        "radiology images."
    )
    assert conv["images"] == [0, 1]


def test_cot_multi_study():
    conv = build_all("cot_multi_study")[0]
    assert first_user(conv) == (
        "prior radiology images: <image> <image>, prior radiology report: The heart is mildly "
        "enlarged. Lungs are clear. follow-up images: <image> <image>, The radiology studies are "
        "given in chronological order. Which of the following findings are present in the current "
        f"follow-up radiology images? Findings: {FINDINGS}"
    )
    assert conv["turns"][1]["user"] == (
        "Based on the previous conversation, provide a description of the findings in the "
        "current follow-up radiology images."
    )
    assert conv["images"] == [2, 3, 0, 1]  # prior first, in placeholder order
    assert conv["turns"][1]["assistant"] == REPORT


def test_direct_and_report_only():
    conv = build_all("direct_report")[0]
    assert conv["turns"] == [
        {
            "user": "radiology image: <image> Provide a description of the "
            "findings in the radiology image.",
            "assistant": REPORT,
        }
    ]
    conv = build_all("report_only")[0]
    assert conv["turns"] == [{"user": "<image>", "assistant": REPORT}]


def test_single_disease_answers():
    convs = build_all("single_disease", n=200)
    answers = {c["turns"][0]["assistant"] for c in convs}
    assert answers == {"Yes.", "No.", "Uncertain."}
    for c in convs:
        f = c["meta"]["finding"]
        assert first_user(c) == f"radiology image: <image> Is {f} present in the radiology image?"
        expected = {"cardiomegaly": "Yes.", "pleural effusion": "Yes.", "atelectasis": "Uncertain."}
        assert c["turns"][0]["assistant"] == expected.get(f, "No.")


def test_multi_label_is_the_cot_first_turn():
    conv = build_all("multi_label")[0]
    cot = build_all("cot_single")[0]
    assert conv["turns"] == cot["turns"][:1]


def test_finding_grounding():
    convs = build_all("finding_grounding", n=100)
    answers = {c["turns"][0]["assistant"] for c in convs}
    assert {f"Yes. {CARDIO}.", f"Yes. {EFFUSION}.", "Not present."} == answers
    for c in convs:
        assert first_user(c) == (
            f"radiology image: <image> Is {c['meta']['finding']} present in the radiology image? "
            "If so, provide the bounding box coordinates of the region."
        )
        assert c["meta"]["finding"] != "atelectasis"  # uncertain: never asked
        assert c["images"] == [0]  # frontal only


def test_grounded_finding():
    for c in build_all("grounded_finding"):
        box = CARDIO if c["meta"]["finding"] == "cardiomegaly" else EFFUSION
        assert (
            first_user(c)
            == f"radiology image: <image> Provide a finding name for this region. {box}"
        )
        assert c["turns"][0]["assistant"] == c["meta"]["finding"]


def test_multi_finding_grounding():
    c = build_all("multi_finding_grounding")[0]
    assert first_user(c).startswith(
        "radiology image: <image> Which of the following findings are present in the radiology "
        "image? Provide the bounding box coordinates if present. Findings: "
    )
    assert c["turns"][0]["assistant"] == f"cardiomegaly {CARDIO}, pleural effusion {EFFUSION}."
    names = first_user(c).split("Findings: ")[1].split(", ")
    assert "cardiomegaly" in names and "atelectasis" not in names and len(names) >= 4


def test_multi_finding_grounding_not_found():
    study = example_study()
    for im in study["images"]:
        im["finding_boxes"] = []
    for c in build_all("multi_finding_grounding", study):
        assert c["turns"][0]["assistant"] == "Not found."


def test_abnormality_detection():
    c = build_all("abnormality_detection")[0]
    assert first_user(c) == (
        "radiology image: <image> Provide the bounding box coordinates of "
        "abnormal regions in the radiology image."
    )
    assert c["turns"][0]["assistant"] == f"{CARDIO}, {EFFUSION}."


def test_organ_tasks():
    for c in build_all("organ_grounding"):
        organ = c["meta"]["organ"]
        assert first_user(c) == (
            f"radiology image: <image> Provide the bounding box coordinates "
            f"of {organ} in the radiology image."
        )
        assert len(parse_boxes(c["turns"][0]["assistant"])) == 1
        assert not c["turns"][0]["assistant"].endswith(".")
    for c in build_all("grounded_organ"):
        assert first_user(c).startswith(
            "radiology image: <image> Provide an organ name for this region. ["
        )
        assert c["turns"][0]["assistant"] in ("left lung", "right lung", "heart")


def test_phrase_tasks():
    for c in build_all("phrase_grounding"):
        phrase = c["meta"]["phrase"]
        assert phrase in (
            "The heart is mildly enlarged",
            "There is a moderate left pleural effusion",
        )
        assert first_user(c) == (
            "radiology image: <image> Provide the bounding box coordinate of "
            f"the region this phrase describes: {phrase}"
        )
        assert c["turns"][0]["assistant"] in (f"{CARDIO}.", f"{EFFUSION}.")
    for c in build_all("grounded_phrase"):
        assert first_user(c) in (
            f"radiology image: <image> Provide a radiology report phrase for the region. {b}."
            for b in (CARDIO, EFFUSION)
        )
        assert c["turns"][0]["assistant"] == c["meta"]["phrase"] + "."


def test_find_phrase_skips_negations_and_prefers_the_side():
    text = "No pleural effusion on the right. Small left pleural effusion. Heart normal."
    assert find_phrase(text, {"observation": "Pleural Effusion", "side": "left"}) == (
        "Small left pleural effusion"
    )
    assert find_phrase("No pneumothorax.", {"observation": "Pneumothorax"}) is None
    text = "Small right apical pneumothorax measuring 2.5 cm. Heart normal."
    assert find_phrase(text, {"observation": "Pneumothorax", "side": "right"}) == (
        "Small right apical pneumothorax measuring 2.5 cm"
    )  # a decimal does not end a sentence


def test_vqa():
    convs = build_all("vqa", n=300)
    seen = {c["meta"]["question_type"] for c in convs}
    assert seen == {"presence", "location", "severity", "view", "abnormality_list"}
    expected = {
        "Where is the pleural effusion located?": "left lower zone",
        "What is the severity of the pleural effusion?": "moderate",
        "What is the severity of the cardiomegaly?": "mild",
        "What abnormalities are seen in this image?": "cardiomegaly, pleural effusion",
        "Is there evidence of cardiomegaly in this image?": "yes",
        "Is there evidence of pneumothorax in this image?": "no",
    }
    for c in convs:
        user, answer = first_user(c), c["turns"][0]["assistant"]
        assert user.startswith("radiology image: <image> Answer the question. ")
        question = user.split("Answer the question. ")[1]
        if question in expected:
            assert answer == expected[question]
        if c["meta"]["question_type"] == "view":
            assert answer == {0: "PA", 1: "lateral"}[c["images"][0]]
        assert c["meta"]["answer_type"] == ("closed" if answer in ("yes", "no") else "open")
        assert "atelectasis" not in question  # uncertain: never asked


def test_difference_vqa():
    convs = build_all("difference_vqa", n=100)
    expected = {
        "What has changed compared to the reference image?": "new pleural effusion",
        "How has the pleural effusion changed compared to the reference image?": "new",
        "How has the cardiomegaly changed compared to the reference image?": "unchanged",
        "Is there any new finding compared to the reference image?": "yes",
    }
    seen = set()
    for c in convs:
        prefix = (
            "reference: <image>, main: <image> Using the provided reference and main "
            "radiology images, answer the following question. "
        )
        assert first_user(c).startswith(prefix)
        question = first_user(c)[len(prefix) :]
        assert c["turns"][0]["assistant"] == expected[question]
        assert c["images"] == [2, 0]  # prior frontal, then current frontal
        seen.add(question)
    assert seen == set(expected)


def test_no_prior_means_no_multi_study_or_difference():
    study = example_study(with_prior=False)
    assert build_conversation("cot_multi_study", study, 0) is None
    assert build_conversation("difference_vqa", study, 0) is None
    no_prior = {"cot_multi_study", "direct_multi_study", "difference_vqa"}
    assert set(supported_tasks(study)) == set(ALL_TASKS) - no_prior


def test_no_frontal_means_no_grounding():
    study = example_study()
    study["images"] = [study["images"][1]]
    for task in TASK_GROUPS["localization"]:
        assert build_conversation(task, study, 0) is None
    assert build_conversation("cot_multi_image", study, 0) is None
    assert build_conversation("cot_single", study, 0) is not None


def test_every_task_places_images_and_is_deterministic():
    study = example_study()
    for task in ALL_TASKS:
        a = build_conversation(task, study, np.random.default_rng(3))
        b = build_conversation(task, copy.deepcopy(study), np.random.default_rng(3))
        assert a == b and a["task"] == task
        check_images(a)


def test_bad_input_errors():
    with pytest.raises(ConversationError, match="unknown task 'foo'"):
        build_conversation("foo", example_study(), 0)
    study = example_study()
    del study["images"][0]["hw"]
    with pytest.raises(ConversationError, match="'hw'"):
        build_conversation("organ_grounding", study, 0)
    study = example_study()
    study["changes"] = {"Pleural Effusion": "bigger"}
    with pytest.raises(ConversationError, match="bad 'changes'"):
        build_conversation("difference_vqa", study, 0)
    with pytest.raises(ConversationError, match="unknown report mode"):
        report_user_turns("triple")


def test_direct_prompt_variants():
    assert report_user_turns("multi_image", 2, cot=False) == [
        "radiology images: <image> <image> Provide a description of the findings in the "
        "radiology images."
    ]


def test_rare_finding_repeats_draw_a_rare_finding_s_study_more_often():
    """power 1: a study's weight is (most common finding's count / its rarest finding's count),
    rounded and capped; studies without a positive finding and power 0 keep weight 1."""
    from cxrlib.data.conversations import MAX_RARE_REPEATS, rare_finding_repeats

    def study(*labels):
        return {"labels": {name: 1 for name in labels}}

    studies = [study("Cardiomegaly")] * 6 + [study("Fracture")] * 2 + [study("Edema")]
    studies += [study(), study("Cardiomegaly", "Edema")]
    got = rare_finding_repeats(studies, 1.0)
    # counts: cardiomegaly 7, fracture 2, edema 2 -> 7/2 = 3.5 rounds to 4
    assert got == [1] * 6 + [4, 4, 4, 1, 4]
    assert rare_finding_repeats(studies, 0.0) == [1] * len(studies)
    assert max(rare_finding_repeats([study("Cardiomegaly")] * 50 + [study("Edema")], 1.0)) == (
        MAX_RARE_REPEATS
    )
