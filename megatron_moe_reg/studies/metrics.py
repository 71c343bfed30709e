"""The metrics a study compares, read from one run's results: its evaluation on the study's fixed
tokens (``eval.json``, per MoE layer averaged over the layers) and, when the study adapts, the
interference test (``adapt.json`` under the key ``"adapt"``).

Each metric: (reader, direction) with direction True when lower is better, False when higher is
better and None when the metric has no better side (a property the claims speak about).

``METRICS`` is every study's family (the Holm correction runs over it); ``OPTIONAL`` metrics join
it only when a spec names them (``[study] metrics``), so a study that does not ask keeps its family.
"""

from __future__ import annotations

import math
import statistics


def _layer_values(result: dict, key: str) -> list[float]:
    values = [layer.get(key) for layer in result["layers"]]
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def _layer_mean(result: dict, key: str) -> float:
    values = _layer_values(result, key)
    return statistics.fmean(values) if values else math.nan


def _layer_log_mean(result: dict, key: str) -> float:
    """The mean over MoE layers of log(value ≥ 1): the log of their geometric mean (inf when one is)."""
    values = _layer_values(result, key)
    return statistics.fmean(math.log(v) for v in values) if values else math.nan


def _transition_mean(key: str):
    """The mean over consecutive MoE-layer pairs of a transition value (nan where none is defined)."""

    def read(result: dict) -> float:
        values = [t.get(key) for t in result["transitions"]]
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else math.nan

    return read


def _adapt(*keys: str):
    def read(result: dict) -> float:
        value = result.get("adapt")
        for key in keys:
            if value is None:
                return math.nan
            value = value[key]
        return math.nan if value is None else float(value)

    return read


METRICS = {
    "validation loss": (lambda r: r["lm_loss"], True),
    "perplexity": (lambda r: r["perplexity"], True),
    "routing entropy": (lambda r: _layer_mean(r, "routing_entropy"), None),
    "co-activation overlap": (lambda r: _layer_mean(r, "coactivation_overlap"), None),
    "PES": (lambda r: _layer_mean(r, "pes"), None),
    "activation MSO": (lambda r: _layer_mean(r, "activation_mso"), None),
    "weight MSO": (lambda r: _layer_mean(r, "weight_mso_fc1"), None),
    "load CV": (lambda r: _layer_mean(r, "load_cv"), None),  # metrics.load_statistics, per layer
    "dead experts": (lambda r: _layer_mean(r, "dead_experts"), True),
    "pathway MI": (_transition_mean("mutual_information"), None),
    # analyze's router predictability (metrics.predictability): layer l's router on layer l-1's inputs
    "cross-layer top-k overlap": (_transition_mean("predicted_topk_overlap"), None),
    "predicted load cosine": (_transition_mean("predicted_load_cosine"), None),
    "expert-domain NMI": (lambda r: _layer_mean(r, "expert_domain_nmi"), None),
    # SR-MoE's interference test (moe-reg adapt): loss rise / accuracy drop on the other domains
    "interference (loss)": (_adapt("interference", "lm_loss"), True),
    "interference (accuracy)": (_adapt("interference", "token_accuracy"), False),
    "adaptation gain (loss)": (_adapt("gain", "lm_loss"), False),
}

# the router's conditioning (metrics.geometry), mean over MoE layers; on request only
OPTIONAL = {
    "router stable rank": (lambda r: _layer_mean(r, "router_stable_rank"), None),
    "router SVD entropy": (lambda r: _layer_mean(r, "router_svd_entropy"), None),
    "router log condition number": (lambda r: _layer_log_mean(r, "router_condition_number"), None),
    "router row cosine": (lambda r: _layer_mean(r, "router_row_cosine_mean"), None),
}
KNOWN = {**METRICS, **OPTIONAL}


def family(extra: tuple[str, ...] = ()) -> list[str]:
    """The metrics a study compares: the default family and the optional ones it names."""
    return [*METRICS, *extra]


# per-layer values plotted by layer (eval.json keys)
PER_LAYER = {
    "routing entropy": "routing_entropy",
    "co-activation overlap": "coactivation_overlap",
    "PES": "pes",
    "activation MSO": "activation_mso",
    "weight MSO": "weight_mso_fc1",
}


def read(metric: str, result: dict) -> float:
    return float(KNOWN[metric][0](result))
