"""The study report: per variant mean ± std over seeds, and against the baseline the paired
difference per metric (``studies.stats``), Holm-corrected across the study's metrics; written as
``report.json``, ``report.md`` and ``index.html``.

Metrics come from each run's evaluation on the study's fixed held-out tokens (``eval.json`` of its
final checkpoint), averaged over the MoE layers where they are per layer.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from pathlib import Path

from megatron_moe_reg.studies.runner import run_dir
from megatron_moe_reg.studies.spec import StudySpec
from megatron_moe_reg.studies.stats import holm, in_words, paired

# metric -> (how to read it from eval.json, lower is better / higher is better / None: no direction)
METRICS = {
    "validation loss": (lambda e: e["lm_loss"], True),
    "perplexity": (lambda e: e["perplexity"], True),
    "routing entropy": (lambda e: _layer_mean(e, "routing_entropy"), None),
    "co-activation overlap": (lambda e: _layer_mean(e, "coactivation_overlap"), None),
    "PES": (lambda e: _layer_mean(e, "pes"), None),
    "activation MSO": (lambda e: _layer_mean(e, "activation_mso"), None),
    "load CV": (lambda e: _layer_mean(e, None, _load_cv), None),
    "dead experts": (lambda e: _layer_mean(e, None, lambda layer: sum(s == 0 for s in layer["load_share"])), None),
    "pathway MI": (
        lambda e: statistics.fmean(t["mutual_information"] for t in e["transitions"]) if e["transitions"] else math.nan,
        None,
    ),
    "expert-domain NMI": (lambda e: _layer_mean(e, "expert_domain_nmi"), None),
}


def _load_cv(layer: dict) -> float:
    share = layer["load_share"]
    mean = statistics.fmean(share)
    return statistics.pstdev(share) / mean if mean else math.nan


def _layer_mean(evaluation: dict, key: str | None, fn=None) -> float:
    values = [fn(layer) if fn else layer.get(key) for layer in evaluation["layers"]]
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(values) if values else math.nan


def collect(spec: StudySpec, out: Path) -> dict[str, dict[str, list[float]]]:
    """variant -> metric -> per-seed values (seed order of the spec); only fully finished seeds."""
    seeds = [s for s in spec.seeds if all((run_dir(out, v, s) / "eval.json").is_file() for v in spec.variants)]
    values: dict[str, dict[str, list[float]]] = {v: {m: [] for m in METRICS} for v in spec.variants}
    for variant in spec.variants:
        for seed in seeds:
            evaluation = json.loads((run_dir(out, variant, seed) / "eval.json").read_text())
            for metric, (read, _) in METRICS.items():
                values[variant][metric].append(float(read(evaluation)))
    return values


def build_report(spec: StudySpec, out: Path) -> dict:
    values = collect(spec, out)
    base = values[spec.baseline]
    n = len(base["validation loss"])
    report: dict = {
        "study": spec.name,
        "seeds": n,
        "baseline": spec.baseline,
        "eval_tokens": spec.eval_tokens,
        "variants": {},
        "comparisons": {},
    }
    for variant, metrics in values.items():
        report["variants"][variant] = {
            m: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
            for m, v in metrics.items()
            if v and not any(math.isnan(x) for x in v)
        }
    if n < 2:
        report["note"] = f"{n} seed(s) finished in every variant; a paired test needs two"
        return report
    for variant, metrics in values.items():
        if variant == spec.baseline:
            continue
        results = {m: paired(v, base[m]) for m, v in metrics.items() if not any(math.isnan(x) for x in v + base[m])}
        adjusted = holm({m: r.p_t for m, r in results.items()})
        report["comparisons"][variant] = {
            m: {**r.as_dict(), "p_holm": adjusted[m], "words": in_words(m, r, adjusted[m], METRICS[m][1])}
            for m, r in results.items()
        }
    return report


def markdown(report: dict) -> str:
    variants = list(report["variants"])
    metrics = [m for m in METRICS if all(m in report["variants"][v] for v in variants)]
    lines = [
        f"# Study {report['study']}: {report['seeds']} seeds, baseline {report['baseline']}, "
        f"{report['eval_tokens']} held-out tokens",
        "",
        "| metric | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for m in metrics:
        cells = [f"{report['variants'][v][m]['mean']:.4g} ± {report['variants'][v][m]['std']:.2g}" for v in variants]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for variant, comparison in report["comparisons"].items():
        lines += ["", f"## {variant} against {report['baseline']} (paired over seeds)", ""]
        lines += [f"- {c['words']}" for c in comparison.values()]
    if "note" in report:
        lines += ["", report["note"]]
    return "\n".join(lines) + "\n"


def write_report(spec: StudySpec, out: Path) -> dict:
    report = build_report(spec, out)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (out / "report.md").write_text(text)
    body = "".join(
        f"<p>{html.escape(line)}</p>" if not line.startswith("|") else f"<pre>{html.escape(line)}</pre>"
        for line in text.splitlines()
        if line
    )
    (out / "index.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>{html.escape(spec.name)}</title><body>{body}</body>"
    )
    return report
