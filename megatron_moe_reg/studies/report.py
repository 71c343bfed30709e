"""The study report: per variant mean ± std over seeds, and against the baseline the paired
difference per metric (``studies.stats``), Holm-corrected across the study's metrics; validation
curves over every saved checkpoint (fixed tokens, mean ± std over seeds, paired difference per
checkpoint); per-layer metrics; verdicts on the spec's claims (``studies.claims``); plots
(``studies.plots``). Written as ``report.json``, ``report.md`` and ``index.html``.

Only seeds finished in every variant enter, so every comparison is paired.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from pathlib import Path

from megatron_moe_reg.studies.claims import verdict
from megatron_moe_reg.studies.metrics import KNOWN, PER_LAYER, read
from megatron_moe_reg.studies.runner import complete, run_dir
from megatron_moe_reg.studies.spec import StudySpec
from megatron_moe_reg.studies.stats import holm, in_words, paired


def _result(where: Path) -> dict:
    result = json.loads((where / "eval.json").read_text())
    adapt = where / "adapt" / "adapt.json"
    if adapt.is_file():
        result["adapt"] = json.loads(adapt.read_text())
    return result


def finished_seeds(spec: StudySpec, out: Path) -> list[int]:
    return [s for s in spec.seeds if all(complete(spec, out, v, s) for v in spec.variants)]


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _curves(spec: StudySpec, out: Path, seeds: list[int]) -> dict:
    """variant -> {iterations, values [iteration][seed], mean, std}; iterations every run saved."""
    losses: dict[str, dict[int, list[float]]] = {}
    for variant in spec.variants:
        per_seed = []
        for seed in seeds:
            files = sorted((run_dir(out, variant, seed) / "eval").glob("iter_*.json"))
            per_seed.append({int(f.stem[5:]): json.loads(f.read_text())["lm_loss"] for f in files})
        common = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
        losses[variant] = {i: [p[i] for p in per_seed] for i in common}
    shared = sorted(set.intersection(*(set(v) for v in losses.values()))) if losses else []
    curves = {}
    for variant, by_iteration in losses.items():
        rows = [by_iteration[i] for i in shared]
        curves[variant] = {
            "iterations": shared,
            "values": rows,
            "mean": [_mean_std(r)["mean"] for r in rows],
            "std": [_mean_std(r)["std"] for r in rows],
        }
        if variant != spec.baseline and len(seeds) > 1:
            base = [losses[spec.baseline][i] for i in shared]
            curves[variant]["paired"] = [paired(a, b).as_dict() for a, b in zip(rows, base, strict=True)]
    return curves


def _per_layer(results: dict[str, list[dict]]) -> dict:
    """variant -> metric -> [mean over seeds, per MoE layer]."""
    out: dict = {}
    for variant, runs in results.items():
        out[variant] = {}
        for metric, key in PER_LAYER.items():
            per_run = [[layer.get(key) for layer in r["layers"]] for r in runs]
            if per_run and all(v is not None for row in per_run for v in row):
                out[variant][metric] = [statistics.fmean(col) for col in zip(*per_run, strict=True)]
    return out


def _undefined_everywhere(values: dict, metric: str) -> bool:
    return all(math.isnan(x) for per_variant in values.values() for x in per_variant[metric])


def build_report(spec: StudySpec, out: Path) -> dict:
    seeds = finished_seeds(spec, out)
    results = {v: [_result(run_dir(out, v, s)) for s in seeds] for v in spec.variants}
    values = {v: {m: [read(m, r) for r in runs] for m in spec.family()} for v, runs in results.items()}
    # a metric undefined (nan) or infinite (a rank-deficient router's κ) in some run is left out
    usable = [m for m in spec.family() if all(all(math.isfinite(x) for x in values[v][m]) for v in spec.variants)]
    report: dict = {
        "study": spec.name,
        "seeds": len(seeds),
        "seed_list": seeds,
        "baseline": spec.baseline,
        "eval_tokens": spec.eval_tokens,
        "variants": {v: {m: {**_mean_std(values[v][m]), "values": values[v][m]} for m in usable} for v in values}
        if seeds
        else {},
        "comparisons": {},
        "runs": {m: [x for v in spec.variants for x in values[v][m]] for m in usable},
        # measured somewhere but not in every run (metrics no run defines, e.g. adapt's without [adapt], are silent)
        "left_out": [m for m in spec.family() if m not in usable and not _undefined_everywhere(values, m)],
        "curves": _curves(spec, out, seeds),
        "per_layer": _per_layer(results),
        "claims": [],
    }
    if len(seeds) < 2:
        report["note"] = f"{len(seeds)} seed(s) finished in every variant; a paired test needs two"
        return report
    base = values[spec.baseline]
    for variant in spec.variants:
        if variant == spec.baseline:
            continue
        results_v = {m: paired(values[variant][m], base[m]) for m in usable}
        adjusted = holm({m: r.p_t for m, r in results_v.items()})
        report["comparisons"][variant] = {
            m: {**r.as_dict(), "p_holm": adjusted[m], "words": in_words(m, r, adjusted[m], KNOWN[m][1])}
            for m, r in results_v.items()
        }
    report["claims"] = [verdict(c, report) for c in spec.claims]
    return report


def markdown(report: dict, images: tuple[str, ...] = ()) -> str:
    variants = list(report["variants"])
    metrics = [m for m in KNOWN if variants and all(m in report["variants"][v] for v in variants)]
    lines = [
        f"# Study {report['study']}: {report['seeds']} seeds, baseline {report['baseline']}, "
        f"{report['eval_tokens']} held-out tokens"
    ]
    if variants:
        lines += ["", "| metric | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for m in metrics:
        cells = [f"{report['variants'][v][m]['mean']:.4g} ± {report['variants'][v][m]['std']:.2g}" for v in variants]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if report["claims"]:
        lines += ["", "## Claims", "", "| claim | source | verdict | evidence |", "|---|---|---|---|"]
        lines += [f"| {c['claim']} | {c['source']} | {c['verdict']} | {c['evidence']} |" for c in report["claims"]]
    curves = report["curves"]
    iterations = next(iter(curves.values()))["iterations"] if curves else []
    if iterations:
        lines += ["", "## Validation loss on the fixed tokens, per checkpoint (mean ± std over seeds)", ""]
        lines += ["| variant | " + " | ".join(f"iter {i}" for i in iterations) + " |"]
        lines += ["|---|" + "---|" * len(iterations)]
        for v, c in curves.items():
            cells = [f"{m:.4f} ± {s:.3f}" for m, s in zip(c["mean"], c["std"], strict=True)]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    for variant, comparison in report["comparisons"].items():
        lines += ["", f"## {variant} against {report['baseline']} (paired over seeds)", ""]
        lines += [f"- {c['words']}" for c in comparison.values()]
    if report.get("left_out"):
        lines += ["", "Not compared (undefined or infinite in some run): " + ", ".join(report["left_out"])]
    if "note" in report:
        lines += ["", report["note"]]
    if images:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def _html(title: str, text: str) -> str:
    body = []
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("!["):
            name = line[line.index("(") + 1 : -1]
            body.append(f'<img src="{html.escape(name)}" style="max-width:100%">')
        elif line.startswith("|"):
            body.append(f"<pre>{html.escape(line)}</pre>")
        else:
            body.append(f"<p>{html.escape(line)}</p>")
    return f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><body>{''.join(body)}</body>"


def write_report(spec: StudySpec, out: Path) -> dict:
    from megatron_moe_reg.studies.plots import write_plots

    report = build_report(spec, out)
    images = write_plots(report, out) if report["seeds"] else []
    (out / "report.json").write_text(json.dumps(report, indent=1))
    text = markdown(report, tuple(images))
    (out / "report.md").write_text(text)
    (out / "index.html").write_text(_html(spec.name, text))
    return report
