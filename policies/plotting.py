"""One plotting set-up for every report: matplotlib on its file-only backend, and figures
saved atomically (``policies.io.atomic_file``)."""

from __future__ import annotations

import os
from typing import Any

from policies.io import atomic_file


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110, **kwargs: Any) -> None:
    """Save ``fig`` to ``path`` (format from its suffix) atomically, then close it."""
    plt = pyplot()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=dpi, **kwargs)
    finally:
        plt.close(fig)
