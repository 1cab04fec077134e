"""The one place figures are styled and written. Notebooks save figures only through ``savefig``."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from cxrlib.utils import REPO_ROOT

FIGURE_DIR = REPO_ROOT / "figures"
DPI = 120

sns.set_theme(context="notebook", style="whitegrid")


def savefig(fig: plt.Figure, name: str, figure_dir: str | Path | None = None) -> Path:
    """Save ``fig`` as ``<figure_dir>/<name>.png`` (fixed dpi, tight bounding box).

    Args:
        fig: the matplotlib figure.
        name: file stem named after the notebook, e.g. ``"03-loss-curves"``.
        figure_dir: defaults to the repository's ``figures/``.
    """
    directory = Path(figure_dir) if figure_dir else FIGURE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def show_image(ax: plt.Axes, image: np.ndarray, title: str | None = None) -> None:
    """Draw a grayscale radiograph without axes."""
    ax.imshow(image, cmap="gray", vmin=0, vmax=255 if image.dtype == np.uint8 else None)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def draw_box(
    ax: plt.Axes, box, label: str | None = None, color: str = "tab:red", linestyle: str = "-"
) -> None:
    """Draw one ``[x1, y1, x2, y2]`` box in the axes' pixel coordinates."""
    x1, y1, x2, y2 = box
    ax.add_patch(
        plt.Rectangle(
            (x1, y1), x2 - x1, y2 - y1, fill=False, color=color, lw=1.5, linestyle=linestyle
        )
    )
    if label:
        ax.text(x1, y1 - 1, label, color=color, fontsize=7, va="bottom")


def caption(ax: plt.Axes, text: str, width: int = 44, fontsize: int = 7) -> None:
    """Write ``text`` under an image drawn with ``show_image`` (its axes are off), each line
    wrapped at ``width`` characters."""
    ax.text(
        0.5,
        -0.03,
        "\n".join(textwrap.fill(line, width) for line in text.splitlines()),
        transform=ax.transAxes,
        ha="center",
        va="top",
        fontsize=fontsize,
    )
