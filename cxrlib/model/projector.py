"""The C-Abstractor: the convolutional projector (from Honeybee) between encoder and LLM.

The card's recipe, in order:

1. add a learnable positional embedding ``(1, N, C)`` to the N patch tokens of one image;
2. reshape to a ``sqrt(N) x sqrt(N)`` grid and run a RegNet stage of ``depth`` blocks (C -> hidden);
3. adaptive average pooling to ``sqrt(M) x sqrt(M)`` (M = ``projector.num_queries`` tokens);
4. a second RegNet stage (``depth`` blocks, hidden -> hidden);
5. flatten to M tokens and a readout MLP: ``Linear(hidden -> d_llm)`` then
   ``(mlp_depth - 1) x [SiLU, Linear(d_llm -> d_llm)]``.

RegNet blocks are timm's ``RegStage`` with stride 1, dilation 1, SiLU and timm's ``LayerNorm2d``;
timm's defaults otherwise (bottleneck ratio 1, group size 1 = depthwise 3x3, squeeze-excitation
0.25). With ``depth=3, mlp_depth=2, hidden=1024``, 768 -> 4096 and 1369 -> 361 tokens this is the
official projector (its parameter count is tested in ``tests/test_projector.py``).

    >>> proj = CAbstractor.from_config(cfg)
    >>> proj(patch_tokens).shape   # (B, N, C) -> (B, M, d_llm)
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.layers import LayerNorm2d
from timm.models.regnet import RegStage
from torch import nn

from cxrlib.config import num_patches


def square_side(n: int, what: str) -> int:
    """``sqrt(n)`` if ``n`` is a perfect square, else a ``ValueError`` naming ``what``."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(
            f"{what} = {n} is not a square number: the C-Abstractor works on a square grid "
            f"(e.g. {side * side} or {(side + 1) ** 2})"
        )
    return side


def readout_mlp(depth: int, in_size: int, out_size: int) -> nn.Sequential:
    """``Linear(in -> out)`` then ``(depth - 1) x [SiLU, Linear(out -> out)]``."""
    layers: list[nn.Module] = [nn.Linear(in_size, out_size)]
    for _ in range(depth - 1):
        layers += [nn.SiLU(), nn.Linear(out_size, out_size)]
    return nn.Sequential(*layers)


class CAbstractor(nn.Module):
    """C-Abstractor: ``(B, N, C)`` patch tokens -> ``(B, M, d_llm)`` LLM input embeddings.

    Args:
        encoder_hidden_size: C, the encoder's width (768 for Rad-DINO).
        num_input_tokens: N, patch tokens per image (CLS dropped), a square number.
        hidden_size: width of the RegNet stages.
        num_queries: M, output tokens per image, a square number no larger than N.
        depth: RegNet blocks per stage (0 = pooling only, then the MLP).
        mlp_depth: Linear layers in the readout MLP.
        output_hidden_size: d_llm, the LLM's embedding width.
        pos_emb: add a learnable positional embedding before the first stage.
    """

    def __init__(
        self,
        encoder_hidden_size: int,
        num_input_tokens: int,
        hidden_size: int,
        num_queries: int,
        depth: int,
        mlp_depth: int,
        output_hidden_size: int,
        pos_emb: bool = True,
    ):
        super().__init__()
        self.grid = square_side(num_input_tokens, "encoder patch tokens (num_input_tokens)")
        self.query_side = square_side(num_queries, "projector.num_queries")
        if self.query_side > self.grid:
            raise ValueError(
                f"projector.num_queries {num_queries} exceeds the {num_input_tokens} patch tokens"
            )
        if mlp_depth < 1:
            raise ValueError(f"projector.mlp_depth must be >= 1, got {mlp_depth}")
        self.num_input_tokens = num_input_tokens
        self.num_queries = num_queries
        self.output_hidden_size = output_hidden_size

        if pos_emb:
            self.pos_emb = nn.Parameter(torch.zeros(1, num_input_tokens, encoder_hidden_size))
            nn.init.trunc_normal_(self.pos_emb, mean=0.0, std=0.02)
        else:
            self.register_parameter("pos_emb", None)

        stage = partial(RegStage, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)
        pool = nn.AdaptiveAvgPool2d((self.query_side, self.query_side))
        if depth > 0:
            self.net = nn.Sequential(
                stage(depth, encoder_hidden_size, hidden_size),
                pool,
                stage(depth, hidden_size, hidden_size),
            )
            self.readout = readout_mlp(mlp_depth, hidden_size, output_hidden_size)
        else:  # no convolution: pool the patch tokens and read them out
            self.net = pool
            self.readout = readout_mlp(mlp_depth, encoder_hidden_size, output_hidden_size)

    @classmethod
    def from_config(cls, cfg: dict) -> CAbstractor:
        """Build the projector a preset describes (``cfg["projector"]``, encoder and LLM widths)."""
        p = cfg["projector"]
        return cls(
            encoder_hidden_size=cfg["encoder"]["hidden_size"],
            num_input_tokens=num_patches(cfg),
            hidden_size=p["hidden_size"],
            num_queries=p["num_queries"],
            depth=p["depth"],
            mlp_depth=p["mlp_depth"],
            output_hidden_size=cfg["llm"]["hidden_size"],
            pos_emb=p["pos_emb"],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project patch tokens.

        Args:
            x: (B, N, C) patch tokens of B images, CLS removed.

        Returns:
            (B, M, d_llm) tokens for the LLM.
        """
        if x.ndim != 3 or x.shape[1] != self.num_input_tokens:
            raise ValueError(
                f"CAbstractor expects (B, {self.num_input_tokens}, C) patch tokens, got "
                f"{tuple(x.shape)}: is encoder.image_size / patch_size the one it was built for?"
            )
        if self.pos_emb is not None:
            x = x + self.pos_emb
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, self.grid, self.grid)  # row-major patch grid
        x = self.net(x)
        x = x.flatten(2).transpose(1, 2)  # (B, M, hidden), row-major again
        return self.readout(x)

    @torch.no_grad()
    def match_output_norm(self, features: torch.Tensor, target_norm: float | torch.Tensor) -> float:
        """Scale the readout's last ``Linear`` so output tokens have mean length ``target_norm``.

        A freshly initialised C-Abstractor emits vectors ~30x longer than the word embeddings of a
        small LLM trained here. The LLM's RMSNorm then divides the gradient reaching them by that
        factor and image-to-image differences drown in a large common part: the model learns to
        ignore the image (measured: a held-out yes/no cardiomegaly question stayed at chance).
        Scaling weight and bias of the last ``Linear`` by one factor scales every token by it.

        Args:
            features: a few images' encoder patch features ``(N, P, C)``.
            target_norm: the length to match, e.g. the LLM's mean word-embedding norm.

        Returns:
            The factor applied.
        """
        last = [m for m in self.modules() if isinstance(m, nn.Linear)][-1]
        tokens = self(features.to(last.weight.device, last.weight.dtype))
        factor = float(target_norm / tokens.float().norm(dim=-1).mean())
        last.weight.mul_(factor)
        if last.bias is not None:
            last.bias.mul_(factor)
        return factor
