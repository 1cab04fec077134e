"""The multimodal M4CXR model: vision encoder -> C-Abstractor -> image tokens inside the LLM.

Each ``<image>`` in a conversation is expanded by the tokenizer (``cxrlib.data.tokenize``) to
``num_image_tokens`` copies of the image token id. ``M4CXR`` embeds the text, encodes every image
(DINOv2, CLS dropped, last layer without the final norm), projects it to ``num_image_tokens``
LLM-width vectors and writes them into those positions, in order. Any number of images per
sample works, because images are matched to placeholders in reading order.

    >>> out = model(input_ids, attention_mask, pixel_values, labels=labels)   # training
    >>> res = model.generate(prompt_ids, prompt_mask, pixel_values)           # turn 1
    >>> res2 = model.generate(turn2_ids, turn2_mask, past=res)                # turn 2, cached

``generate`` is a small greedy loop over the Hugging Face model with a ``DynamicCache``; see its
docstring for why it is written here rather than calling ``transformers``' ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast


class ImageTokenError(ValueError):
    """The number of images does not match the ``<image>`` placeholders of the text."""


class SequenceTooLongError(ValueError):
    """A sequence is longer than ``llm.max_length``."""


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: 0, 1, 2, ... over the real tokens of each row.

    Passing these explicitly makes a left-padded (or hole-containing) row see exactly the
    positions it would see unpadded, so batched results equal per-sample results.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class GenerationResult:
    """What ``M4CXR.generate`` returns: the new tokens and the state needed to continue.

    Attributes:
        sequences: (B, T) generated token ids, ``</s>`` included, ``pad`` after it.
        finished: (B,) True where the sample produced ``</s>`` (False: hit ``max_new_tokens``).
        cache: the LLM's key/value cache over everything fed so far (prompt and answers).
        cache_mask: (B, L) 1 where a cache position is a real token, 0 for padding.
        tails: per sample, answer tokens not yet in the cache (always ending in ``</s>``, which
            closes the assistant turn); ``generate(..., past=result)`` feeds them first.
        scores: (B, T, V) float logits of every step when ``output_scores=True``, else None.
    """

    sequences: torch.Tensor
    finished: torch.Tensor
    cache: DynamicCache
    cache_mask: torch.Tensor
    tails: list[list[int]]
    pad_token_id: int
    eos_token_id: int
    scores: torch.Tensor | None = None
    continued: bool = field(default=False, repr=False)

    def token_lists(self) -> list[list[int]]:
        """The generated ids of each sample without padding and without the final ``</s>``."""
        out = []
        for row in self.sequences.tolist():
            # padding only ever follows </s>, so cutting at the first </s> removes both
            out.append(row[: row.index(self.eos_token_id)] if self.eos_token_id in row else row)
        return out


class M4CXR(nn.Module):
    """Encoder + C-Abstractor + causal LLM, with image tokens spliced into the text embeddings.

    Build it with ``cxrlib.model.build_model``; the constructor only wires parts together.

    Args:
        encoder: a ``transformers`` ``Dinov2Model``.
        projector: a ``CAbstractor``.
        llm: a ``MistralForCausalLM`` (or its ``peft`` wrapper once LoRA is added).
        image_token_id: id of ``<image>``; ``num_image_tokens`` copies stand for one image.
        pad_token_id: id used for padding (and after ``</s>`` in generated sequences).
        eos_token_id: id of ``</s>``; generation stops there.
        max_length: longest accepted input sequence (``llm.max_length``), images expanded.
    """

    def __init__(
        self,
        encoder: nn.Module,
        projector: nn.Module,
        llm: nn.Module,
        image_token_id: int,
        pad_token_id: int,
        eos_token_id: int,
        max_length: int,
    ):
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.llm = llm
        self.image_token_id = int(image_token_id)
        self.pad_token_id = int(pad_token_id)
        self.eos_token_id = int(eos_token_id)
        self.max_length = int(max_length)
        self.image_size = _as_int(encoder.config.image_size)
        self.trainable_parts: list[str] = []  # set by set_trainable, read by save_trained
        self.tokenizer = None  # attached by build_model so save_trained can store it

    @property
    def num_image_tokens(self) -> int:
        """LLM positions per image (= ``projector.num_queries``; 361 in the paper)."""
        return self.projector.num_queries

    # ------------------------------------------------------------------ checks
    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``pixel_values`` is (N, 3, S, S) float, S = image_size."""
        s = self.image_size
        if not torch.is_tensor(pixel_values) or not pixel_values.is_floating_point():
            raise ValueError(
                "pixel_values must be a float tensor from cxrlib.model.ImageProcessor, got "
                f"{type(pixel_values).__name__}"
                + (f" of dtype {pixel_values.dtype}" if torch.is_tensor(pixel_values) else "")
            )
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected (N, 3, {s}, {s}). "
                "Preprocess images with cxrlib.model.ImageProcessor(cfg)."
            )

    def check_length(self, length: int) -> None:
        if length > self.max_length:
            raise SequenceTooLongError(
                f"sequence of {length} tokens (images expanded to {self.num_image_tokens} each) is "
                f"longer than llm.max_length = {self.max_length}; shorten the text, use fewer "
                "images, or raise llm.max_length in the preset"
            )

    def count_images(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Images per sample implied by the image-token placeholders; raises if not whole."""
        counts = (input_ids == self.image_token_id).sum(dim=1).cpu()
        m = self.num_image_tokens
        bad = (counts % m).nonzero().flatten().tolist()
        if bad:
            raise ImageTokenError(
                f"sample(s) {bad} contain {counts[bad].tolist()} image tokens, not a multiple of "
                f"{m} per image: tokenize with num_image_tokens=model.num_image_tokens ({m}) and "
                "make sure truncation did not cut an image"
            )
        return counts // m

    # ------------------------------------------------------------------ embedding
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The encoder's patch tokens as the projector sees them.

        Args:
            pixel_values: (N, 3, S, S) from ``ImageProcessor``.

        Returns:
            (N, num_patches, encoder_width): last layer, CLS dropped, no final norm.
        """
        self.check_pixel_values(pixel_values)
        dtype = self.encoder.embeddings.patch_embeddings.projection.weight.dtype
        # The card: "last layer, no extra norm". Hugging Face's Dinov2Model applies its final
        # LayerNorm only to `last_hidden_state`; `hidden_states[-1]` is the last block's output
        # before that norm, which is what the official code feeds the projector (its
        # feature_layer_index -1 with prenorm off). Index 0 is CLS; Rad-DINO has no registers.
        out = self.encoder(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        return out.hidden_states[-1][:, 1:]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images -> LLM-space tokens.

        Args:
            pixel_values: (N, 3, S, S) from ``ImageProcessor``.

        Returns:
            (N, num_image_tokens, d_llm).
        """
        return self.projector(self.image_features(pixel_values))

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image placeholders replaced by projected image tokens.

        This is the image-token splice of M4CXR, the only one in the project: training (both
        phases), validation and generation all go through it.

        Args:
            input_ids: (B, T) ids with each image expanded to ``num_image_tokens`` placeholders.
            pixel_values: (N, 3, S, S), all images of the batch in placeholder order
                (sample 0's images first, then sample 1's, ...); None for text-only input.
            features: instead of ``pixel_values``, the images' encoder output
                ``(N, num_patches, encoder_width)`` computed beforehand (``image_features``);
                phase 1 caches them because its encoder is frozen.

        Returns:
            (B, T, d_llm) input embeddings for the LLM.
        """
        if pixel_values is not None and features is not None:
            raise ValueError("pass pixel_values or precomputed features, not both")
        images = pixel_values if features is None else features
        per_sample = self.count_images(input_ids)
        expected = int(per_sample.sum())
        given = 0 if images is None else int(images.shape[0])
        if expected != given:
            raise ImageTokenError(
                f"the text has {expected} image placeholder(s) (per sample: "
                f"{per_sample.tolist()}) but {given} image(s) were given; pass one image per "
                "<image>, all images of the batch concatenated in placeholder order"
            )
        table = self.llm.get_input_embeddings()
        input_ids = input_ids.to(table.weight.device)  # ids may come from the CPU collator
        embeds = table(input_ids)
        if given == 0:
            return embeds
        if features is None:
            image_tokens = self.encode_images(pixel_values.to(embeds.device))
        else:
            image_tokens = self.projector(features.to(embeds.device, embeds.dtype))
        image_tokens = image_tokens.to(embeds.dtype)
        slots = (input_ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
        # masked_scatter fills the slots in row-major order: sample by sample, left to right,
        # which is exactly "images in placeholder order".
        return embeds.masked_scatter(slots, image_tokens.reshape(-1, embeds.shape[-1]))

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (and the loss when ``labels`` are given) for a batch of conversations.

        Args:
            input_ids: (B, T) token ids, images expanded to placeholders.
            attention_mask: (B, T) 1 for tokens, 0 for padding (left or right); default all 1.
            pixel_values: (N, 3, S, S) all images of the batch in placeholder order, or None.
            labels: (B, T) target ids, ``IGNORE_INDEX`` where no loss is taken.
            features: precomputed encoder features instead of ``pixel_values`` (see
                ``embed_inputs``).

        Returns:
            The LLM's ``CausalLMOutputWithPast`` (``loss``, ``logits``).
        """
        self.check_length(input_ids.shape[1])
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed_inputs(input_ids, pixel_values, features)
        attention_mask = attention_mask.to(embeds.device)
        return self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            labels=None if labels is None else labels.to(embeds.device),
            use_cache=False,
            **kwargs,
        )

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        past: GenerationResult | None = None,
        output_scores: bool = False,
    ) -> GenerationResult:
        """Greedy decoding with a KV cache, batched, optionally continuing a conversation.

        Written here as a short loop over the Hugging Face model (one forward per token with a
        ``DynamicCache``) rather than ``transformers``' ``generate`` because we need three things
        it does not give directly: the cache back together with a mask saying which cache
        positions are real, position ids that ignore padding in the MIDDLE of a continued batch
        (finished answers leave holes), and the exact tokens still missing from the cache. The
        loop is greedy only, as the paper's evaluation.

        Args:
            input_ids: (B, T) prompt ids, LEFT-padded (for a continuation: the new turn only,
                e.g. ``[INST] Based on the previous conversation ... [/INST]``).
            attention_mask: (B, T) 1 for tokens, 0 for padding; default all 1.
            pixel_values: images of this input in placeholder order, or None.
            max_new_tokens: generation budget per sample.
            past: the result of a previous ``generate`` on the same batch: its cache is reused
                (images and earlier turns are not encoded again). A result can be continued once.
            output_scores: keep every step's logits in ``result.scores`` (tests, analysis).

        Returns:
            A ``GenerationResult``; ``result.sequences`` holds the new tokens.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        device = self.llm.get_input_embeddings().weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        batch = input_ids.shape[0]
        if past is not None:
            if past.continued:
                raise ValueError(
                    "this GenerationResult was already continued (its cache has grown since); "
                    "continue from the newest result instead"
                )
            if past.cache_mask.shape[0] != batch:
                raise ValueError(
                    f"past has batch size {past.cache_mask.shape[0]} but input_ids has {batch}: "
                    "continue with the same samples in the same order"
                )
            input_ids, attention_mask = _prepend_tails(
                past.tails, input_ids, attention_mask, self.pad_token_id
            )
            prev_mask, cache = past.cache_mask, past.cache
        else:
            prev_mask = attention_mask.new_zeros(batch, 0)
            cache = DynamicCache(config=self.llm.config)
        # Every check runs before the first forward pass.
        self.check_length(prev_mask.shape[1] + input_ids.shape[1])
        embeds = self.embed_inputs(input_ids, pixel_values)
        if past is not None:
            past.continued = True

        mask = torch.cat([prev_mask, attention_mask.to(prev_mask.dtype)], dim=1)
        logits = self._step(embeds, mask, cache, new=input_ids.shape[1])
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        tokens, scores, active_at_last = [], [], ~done
        for step in range(max_new_tokens):
            if output_scores:
                scores.append(logits)
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_token_id), nxt)
            tokens.append(nxt)
            active_at_last = ~done
            done = done | (nxt == self.eos_token_id)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            # Feed this step's token; samples already finished get a masked pad (a hole).
            mask = torch.cat([mask, active_at_last.to(mask.dtype)[:, None]], dim=1)
            embeds = self.llm.get_input_embeddings()(nxt[:, None])
            logits = self._step(embeds, mask, cache, new=1)

        if tokens:
            sequences = torch.stack(tokens, dim=1)
        else:
            sequences = input_ids.new_zeros(batch, 0)
        tails = []
        for i in range(batch):
            tail = [int(sequences[i, -1])] if tokens and bool(active_at_last[i]) else []
            if not done[i]:  # ran out of budget: close the turn so the next one is well formed
                tail.append(self.eos_token_id)
            tails.append(tail)
        return GenerationResult(
            sequences=sequences,
            finished=done.clone(),
            cache=cache,
            cache_mask=mask,
            tails=tails,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            scores=torch.stack(scores, dim=1) if scores else None,
        )

    def _step(
        self, embeds: torch.Tensor, mask: torch.Tensor, cache: DynamicCache, new: int
    ) -> torch.Tensor:
        """One cached forward over ``new`` positions; returns the last position's logits."""
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions_from_mask(mask)[:, -new:],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()


def _prepend_tails(
    tails: list[list[int]], input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Put each sample's tail before its real tokens, keeping the batch left-padded."""
    rows = []
    for tail, ids, m in zip(tails, input_ids.tolist(), attention_mask.tolist()):
        rows.append(tail + [t for t, keep in zip(ids, m) if keep])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype)
    mask = torch.zeros((len(rows), width), dtype=attention_mask.dtype)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=input_ids.dtype)
            mask[i, width - len(r) :] = 1
    return ids.to(input_ids.device), mask.to(attention_mask.device)


def _as_int(size) -> int:
    return int(size[0] if isinstance(size, list | tuple) else size)
