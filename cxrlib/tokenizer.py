"""Tokenizers: a byte-level BPE trained on report text (``smoke``/``tiny``) or Mistral's (``paper``).

Both come back as a ``transformers`` fast tokenizer with the same special tokens, so the data
layer and the model never ask which preset they run: ``<s>``, ``</s>``, ``<unk>``, ``<pad>`` and
``<image>`` (the placeholder that the model replaces with projector outputs). Introduced in
notebook 02.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

from cxrlib.constants import (
    BOS_TOKEN,
    EOS_TOKEN,
    IMAGE_TOKEN,
    INST_CLOSE,
    INST_OPEN,
    PAD_TOKEN,
    UNK_TOKEN,
)

# Order fixes the ids: <unk>=0, <s>=1, </s>=2 as in Mistral; then ours.
SPECIAL_TOKENS = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN, INST_OPEN, INST_CLOSE]


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights or a tokenizer are not in the local Hugging Face cache."""


def missing_weights_message(hf_id: str) -> str:
    return (
        f"'{hf_id}' is not in the local Hugging Face cache and this project never downloads at run "
        f"time. On a machine with internet run `huggingface-cli download {hf_id}` (accept the "
        f"model's licence first), then copy ~/.cache/huggingface/hub/models--"
        f"{hf_id.replace('/', '--')} to this machine's cache (or set HF_HOME)."
    )


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` with the project's special tokens.

    Args:
        texts: training sentences (the report corpus).
        vocab_size: target size, special tokens included.
        min_frequency: minimum pair count for a merge.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Byte-level offsets stay exact; no BOS/EOS added here: the data layer places them itself.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IMAGE_TOKEN, INST_OPEN, INST_CLOSE],
        clean_up_tokenization_spaces=False,
    )


def load_pretrained_tokenizer(hf_id: str) -> PreTrainedTokenizerFast:
    """Load a hub tokenizer (e.g. Mistral's) from the local cache and add ``<image>``."""
    try:
        tok = AutoTokenizer.from_pretrained(hf_id, local_files_only=True)
    except OSError as err:
        raise MissingWeightsError(missing_weights_message(hf_id)) from err
    return _add_image_and_pad(tok)


def tokenizer_from_sentencepiece(model_file: str | Path) -> PreTrainedTokenizerFast:
    """Mistral-7B's tokenizer from its SentencePiece ``.model`` file, with ``<image>`` added.

    The file Mistral-7B-Instruct-v0.2 uses ships with the ``mistral-common`` wheel
    (``mistral_common/data/tokenizer.model.v1``), so the ``paper`` text path can be used and
    tested without the hub. transformers 5 converts a ``tokenizer.model`` found in a directory
    into its fast (``tokenizers``) ``LlamaTokenizer``; that needs ``sentencepiece`` and
    ``protobuf`` installed (the ``dev`` extra has them).
    """
    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"no SentencePiece model at {model_file}")
    with tempfile.TemporaryDirectory() as tmp:  # from_pretrained looks for this exact name
        (Path(tmp) / "tokenizer.model").symlink_to(model_file.resolve())
        tok = LlamaTokenizer.from_pretrained(tmp, legacy=False)
    if len(tok) < 100:  # the conversion fell back to an empty vocabulary
        raise ValueError(
            f"{model_file} could not be read as a SentencePiece model (got {len(tok)} tokens); "
            "install `sentencepiece` and `protobuf`"
        )
    return _add_image_and_pad(tok)


def _add_image_and_pad(tok):
    """Add ``<image>`` as a special token and pad with ``<unk>`` where there is no pad token."""
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    # Mistral has no pad token; <unk> is never a target, so it is safe to pad with.
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    return tok


def load_tokenizer(cfg: dict, directory: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The preset's tokenizer: Mistral's for ``paper``, else the BPE saved in ``directory``."""
    if cfg["llm"]["hf_id"]:
        return load_pretrained_tokenizer(cfg["llm"]["hf_id"])
    if directory is None or not (Path(directory) / "tokenizer.json").exists():
        from cxrlib.utils import MissingArtifactError

        raise MissingArtifactError(
            f"no trained tokenizer in {directory}: run notebook 02-backbones first "
            f"(`make all`, or `python -m cxrlib.train --stage tokenizer`)."
        )
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def image_token_id(tokenizer: PreTrainedTokenizerFast) -> int:
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
