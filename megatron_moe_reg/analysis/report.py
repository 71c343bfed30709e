"""``metrics.json``, PNG plots and ``index.html`` from the evaluations of one or more checkpoints.

Plots per checkpoint: layer x expert load share (heatmap), the top-1 transition matrix between
each pair of consecutive MoE layers (row-normalized), expert x domain shares of the last MoE layer
(the most frequent domains). Plots across checkpoints: routing entropy, co-activation overlap,
PES, activation MSO, weight MSO and load max violation per layer, one line per checkpoint.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

PER_LAYER = (
    "routing_entropy",
    "coactivation_overlap",
    "pes",
    "activation_mso",
    "weight_mso_fc1",
    "load_max_violation",
    "load_cv",
    "expert_domain_nmi",
)
CONDITIONING = ("router_condition_number", "router_svd_entropy", "router_row_cosine_mean")
SUMMARY = ("lm_loss", "perplexity", "token_accuracy", "top10_pathway_share")
MAX_DOMAINS = 16


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def summary(result: dict) -> dict[str, float | None]:
    """Checkpoint-level numbers: the summary values and the mean over MoE layers of each metric."""
    out = {k: result[k] for k in SUMMARY}
    layers = result["layers"]
    for key in PER_LAYER + (
        "router_sigma_max",
        "router_stable_rank",
        "router_row_orthogonality_error",
        "weight_mso_fc2",
        "dead_experts",
    ):
        out[key] = sum(layer[key] for layer in layers) / len(layers)
    for key in CONDITIONING:  # absent in older results
        defined = [layer[key] for layer in layers if key in layer]
        out[key] = sum(defined) / len(defined) if defined else None
    transitions = result["transitions"]
    if transitions:
        out["pathway_mutual_information"] = sum(t["mutual_information"] for t in transitions) / len(transitions)
        out["pathway_conditional_entropy"] = sum(t["conditional_entropy"] for t in transitions) / len(transitions)
        for key in ("predicted_load_cosine", "predicted_load_spearman", "predicted_topk_overlap"):
            defined = [t[key] for t in transitions if t.get(key) is not None]  # absent in older results
            out[key] = sum(defined) / len(defined) if defined else None
    return out


def _heatmap(plt, matrix, title, xlabel, ylabel, path, yticks=None, xticks=None):
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(matrix[0]) + 2), max(3.5, 0.3 * len(matrix) + 1.5)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if yticks is not None:
        ax.set_yticks(range(len(yticks)), yticks, fontsize=7)
    if xticks is not None:
        ax.set_xticks(range(len(xticks)), xticks, fontsize=7, rotation=90)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _normalize_rows(counts):
    return [[v / max(sum(row), 1) for v in row] for row in counts]


def checkpoint_plots(plt, result: dict, name: str, out: Path) -> list[str]:
    layers = result["layers"]
    files = [f"{name}_load.png"]
    _heatmap(
        plt,
        [layer["load_share"] for layer in layers],
        f"{name}: load share",
        "expert",
        "MoE layer",
        out / files[0],
        yticks=[str(layer["layer_number"]) for layer in layers],
    )
    for t in result["transitions"]:
        file = f"{name}_transition_{t['from_layer']}_{t['to_layer']}.png"
        _heatmap(
            plt,
            _normalize_rows(t["counts"]),
            f"{name}: P(top-1 at layer {t['to_layer']} | layer {t['from_layer']})",
            f"expert at layer {t['to_layer']}",
            f"expert at layer {t['from_layer']}",
            out / file,
        )
        files.append(file)
    last = layers[-1]
    counts = last["expert_domain_counts"]  # [E, D]
    totals = [sum(row[d] for row in counts) for d in range(len(result["domain_names"]))]
    keep = sorted(range(len(totals)), key=lambda d: -totals[d])[:MAX_DOMAINS]
    keep = [d for d in keep if totals[d] > 0]
    if keep:
        shares = [[counts[e][d] / totals[d] for d in keep] for e in range(len(counts))]
        file = f"{name}_expert_domain.png"
        _heatmap(
            plt,
            shares,
            f"{name}: share of each domain's tokens per expert (layer {last['layer_number']})",
            "domain",
            "expert",
            out / file,
            xticks=[result["domain_names"][d] for d in keep],
        )
        files.append(file)
    return files


def comparison_plots(plt, results: dict[str, dict], out: Path) -> list[str]:
    files = []
    for key in PER_LAYER:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for name, result in results.items():
            ax.plot(
                [layer["layer_number"] for layer in result["layers"]],
                [layer[key] for layer in result["layers"]],
                marker="o",
                label=name,
            )
        ax.set_xlabel("layer")
        ax.set_title(key)
        ax.legend(fontsize=7)
        fig.tight_layout()
        file = f"per_layer_{key}.png"
        fig.savefig(out / file, dpi=90)
        plt.close(fig)
        files.append(file)
    return files


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.5g}"  # None: undefined (e.g. a constant load for Spearman)


def write_report(results: dict[str, dict], out: Path) -> Path:
    """Write metrics.json, the PNGs and index.html into ``out``; returns the HTML path."""
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    summaries = {name: summary(r) for name, r in results.items()}
    (out / "metrics.json").write_text(json.dumps({"summary": summaries, "checkpoints": results}, indent=1))
    per_checkpoint = {name: checkpoint_plots(plt, r, name, out) for name, r in results.items()}
    shared = comparison_plots(plt, results, out)
    names = list(results)
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th>" + "".join(f"<td>{_cell(summaries[n][k])}</td>" for n in names) + "</tr>"
        for k in summaries[names[0]]
    )
    head = "".join(
        f"<th>{html.escape(n)}<br><small>{html.escape(results[n]['checkpoint'])} "
        f"(iteration {results[n]['iteration']}, {results[n]['router_type']})</small></th>"
        for n in names
    )
    shared_imgs = "".join(f'<img src="{f}" alt="{f}">' for f in shared)
    columns = "".join(
        f"<td>{''.join(f'<img src={chr(34)}{f}{chr(34)} alt={chr(34)}{f}{chr(34)}><br>' for f in files)}</td>"
        for files in per_checkpoint.values()
    )
    first = results[names[0]]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>moe-reg routing report</title>
<style>body{{font-family:sans-serif;margin:1.5em}} td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}
table{{border-collapse:collapse}} img{{max-width:520px;margin:4px}}</style></head><body>
<h1>Routing report</h1>
<p>{first["num_tokens"]} validation tokens ({first["sample_tokens"]} sampled for PES and activation MSO),
the same for every checkpoint. Values are means over MoE layers; per-layer values are in metrics.json.</p>
<table><tr><th></th>{head}</tr>{rows}</table>
<h2>Per layer</h2>{shared_imgs}
<h2>Load, transitions and domains</h2><table><tr>{"".join(f"<th>{html.escape(n)}</th>" for n in names)}</tr>
<tr>{columns}</tr></table></body></html>
"""
    path = out / "index.html"
    path.write_text(page)
    return path
