"""Inference: prompts, the local backend (cache reuse = recomputation, batching), parsers."""

import numpy as np
import pytest
from conftest import example_study, phantom_image

from cxrlib.answers import parse_findings, parse_grounding, parse_multi_finding, parse_yes_no
from cxrlib.constants import COT_FINDINGS, IMAGE_TOKEN
from cxrlib.data.conversations import (
    build_conversation,
    finding_grounding_question,
    report_user_turns,
)
from cxrlib.inference import (
    Backend,
    Chat,
    LocalBackend,
    OfficialBackend,
    generate_reports,
    report_chat,
    report_requests,
    run_conversations,
)
from cxrlib.model.m4cxr import SequenceTooLongError
from cxrlib.model.toy import toy_model
from cxrlib.tokenizer import MissingWeightsError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy():
    return toy_model("smoke", seed=0)


@pytest.fixture(scope="module")
def images():
    return np.stack([img(seed, (144, 128)) for seed in range(4)])


img = phantom_image  # inference refuses pure noise (tests/test_images.py)


# ---------------------------------------------------------------------------- prompts
def test_report_prompts_are_the_data_layers():
    assert report_chat([img()]).turns == report_user_turns("single", 1)
    assert report_chat([img(), img(1)], cot=False).turns == report_user_turns(
        "multi_image", 2, cot=False
    )
    chat = report_chat([img()], prior_images=[img(1), img(2)], prior_report="Lungs are clear.")
    assert chat.turns == report_user_turns("multi_study", 1, "Lungs are clear.", 2)
    assert len(chat.images) == 3 and chat.meta["mode"] == "multi_study"
    assert len(report_chat([img()]).turns) == 2 and len(report_chat([img()], cot=False).turns) == 1


def test_chat_checks_its_images():
    with pytest.raises(ValueError, match="1 <image> placeholder.*but 2 image"):
        Chat([f"radiology image: {IMAGE_TOKEN} Q?"], [img(), img(1)])
    with pytest.raises(ValueError, match="dtype"):
        Chat([f"radiology image: {IMAGE_TOKEN} Q?"], [img().astype(np.float32)])
    with pytest.raises(ValueError, match="only the first turn"):
        Chat(["hello", f"now {IMAGE_TOKEN}"], [img()])


def test_report_requests_per_mode(images):
    study = example_study(with_prior=True)
    assert len(report_requests(study, images, "single")) == 2  # one per image (PA + lateral)
    multi = report_requests(study, images, "multi_image")
    assert len(multi) == 1 and len(multi[0].images) == 2
    ms = report_requests(study, images, "multi_study")[0]
    assert len(ms.images) == 4 and ms.meta["prior_image_indices"] == [2, 3]
    assert not ms.meta["fallback"]
    no_prior = report_requests(example_study(with_prior=False), images, "multi_study")[0]
    assert no_prior.meta["fallback"] and len(no_prior.images) == 2
    with pytest.raises(ValueError, match="unknown report mode"):
        report_requests(study, images, "video")


# ---------------------------------------------------------------------------- local backend
def test_local_backend_is_a_backend(toy):
    """The Backend contract, checked on its results: one answer per turn of every chat, greedy
    (the same answers again, whatever the batch), max_new_tokens a budget that cuts the text."""
    model, _, cfg = toy
    backend = LocalBackend(model, cfg, batch_size=2)
    assert isinstance(backend, Backend) and not isinstance(object(), Backend)
    chats = [report_chat([img(0)], cot=True), report_chat([img(1), img(2)], cot=False)]
    chats.append(Chat([finding_grounding_question("edema")], [img(3)]))
    answers = backend.answer(chats, 5)
    assert [len(a) for a in answers] == [2, 1, 1]  # chats of 2 and 1 turns, order kept
    assert all(isinstance(text, str) for turns in answers for text in turns)
    assert LocalBackend(model, cfg, batch_size=1).answer(chats[::-1], 5) == answers[::-1]
    longer = [a[0] for a in backend.answer(chats, 12)]
    assert all(long.startswith(short[0].strip()) for long, short in zip(longer, answers))
    assert longer != [a[0] for a in answers]  # the budget was what stopped the short answers


