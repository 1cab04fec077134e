"""The generated "what this run shows" text follows the metrics, failing runs included; the
notebook helpers (OVERRIDES, runtime line, mechanism checks, quiet kernels) do what they say."""

from __future__ import annotations

import json

import pytest
import tqdm.auto

from cxrlib import narrative, run_notebook
from cxrlib.config import ConfigError, load_preset
from cxrlib.notebook import MechanismCheckError, Run, read_overrides, rounded, runtime_line, setup


def _phase1(right: float, shuffled: float, after=("a", "b")) -> dict:
    return {
        "val_loss_before": 6.0,
        "val_loss": right,
        "val_loss_shuffled_images": shuffled,
        "samples": [{"after": a} for a in after],
        "trainable_parameters": 10,
        "total_parameters": 100,
    }


def test_phase1_without_image_dependence_says_so():
    text = narrative.what_this_run_shows("03-projector-pretraining", _phase1(5.0, 5.0, ("x", "x")))
    assert "**not** learnt anything image-specific" in text
    assert "does not depend on the image" in text
    assert "same generated text" in text


def test_phase1_with_image_dependence_says_so():
    text = narrative.what_this_run_shows("03-projector-pretraining", _phase1(4.0, 4.5))
    assert "depends on the image" in text and "not** learnt" not in text
    assert "fell from 6.000 to 4.000" in text


def test_word_alignment_says_whether_it_beat_the_image_blind_output():
    aligned = {"steps": 10, "first_loss": 0.8, "final_loss": 0.07, "constant_loss": 0.23}
    text = narrative.what_this_run_shows(
        "03-projector-pretraining", {**_phase1(4.0, 4.5), "word_alignment": aligned}
    )
    assert "fell from 0.800 to 0.070, below the 0.230" in text
    failed = {**aligned, "final_loss": 0.3}
    text = narrative.what_this_run_shows(
        "03-projector-pretraining", {**_phase1(4.0, 4.5), "word_alignment": failed}
    )
    assert "learnt nothing image-specific" in text


def _phase2(model: float, common: float, best: float) -> dict:
    return {
        "findings_check": {
            "n": 50,
            "model_mF1_14": model,
            "most_common_mF1_14": common,
            "best_constant_mF1_14": best,
            "most_common_answer": "Not found.",
            "malformed": 3,
        },
        "val_loss": {"all": 2.0, "vqa": 1.0},
        "val_loss_before": {"all": 3.0, "vqa": 2.0},
        "trainable_parameters": 5,
        "total_parameters": 100,
    }


def test_phase2_that_does_not_beat_the_image_blind_answer_says_so():
    text = narrative.what_this_run_shows("04-instruction-tuning-lora", _phase2(0.04, 0.04, 0.13))
    assert text.count("does **not** beat") == 2
    assert "no evidence that the model reads the image" in text


def test_phase2_that_beats_both_baselines_says_so():
    text = narrative.what_this_run_shows("04-instruction-tuning-lora", _phase2(0.3, 0.04, 0.13))
    assert text.count("beats") == 2 and "not**" not in text and "no evidence" not in text


def test_encoder_at_chance_is_called_at_chance():
    m = {
        "tokenizer": {"vocab_size": 512},
        "lm_pretrain": {"val_perplexity": 400.0},
        "encoder_pretrain": {"val_label_macro_auroc": 0.53},
    }
    text = narrative.what_this_run_shows("02-backbones", m)
    assert "at chance level" in text and "close to a model that learnt nothing" in text
    m["encoder_pretrain"]["val_label_macro_auroc"] = 0.9
    m["lm_pretrain"]["val_perplexity"] = 20.0
    text = narrative.what_this_run_shows("02-backbones", m)
    assert "clearly above chance" in text and "far below uniform guessing" in text


def test_turn2_line_follows_the_counts():
    t2 = {"turn1_named": 48, "turn1_in_report": 0, "distinct_reports": 2, "studies": 120,
          "nll_gain": -0.4}  # fmt: skip
    text = narrative.what_this_run_shows("02-backbones", {"lm_turn2": t2})
    assert "names 0 of the 48" in text and "does not follow turn 1 yet" in text
    t2.update(turn1_in_report=7)
    assert "only for some findings" in narrative.what_this_run_shows(
        "02-backbones", {"lm_turn2": t2}
    )
    t2.update(turn1_in_report=40)
    assert "mostly follows" in narrative.what_this_run_shows("02-backbones", {"lm_turn2": t2})


def _report(mf1: float, ci=(0.0, 1.0)) -> dict:
    return {"clinical": {"mF1-14": mf1, "uF1-14": mf1}, "clinical_ci": {"mF1-14": ci, "uF1-14": ci}}


