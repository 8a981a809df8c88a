"""Run reports for people without W&B: PNG plots, ``report.md`` and the stdout summary.

The submission file is written by ``popstack/pipeline/submission.py`` (no matplotlib there, for ``predict.py``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.stats import gaussian_kde  # noqa: E402

from popstack.datamodules.atomic import atomic_path, atomic_write_text  # noqa: E402


def plot_prediction_distribution(y_true: np.ndarray, y_pred: np.ndarray, path: Path, title: str) -> Path:
    """Histogram + KDE of predicted vs ground-truth labels (HyperFusion Figure 2). Inputs: (n,) log-views."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lo = float(min(y_true.min(), y_pred.min()))
    hi = float(max(y_true.max(), y_pred.max()))
    bins = np.linspace(lo, hi, 40)
    grid = np.linspace(lo, hi, 300)
    for values, name, colour in ((y_true, "ground truth", "tab:blue"), (y_pred, "predicted", "tab:orange")):
        ax.hist(values, bins=bins, density=True, alpha=0.35, color=colour, label=f"{name} (histogram)")
        if np.std(values) > 0:
            ax.plot(grid, gaussian_kde(values)(grid), color=colour, lw=2, label=f"{name} (KDE)")
    ax.set_xlabel("popularity (log-views)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_feature_importance(importance: pd.Series, path: Path, top: int = 20) -> Path:
    """Horizontal bar chart of the ``top`` most important features (HyperFusion Table 2), as % of the total."""
    share = (importance / importance.sum() * 100).sort_values(ascending=False).head(top)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(share) + 1.2))
    ax.barh(share.index, share.to_numpy(), color="tab:green")
    ax.set_xlabel("importance (% of total)")
    ax.set_title(f"Top-{len(share)} features")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def markdown_table(df: pd.DataFrame, floatfmt: str = ".4f") -> str:
    """A GitHub-markdown table (no tabulate dependency)."""
    def cell(v):
        return format(v, floatfmt) if isinstance(v, (float, np.floating)) else str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *rows])


def write_report(path: Path, sections: list[tuple[str, str]]) -> Path:
    """``report.md`` from (heading, markdown body) sections."""
    text = "# popstack run report\n\n" + "\n\n".join(f"## {h}\n\n{body}" for h, body in sections) + "\n"
    return atomic_write_text(path, text)


def print_summary(members: pd.DataFrame, stage_seconds: dict[str, float], headline: dict | None = None,
                  warning: str | None = None) -> None:
    """Final stdout: the headline (``{"src", "mae", "source"}``) and a warning if any, the members and blend with
    SRC/MAE (out-of-fold and held-back), and seconds per stage."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if headline is not None:
        console.print(f"[bold]popstack headline: SRC {headline['src']:.4f} / MAE {headline['mae']:.4f} on the "
                      f"{headline['source']}[/bold]")
    if warning:
        console.print(f"[bold red]{warning}[/bold red]")
    table = Table(title="popstack: scores per member (out-of-fold on the folds; held-back slice)")
    for col in members.columns:
        table.add_column(str(col), justify="right" if col != "member" else "left")
    for row in members.itertuples(index=False):
        table.add_row(*[f"{v:.4f}" if isinstance(v, (float, np.floating)) else str(v) for v in row])
    console.print(table)
    stages = Table(title="time per stage")
    stages.add_column("stage")
    stages.add_column("seconds", justify="right")
    for name, sec in stage_seconds.items():
        stages.add_row(name, f"{sec:.1f}")
    console.print(stages)
