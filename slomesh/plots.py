"""Helpers shared by the commands that draw plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lays out `fig`, writes it to `path` (format from the suffix, parents created), closes it.

    Returns:
        The path written.
    """
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