def test_evaluation_below_a_baseline_says_below():
    m = {
        "labeler": "rule",
        "reports": {
            narrative.MODEL_ROW: _report(0.05, (0.04, 0.06)),
            "baseline: most common report, frontal": _report(0.05),
            "baseline: nearest neighbour, frontal": _report(0.11),
        },
    }
    text = narrative.what_this_run_shows("06-evaluation", m)
    assert "below the nearest neighbour baseline" in text
    assert "level with the most common report baseline" in text
    assert "not distinguishable" in text


def test_inference_with_malformed_answers_and_untrained_direct_prompt():
    m = {
        "reports": {
            "cot_single": {"requests": 10, "malformed turn 1": 10},
            "direct_single": {"requests": 10},
        },
        "cot_findings": {"macro_f1": 0.0, "micro_f1": 0.0},
        "grounding": {"overall": {"mIoU": 0.0, "accuracy": 0.0, "n": 5, "malformed": 5}},
        "direct_trained": False,
    }
    text = narrative.what_this_run_shows("05-cot-inference", m)
    assert "100.0% of the single-image turn-1 answers are malformed" in text
    assert "never trained on it" in text and "no predicted box overlaps" in text


def test_explorer_compares_with_the_most_common_report():
    m = {"studies": 10, "exact_label_agreement": 0.3, "most_common_report_agreement": 0.5}
    assert "below this image-blind baseline" in narrative.what_this_run_shows("07-explorer", m)


def test_overview_states_the_token_budget():
    text = narrative.what_this_run_shows("00-overview", {}, load_preset("paper"))
    assert "5,476" in text and "1,444" in text


def test_every_notebook_has_a_writer_and_unknown_names_fail():
    assert set(narrative.WRITERS) >= {"00-overview", "07-explorer"}
    with pytest.raises(KeyError, match="no summary writer"):
        narrative.what_this_run_shows("99-nothing", {})


# --- notebook helpers ------------------------------------------------------------------------


def test_overrides_reach_the_preset(tmp_path):
    run = setup(
        "smoke",
        out_dir=str(tmp_path),
        figure_dir=str(tmp_path / "f"),
        overrides="lora.r=4 train.phase1.steps=2",
    )
    assert run.cfg["lora"]["r"] == 4 and run.cfg["train"]["phase1"]["steps"] == 2
    assert run.overrides == {"lora": {"r": 4}, "train": {"phase1": {"steps": 2}}}
    assert read_overrides('data.render_size=[128,160] data.mixture="uniform"') == {
        "data": {"render_size": [128, 160], "mixture": "uniform"}
    }
    with pytest.raises(ConfigError, match="unknown config key 'lora.rank'"):
        setup("smoke", out_dir=str(tmp_path), figure_dir=str(tmp_path), overrides="lora.rank=4")


def test_run_check_records_and_fails_loudly(tmp_path):
    run = Run(cfg={}, out=tmp_path, figures=tmp_path, device=None)
    run.check("ok", True)
    with pytest.raises(MechanismCheckError, match="'bad' failed"):
        run.check("bad", False)
    assert run.checks == {"ok": True, "bad": False}


def test_runtime_line_reads_the_timings_file(tmp_path):
    path = tmp_path / "timings.json"
    path.write_text(json.dumps({"02-backbones": 209.0, "00-overview": 4.0}))
    assert "about 3 min" in runtime_line("02-backbones", path)
    assert "about 4 s" in runtime_line("00-overview", path)
    assert "not measured" in runtime_line("09-x", path)
    assert "not measured" not in runtime_line("04-instruction-tuning-lora")  # the committed file


def test_rounded():
    assert rounded({"a": [1.234567, 2], "b": 0.5}, 2) == {"a": [1.23, 2], "b": 0.5}


def test_quiet_progress_bars_disables_notebook_bars(monkeypatch):
    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.auto.tqdm)  # restored after the test
    run_notebook.quiet_progress_bars()
    assert tqdm.auto.tqdm(total=3, disable=False).disable


def test_kernel_manager_uses_ipc_with_its_own_sockets():
    from pathlib import Path

    from jupyter_core.paths import jupyter_runtime_dir

    a, b = (run_notebook.IpcKernelManager(kernel_name=run_notebook.KERNEL) for _ in range(2))
    assert a.transport == b.transport == "ipc"
    # two runs at once must not share sockets (the default "kernel-ipc" in the working directory)
    assert a.ip != b.ip and Path(a.ip).parent == Path(jupyter_runtime_dir())


def test_evaluation_states_the_turn_agreement():
    m = {"labeler": "rule-based", "reports": {},
         "turn_agreement": {"n": 50, "turn1_named": 40, "turn1_in_report": 0.25,
                            "report_positive": 10, "report_in_turn1": 1.0, "distinct_reports": 6}}  # fmt: skip
    m["reports"]["CoT, single image, frontal"] = {"clinical": {"mF1-14": 0.1, "uF1-14": 0.5}}
    text = narrative.what_this_run_shows("06-evaluation", m)
    assert "25.0% of the 40 findings that turn 1 named" in text and "100.0% of the 10" in text
    assert "6 distinct reports for 50 frontal images" in text