def test_cache_reuse_equals_reencoding_and_batching_is_transparent(toy, images):
    model, _, cfg = toy
    studies = [example_study(True), dict(example_study(False), study_id="EX2")]
    kw = {"mode": "single", "cot": True, "progress": False, "max_new_tokens": 6}
    cached = generate_reports(LocalBackend(model, cfg, batch_size=4), studies, images, **kw)
    again = generate_reports(
        LocalBackend(model, cfg, batch_size=1, reuse_cache=False), studies, images, **kw
    )
    assert len(cached) == 4
    assert [(r["findings_text"], r["report"]) for r in cached] == [
        (r["findings_text"], r["report"]) for r in again
    ]


class ScriptedBackend:
    """Answers derived from each chat, so a record can be traced back to its request."""

    name = "scripted"

    def __init__(self):
        self.seen = []

    def answer(self, chats, max_new_tokens=None):
        self.seen += chats
        out = []
        for c in chats:
            first = f"{COT_FINDINGS[len(c.images) % 13]}, {COT_FINDINGS[-1]}."
            last = f"report of images {c.meta['image_indices']}, {len(c.images)} in the chat."
            out.append([first, last] if len(c.turns) == 2 else [last])
        return out


def test_generate_reports_records(toy, images):
    study = example_study()  # PA (index 0) + lateral (index 1), prior study at 2, 3
    backend = ScriptedBackend()
    single = generate_reports(backend, [study], images, mode="single", progress=False)
    assert [r["image_indices"] for r in single] == [[0], [1]]
    assert [r["views"] for r in single] == [["PA"], ["LATERAL"]]
    for r in single:
        assert r["study_id"] == study["study_id"] and r["reference"] == study["findings_text"]
        assert r["mode"] == "single" and r["cot"] and not r["fallback"]
        assert r["findings_text"] == f"{COT_FINDINGS[1]}, {COT_FINDINGS[-1]}."
        assert r["findings"] == [COT_FINDINGS[1], COT_FINDINGS[-1]]
        assert r["report"] == f"report of images {r['image_indices']}, 1 in the chat."
    multi = generate_reports(backend, [study], images, mode="multi_image", progress=False)
    assert len(multi) == 1 and multi[0]["image_indices"] == [0, 1]
    assert multi[0]["report"] == "report of images [0, 1], 2 in the chat."
    ms = generate_reports(backend, [study], images, mode="multi_study", progress=False)
    assert ms[0]["prior_image_indices"] == [2, 3] and not ms[0]["fallback"]
    assert ms[0]["report"] == "report of images [0, 1], 4 in the chat."  # prior images too
    assert (backend.seen[-1].images[0] == images[2]).all()  # prior first, as the card's order
    direct = generate_reports(
        backend, [study], images, cot=False, frontal_only=True, progress=False
    )
    assert len(direct) == 1 and direct[0]["views"] == ["PA"]
    assert direct[0]["findings"] is None and direct[0]["findings_text"] is None
    assert direct[0]["report"] == "report of images [0], 1 in the chat."
    # The local backend's records carry exactly what it answers to the same chats.
    model, _, cfg = toy
    local = LocalBackend(model, cfg, batch_size=2)
    recs = generate_reports(local, [study], images, mode="single", progress=False, max_new_tokens=4)
    direct_answers = local.answer(report_requests(study, images, "single"), 4)
    assert [[r["findings_text"], r["report"]] for r in recs] == direct_answers


def test_run_conversations_keeps_references(toy, images):
    model, _, cfg = toy
    study = example_study()
    convs = [
        build_conversation(t, study, 0) for t in ("finding_grounding", "vqa", "difference_vqa")
    ]
    out = run_conversations(LocalBackend(model, cfg), convs, images, 4, progress=False)
    assert [r["task"] for r in out] == ["finding_grounding", "vqa", "difference_vqa"]
    assert all(len(r["predictions"]) == len(r["references"]) == 1 for r in out)
    assert out[0]["references"] == [convs[0]["turns"][0]["assistant"]]


def test_too_long_prompts_fail_before_generation(images):
    model, _, cfg = toy_model("smoke", overrides={"llm": {"max_length": 40}})
    with pytest.raises(SequenceTooLongError, match="llm.max_length = 40"):
        LocalBackend(model, cfg).answer([report_chat([images[0]])])


def test_official_backend_without_cache_says_how_to_get_it():
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("Deepnoid/M4CXR-TNNLS", "config.json"), str):
        pytest.skip("the official checkpoint is cached here")
    with pytest.raises(MissingWeightsError, match="Deepnoid/M4CXR-TNNLS.*huggingface-cli download"):
        OfficialBackend(device="cpu")


