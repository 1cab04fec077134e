"""OfficialBackend against a small fake remote-code checkpoint written into tmp_path.

The fake has the loading surface the release documents: ``config.json`` with an ``auto_map`` for
``AutoModelForCausalLM`` (remote modeling code), a remote ``AutoProcessor`` (chat template, text +
images -> tensors, decoding), ``generation_config.json`` (sampling on, as a release may ship it)
and safetensors weights. Its ``generate`` answers with what it received (number of images, their
mean pixel value, greedy or not, the token budget, the weights' dtype), so the test can see what
OfficialBackend passed through. Characters are the fake's tokens (id = code point + 3).
"""

import json
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cxrlib.constants import SYSTEM_TEXT
from cxrlib.inference import Chat, OfficialBackend, report_chat
from cxrlib.tokenizer import MissingWeightsError

CONFIGURATION = """
from transformers import PretrainedConfig


class FakeM4CXRConfig(PretrainedConfig):
    model_type = "fake_m4cxr"
"""

MODELING = """
import torch
from transformers import PreTrainedModel

from .configuration_fake_m4cxr import FakeM4CXRConfig


class FakeM4CXR(PreTrainedModel):
    config_class = FakeM4CXRConfig

    def __init__(self, config):
        super().__init__(config)
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.post_init()

    def generate(self, input_ids, attention_mask=None, pixel_values=None, generation_config=None,
                 **kwargs):
        n = 0 if pixel_values is None else pixel_values.shape[0]
        mean = 0.0 if pixel_values is None else float(pixel_values.float().mean())
        reply = (
            f"images={n} mean={mean:.4f} greedy={not generation_config.do_sample} "
            f"max={generation_config.max_new_tokens} dtype={str(self.scale.dtype)[6:]} "
            f"pixels={'-' if pixel_values is None else str(pixel_values.dtype)[6:]}"
        )
        new = torch.tensor([[ord(c) + 3 for c in reply] + [2]], device=input_ids.device)
        return torch.cat([input_ids, new], dim=1)
"""

PROCESSING = '''
import json
import os

import numpy as np
import torch


class FakeM4CXRProcessor:
    """What AutoProcessor and OfficialBackend use of a remote processor."""

    calls = []  # every __call__, for the test to inspect

    def __init__(self, image_size, system_text=None):
        self.image_size, self.system_text = image_size, system_text

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        pass

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        with open(os.path.join(path, "processor_config.json")) as f:
            cfg = json.load(f)
        return cls(cfg["image_size"], cfg.get("system_text"))

    def apply_chat_template(self, messages, tokenize=False):
        assert not tokenize
        out = "<s>"
        for i, m in enumerate(messages):
            if m["role"] == "user":
                content = m["content"]
                if i == 0 and self.system_text:
                    content = self.system_text + " " + content
                out += "[INST] " + content + " [/INST]"
            else:
                out += m["content"] + "</s>"
        return out

    def __call__(self, text, images=None, return_tensors="pt"):
        assert len(text) == 1 and return_tensors == "pt"
        self.calls.append({"text": text[0], "images": images})
        ids = torch.tensor([[ord(c) + 3 for c in text[0]]])
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if images:
            size = (self.image_size, self.image_size)
            arrays = [np.asarray(im.resize(size), dtype=np.float32) / 255.0 for im in images[0]]
            out["pixel_values"] = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return out

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["".join(chr(i - 3) for i in row.tolist() if i >= 3) for row in ids]
'''


def write_fake_checkpoint(directory, system_text=None):
    files = {
        "configuration_fake_m4cxr.py": CONFIGURATION,
        "modeling_fake_m4cxr.py": MODELING,
        "processing_fake_m4cxr.py": PROCESSING,
    }
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text))
    config = {
        "model_type": "fake_m4cxr",
        "architectures": ["FakeM4CXR"],
        "auto_map": {
            "AutoConfig": "configuration_fake_m4cxr.FakeM4CXRConfig",
            "AutoModelForCausalLM": "modeling_fake_m4cxr.FakeM4CXR",
        },
        "eos_token_id": 2,
    }
    (directory / "config.json").write_text(json.dumps(config))
    processor = {
        "auto_map": {"AutoProcessor": "processing_fake_m4cxr.FakeM4CXRProcessor"},
        "image_size": 64,
        "system_text": system_text,
    }
    (directory / "processor_config.json").write_text(json.dumps(processor))
    generation = {"do_sample": True, "temperature": 0.7, "max_new_tokens": 9, "eos_token_id": 2}
    (directory / "generation_config.json").write_text(json.dumps(generation))
    save_file({"scale": torch.ones(1)}, str(directory / "model.safetensors"))
    return directory


def striped_image() -> np.ndarray:
    """64x64 bands of 8 rows, grey 50 and 150: mean 100/255 however the processor keeps the size
    (bands, not single rows: the image checks refuse what looks like noise)."""
    image = np.full((64, 64), 50, dtype=np.uint8)
    image[(np.arange(64) // 8) % 2 == 0] = 150
    return image


def make_backend(tmp_path, system_text=None):
    # transformers copies the remote code into HF_MODULES_CACHE/transformers_modules/fake_m4cxr
    directory = tmp_path / "fake_m4cxr"
    directory.mkdir()
    return OfficialBackend(str(write_fake_checkpoint(directory, system_text)), device="cpu")


def test_cot_chat_through_the_remote_processor_and_model(tmp_path):
    official = make_backend(tmp_path)
    calls = type(official.processor).calls
    calls.clear()
    assert not official.template_adds_system_text
    chat = report_chat([striped_image(), striped_image()])  # multi-image CoT: two turns
    ((turn1, turn2),) = official.answer([chat], max_new_tokens=7)
    mean = 100 / 255
    expected = f"images=2 mean={mean:.4f} greedy=True max=7 dtype=float32 pixels=float32"
    assert turn1 == turn2 == expected
    # turn 1: the system text before the first user turn, Mistral's template
    assert calls[0]["text"] == f"<s>[INST] {SYSTEM_TEXT} {chat.turns[0]} [/INST]"
    # turn 2: the whole history, the model's own first answer included, images again
    assert calls[1]["text"] == calls[0]["text"] + f"{turn1}</s>[INST] {chat.turns[1]} [/INST]"
    for call in calls:
        assert [im.mode for im in call["images"][0]] == ["RGB", "RGB"]
    # the release ships sampling on; the backend decodes greedily, with nothing else changed
    assert official.generation_config.do_sample is False
    assert official.generation_config.temperature is None


def test_system_text_is_not_added_twice(tmp_path):
    official = make_backend(tmp_path, system_text=SYSTEM_TEXT)
    calls = type(official.processor).calls
    calls.clear()
    assert official.template_adds_system_text
    chat = Chat(
        ["radiology image: <image> Answer the question. Is there edema?"], [striped_image()]
    )
    ((answer,),) = official.answer([chat], max_new_tokens=3)
    assert answer.startswith("images=1 ") and "max=3" in answer
    assert calls[0]["text"].count(SYSTEM_TEXT) == 1


def test_missing_checkpoint_directory_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="huggingface-cli download"):
        OfficialBackend(str(tmp_path / "nothing-here"), device="cpu")
