"""``loss.png``: the training loss per step, and the eval accuracy when it was measured.

matplotlib is an optional extra (``pip install arkfast[viz]``, with tensorboard); without it no plot is drawn and the
run says so once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_curves"]


def plot_curves(metrics: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path,
                title: str = "") -> Path | None:
    """Draw ``metrics`` (``step``, ``loss``) and ``evals`` (``step``, ``accuracy``) into ``path``;
    returns ``path``, or ``None`` when matplotlib is not installed or there is nothing to draw."""
    if not metrics and not evals:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: draw straight into the file
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if metrics:
        ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], color="tab:blue", lw=1.2,
                label="train loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (weighted CE per target token)")
    ax.grid(alpha=0.3)
    if evals:
        acc = ax.twinx()
        acc.plot([e["step"] for e in evals], [100 * e["accuracy"] for e in evals], "o-", color="tab:red",
                 label="eval accuracy")
        acc.set_ylabel("eval accuracy (%)", color="tab:red")
        acc.tick_params(axis="y", colors="tab:red")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
