"""A study's plots (PNG, matplotlib's Agg backend): validation loss on the fixed tokens per
checkpoint with a band of ± one std over seeds; per-layer metrics at the final checkpoint (mean over
seeds); each variant's paired difference from the baseline with its 95 % interval, per metric."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _curves(plt, report: dict, path: Path) -> bool:
    curves = report["curves"]
    if not curves or not next(iter(curves.values()))["iterations"]:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for variant, c in curves.items():
        low = [m - s for m, s in zip(c["mean"], c["std"], strict=True)]
        high = [m + s for m, s in zip(c["mean"], c["std"], strict=True)]
        (line,) = ax.plot(c["iterations"], c["mean"], marker="o", label=variant)
        ax.fill_between(c["iterations"], low, high, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation loss (fixed tokens)")
    ax.set_title(f"{report['study']}: mean ± std over {report['seeds']} seeds", fontsize=9)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _per_layer(plt, report: dict, path: Path) -> bool:
    per_layer = report["per_layer"]
    metrics = sorted({m for v in per_layer.values() for m in v})
    if not metrics:
        return False
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for variant, values in per_layer.items():
            if metric in values:
                ax.plot(range(1, len(values[metric]) + 1), values[metric], marker="o", label=variant)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("MoE layer")
    axes[0][0].legend(fontsize=6)
    return _save(plt, fig, path)


def _differences(plt, report: dict, path: Path) -> bool:
    comparisons = report["comparisons"]
    if not comparisons:
        return False
    metrics = list(next(iter(comparisons.values())))
    columns = 4
    rows = (len(metrics) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 0.4 * len(comparisons) * rows + 1.6 * rows))
    flat = axes.flatten() if hasattr(axes, "flatten") else [axes]
    variants = list(comparisons)
    for ax, metric in zip(flat, metrics, strict=False):
        for y, variant in enumerate(variants):
            c = comparisons[variant][metric]
            ax.errorbar(
                [c["mean_diff"]],
                [y],
                xerr=[[c["mean_diff"] - c["ci_low"]], [c["ci_high"] - c["mean_diff"]]],
                fmt="o",
                color="C3" if c["p_holm"] < 0.05 else "C0",
                capsize=3,
            )
        ax.axvline(0.0, color="gray", linewidth=0.8)
        ax.set_yticks(range(len(variants)), variants, fontsize=7)
        ax.set_title(f"{metric} − {report['baseline']}", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.locator_params(axis="x", nbins=4)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
    for ax in flat[len(metrics) :]:
        ax.axis("off")
    fig.suptitle("paired difference, 95 % CI (red: Holm p < 0.05)", fontsize=9)
    return _save(plt, fig, path)


def write_plots(report: dict, out: Path) -> list[str]:
    """The plots that have data, written into ``out``; their file names."""
    plt = _plt()
    names = []
    for name, draw in (("curves.png", _curves), ("per_layer.png", _per_layer), ("differences.png", _differences)):
        if draw(plt, report, out / name):
            names.append(name)
    return names