# ---------------------------------------------------------------------------- parsers
@pytest.mark.parametrize(
    "text, strict, expected",
    [
        ("cardiomegaly, pleural effusion.", True, ["cardiomegaly", "pleural effusion"]),
        (
            "Pleural effusion, cardiomegaly, cardiomegaly",
            True,
            ["cardiomegaly", "pleural effusion"],
        ),
        ("Not found.", True, []),
        ("cardiomegaly, banana.", True, None),
        ("cardiomegaly, banana.", False, ["cardiomegaly"]),
        ("", True, None),
        ("....", True, None),
        (None, True, None),
        (42, True, None),
        ("the heart is enlarged", True, None),
    ],
)
def test_parse_findings(text, strict, expected):
    assert parse_findings(text, strict=strict) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes.", "yes"),
        ("yes", "yes"),
        ("Yes. [10,20,30,40].", "yes"),
        ("No.", "no"),
        ("Not present.", "no"),
        ("Uncertain.", "uncertain"),
        ("Yesterday", None),
        ("nothing", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_grounding_parsers_never_raise():
    assert parse_grounding("Yes. [10,20,30,40], [1,2,3,4].") == [[10, 20, 30, 40], [1, 2, 3, 4]]
    assert parse_grounding("Not present.") == []
    for bad in ("[10,20,x,40]", "[300,0,0,0]", "", None, "[1,2,3]", "Yes. [50,50,10,10]."):
        assert parse_grounding(bad) is None
    assert parse_multi_finding("edema [1,2,30,40], cardiomegaly [5,5,50,50], [6,6,60,60].") == {
        "edema": [[1, 2, 30, 40]],
        "cardiomegaly": [[5, 5, 50, 50], [6, 6, 60, 60]],
    }
    assert parse_multi_finding("Not found.") == {}
    assert parse_multi_finding("edema somewhere") is None
    assert parse_multi_finding(None) is None


def test_local_backend_from_a_checkpoint(toy, tmp_path):
    from cxrlib.model import build_model, save_trained, set_trainable

    model, tok, cfg = toy
    model.encoder.save_pretrained(tmp_path / "backbones" / "encoder")
    model.llm.save_pretrained(tmp_path / "backbones" / "llm")
    trained = build_model(cfg, tok, backbones_dir=tmp_path / "backbones")
    set_trainable(trained, ["projector"])
    save_trained(trained, tmp_path / "phase1", cfg, backbones_dir=tmp_path / "backbones")
    chat = report_chat([img()], cot=False)
    backend = LocalBackend.from_checkpoint(tmp_path / "phase1", device="cpu")
    assert backend.answer([chat], 3) == LocalBackend(trained, cfg).answer([chat], 3)


def test_an_early_stopped_stage_is_refused(toy, tmp_path):
    """Issue 11, item 7: a phase 2 stopped with --max-steps is not used as if it were trained."""
    import json

    from cxrlib.model import build_model, load_trained, save_trained, set_trainable
    from cxrlib.utils import IncompleteArtifactError

    model, tok, cfg = toy
    model.encoder.save_pretrained(tmp_path / "backbones" / "encoder")
    model.llm.save_pretrained(tmp_path / "backbones" / "llm")
    trained = build_model(cfg, tok, backbones_dir=tmp_path / "backbones")
    set_trainable(trained, ["projector"])
    stage = tmp_path / "phase2"
    save_trained(trained, stage, cfg, backbones_dir=tmp_path / "backbones")
    summary = {"stage": "phase2", "steps": 2, "total_steps": 600, "completed": False}
    (stage / "summary.json").write_text(json.dumps(summary))
    for load in (load_trained, LocalBackend.from_checkpoint):
        with pytest.raises(IncompleteArtifactError) as err:
            load(stage, device="cpu")
        message = str(err.value)
        assert "2 of 600 planned steps" in message
        assert "python -m cxrlib.train --stage phase2 --preset smoke" in message
        assert "04-instruction-tuning-lora" in message and "allow_incomplete=True" in message
    with pytest.warns(UserWarning, match="unfinished phase2 run"):
        backend = LocalBackend.from_checkpoint(stage, device="cpu", allow_incomplete=True)
    assert backend.model.trainable_parts == ["projector"]
    (stage / "summary.json").write_text(json.dumps(dict(summary, steps=600, completed=True)))
    load_trained(stage)  # a finished run loads silently
