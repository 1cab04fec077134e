"""The C-Abstractor: the official parameter count, shapes, grid orientation, clear errors."""

import pytest
import torch
from timm.layers import LayerNormAct2d
from torch import nn

from cxrlib.config import load_preset
from cxrlib.model import CAbstractor, count_parameters


def regnet_block_params(c_in: int, c_out: int) -> int:
    """Parameters of one timm RegNet bottleneck block, counted by hand.

    bottleneck ratio 1 -> width c_out; group size 1 -> depthwise 3x3; SE reduces to
    round(0.25 * c_in) channels (timm uses the block's INPUT width); convs have no bias; every
    LayerNorm2d has a weight and a bias; a 1x1 conv + norm shortcut when c_in != c_out.
    """
    norm = 2 * c_out
    conv1 = c_in * c_out + norm
    conv2 = c_out * 9 + norm
    se_width = round(0.25 * c_in)
    se = (c_out * se_width + se_width) + (se_width * c_out + c_out)
    conv3 = c_out * c_out + norm
    shortcut = c_in * c_out + norm if c_in != c_out else 0
    return conv1 + conv2 + se + conv3 + shortcut


def c_abstractor_params(c_enc, n_tokens, hidden, d_llm, depth, mlp_depth, pos_emb=True) -> int:
    stage1 = regnet_block_params(c_enc, hidden) + (depth - 1) * regnet_block_params(hidden, hidden)
    stage2 = depth * regnet_block_params(hidden, hidden)
    mlp = (hidden * d_llm + d_llm) + (mlp_depth - 1) * (d_llm * d_llm + d_llm)
    return (n_tokens * c_enc if pos_emb else 0) + stage1 + stage2 + mlp


PAPER_PROJECTOR_PARAMS = c_abstractor_params(768, 1369, 1024, 4096, depth=3, mlp_depth=2)


def test_paper_projector_has_the_official_parameter_count():
    cfg = load_preset("paper")
    with torch.device("meta"):
        proj = CAbstractor.from_config(cfg)
    assert proj.num_input_tokens == 1369 and proj.num_queries == 361
    assert count_parameters(proj) == PAPER_PROJECTOR_PARAMS == 38_254_784


@pytest.mark.parametrize("preset", ["smoke", "tiny"])
def test_small_presets_follow_the_same_formula(preset):
    cfg = load_preset(preset)
    e, p = cfg["encoder"], cfg["projector"]
    n = (e["image_size"] // e["patch_size"]) ** 2
    expected = c_abstractor_params(
        e["hidden_size"], n, p["hidden_size"], cfg["llm"]["hidden_size"], p["depth"], p["mlp_depth"]
    )
    assert count_parameters(CAbstractor.from_config(cfg)) == expected


def test_blocks_are_the_cards_regnet_blocks():
    proj = CAbstractor(32, 16, 48, 4, depth=2, mlp_depth=2, output_hidden_size=64)
    block = proj.net[0].b1
    assert block.conv2.conv.groups == 48 and block.conv2.conv.kernel_size == (3, 3)  # depthwise
    assert block.conv2.conv.stride == (1, 1) and block.conv2.conv.dilation == (1, 1)
    # timm fuses norm_layer=LayerNorm2d with the activation into LayerNormAct2d
    assert isinstance(block.conv1.bn, LayerNormAct2d) and isinstance(block.conv1.bn.act, nn.SiLU)
    assert isinstance(block.act3, nn.SiLU) and isinstance(block.se.act, nn.SiLU)
    assert block.se.fc1.out_channels == 8  # SE 0.25 of the 32 input channels
    assert isinstance(proj.net[1], nn.AdaptiveAvgPool2d)
    assert [type(m) for m in proj.readout] == [nn.Linear, nn.SiLU, nn.Linear]
    assert proj.pos_emb.shape == (1, 16, 32)


def test_output_shape_and_no_pos_emb():
    proj = CAbstractor(32, 64, 48, 16, depth=1, mlp_depth=3, output_hidden_size=40, pos_emb=False)
    assert proj(torch.randn(3, 64, 32)).shape == (3, 16, 40)
    assert proj.pos_emb is None
    assert len(proj.readout) == 5  # Linear, SiLU, Linear, SiLU, Linear


def test_grid_is_row_major():
    """Pooling only (depth 0): a feature in the top-right 2x2 patch block reaches only query 1."""
    torch.manual_seed(0)
    proj = CAbstractor(8, 16, 8, 4, depth=0, mlp_depth=1, output_hidden_size=8, pos_emb=False)
    x = torch.zeros(1, 16, 8)
    base = proj(x)
    x[0, 2] = 1.0  # row 0, column 2 of the 4x4 grid -> pooled cell (0, 1) -> query index 1
    changed = (proj(x) - base).abs().sum(-1)[0]
    assert changed[1] > 0 and changed[[0, 2, 3]].abs().sum() == 0


def test_non_square_grids_are_rejected_clearly():
    with pytest.raises(ValueError, match="projector.num_queries = 5 is not a square number"):
        CAbstractor(8, 16, 8, 5, depth=1, mlp_depth=1, output_hidden_size=8)
    with pytest.raises(ValueError, match="num_input_tokens.*= 15 is not a square"):
        CAbstractor(8, 15, 8, 4, depth=1, mlp_depth=1, output_hidden_size=8)
    with pytest.raises(ValueError, match="exceeds"):
        CAbstractor(8, 16, 8, 25, depth=1, mlp_depth=1, output_hidden_size=8)
    proj = CAbstractor(8, 16, 8, 4, depth=1, mlp_depth=1, output_hidden_size=8)
    with pytest.raises(ValueError, match=r"expects \(B, 16, C\)"):
        proj(torch.randn(1, 9, 8))
