"""A study specification (TOML): a base configuration, named variants and seeds.

    [study]
    base = ["--config", "examples/tiny_cpu.toml", "--train-iters", "100"]  # moe-reg pretrain flags
    seeds = [1, 2, 3]
    baseline = "baseline"           # the variant every other is compared with (default "baseline")
    eval-tokens = 8192              # held-out tokens every checkpoint is evaluated on
    metrics-tokens = 256            # tokens for PES and activation MSO
    metrics = ["router SVD entropy"]  # optional metrics to compare too (studies.metrics.OPTIONAL)

    [variants]
    baseline = []
    R_sp = ["--moe-specialization-loss-coeff", "2e-3"]

    [adapt]                         # optional: SR-MoE's interference test on every final checkpoint
    domain = "email"                # moe-reg adapt --domain; also train-iters, lr, experts-per-layer,
                                    # num-tokens, micro-batch-size
    [[claims]]                      # optional, any number (studies.claims): a verdict each
    variant = "R_sp"
    metric = "routing entropy"
    expect = "lower"                # lower | higher | same (margin) | uncorrelated (x, y, max-r)
    source = "arXiv 2602.14159"

Every (variant, seed) is ``moe-reg pretrain BASE VARIANT --seed S`` in its own directory; the study
owns ``--seed``, ``--save`` and ``--log-file``. The spec is checked whole before any run starts:
each variant's flags must parse, the baseline must exist, a paired test needs two seeds or more,
and no variant may configure the same run as the baseline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path

from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.flags import tomllib
from megatron_moe_reg.studies.claims import EXPECT, Claim
from megatron_moe_reg.studies.metrics import KNOWN, OPTIONAL, family

OWNED = ("--seed", "--save", "--load", "--log-file", "--tensorboard-dir")
ADAPT_KEYS = ("domain", "train-iters", "lr", "experts-per-layer", "num-tokens", "micro-batch-size")
CLAIM_KEYS = {"expect", "metric", "variant", "margin", "x", "y", "max-r", "source"}


@dataclass(frozen=True)
class StudySpec:
    path: Path
    base: list[str]
    variants: dict[str, list[str]]
    seeds: list[int]
    baseline: str = "baseline"
    eval_tokens: int = 8192
    metrics_tokens: int = 256
    name: str = field(default="study")
    adapt: dict[str, str] = field(default_factory=dict)  # moe-reg adapt options (key without --)
    claims: list[Claim] = field(default_factory=list)
    metrics: tuple[str, ...] = ()  # optional metrics compared besides the default family

    def family(self) -> list[str]:
        """The metrics compared (and Holm-corrected together)."""
        return family(self.metrics)

    def flags(self, variant: str, seed: int) -> list[str]:
        return [*self.base, *self.variants[variant], "--seed", str(seed)]

    def runs(self) -> list[tuple[str, int]]:
        """(variant, seed) in the order they run: seed-major, so an interrupted study has pairs."""
        return [(v, s) for s in self.seeds for v in self.variants]


def _flag_list(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise ConfigError(f'{where} must be a list of flags and values, e.g. ["--lr", "1e-3"]')
    return [str(v) for v in value]


def load_spec(path: str | Path, world_size: int = 1) -> StudySpec:
    """Read and check a study specification (one-line ConfigError on any problem)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study spec {path}: no such file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"study spec {path}: not valid TOML ({e})") from None
    study, variants = raw.get("study", {}), raw.get("variants", {})
    unknown = set(raw) - {"study", "variants", "adapt", "claims"} or set(study) - {
        "base",
        "seeds",
        "baseline",
        "eval-tokens",
        "metrics-tokens",
        "metrics",
        "name",
    }
    if unknown:
        raise ConfigError(f"study spec {path}: unknown key(s) {sorted(unknown)}")
    if not variants:
        raise ConfigError(f"study spec {path}: no [variants]")
    seeds = study.get("seeds", [])
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"study spec {path}: seeds must be a list of integers")
    if len(seeds) < 2:
        raise ConfigError(f"study spec {path}: a paired test needs at least two seeds, got {len(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"study spec {path}: seeds repeat: {seeds}")
    spec = StudySpec(
        path=path,
        base=_flag_list(study.get("base", []), "[study] base"),
        variants={name: _flag_list(flags, f"variant {name!r}") for name, flags in variants.items()},
        seeds=seeds,
        baseline=str(study.get("baseline", "baseline")),
        eval_tokens=int(study.get("eval-tokens", 8192)),
        metrics_tokens=int(study.get("metrics-tokens", 256)),
        name=str(study.get("name", path.stem)),
        adapt=_adapt_options(raw.get("adapt"), path),
        claims=[_claim(c, path) for c in raw.get("claims", [])],
        metrics=_optional_metrics(study.get("metrics", []), path),
    )
    _check(spec, world_size)
    return spec


def _adapt_options(table, path: Path) -> dict[str, str]:
    if table is None:
        return {}
    unknown = set(table) - set(ADAPT_KEYS)
    if unknown or "domain" not in table:
        raise ConfigError(
            f"study spec {path}: [adapt] needs domain and takes only {', '.join(ADAPT_KEYS)}"
            + (f" (unknown: {sorted(unknown)})" if unknown else "")
        )
    return {k: str(v) for k, v in table.items()}


def _optional_metrics(names, path: Path) -> tuple[str, ...]:
    if not isinstance(names, list) or any(name not in OPTIONAL for name in names) or len(set(names)) != len(names):
        raise ConfigError(
            f"study spec {path}: [study] metrics must list distinct optional metrics, of {list(OPTIONAL)} "
            f"(the default ones are always compared); got {names!r}"
        )
    return tuple(names)


def _claim(table, path: Path) -> Claim:
    if not isinstance(table, dict) or set(table) - CLAIM_KEYS or table.get("expect") not in EXPECT:
        raise ConfigError(
            f"study spec {path}: a [[claims]] entry needs expect = one of {', '.join(EXPECT)} and takes only "
            f"{', '.join(sorted(CLAIM_KEYS))}; got {table}"
        )
    claim = Claim(
        expect=table["expect"],
        metric=str(table.get("metric", "")),
        variant=str(table.get("variant", "")),
        margin=float(table.get("margin", 0.1)),
        x=str(table.get("x", "")),
        y=str(table.get("y", "")),
        max_r=float(table.get("max-r", 0.5)),
        source=str(table.get("source", "")),
    )
    for name in claim.metric_names():
        if name not in KNOWN:
            raise ConfigError(
                f"study spec {path}: claim {claim.title()!r}: unknown metric {name!r}; one of {list(KNOWN)}"
            )
    return claim


def parse_variant(spec: StudySpec, name: str, world_size: int = 1):
    """The RunConfig of a variant's first run, as the runner will run it (its --save and --log-file
    are placeholders here: nothing is written); a one-line ConfigError naming the variant."""
    from megatron_moe_reg.training.arguments import parse_args

    captured = io.StringIO()
    owned = ["--save", str(spec.path.parent / "study-run"), "--log-file", str(spec.path.parent / "log")]
    try:
        with contextlib.redirect_stderr(captured):
            return parse_args([*spec.flags(name, spec.seeds[0]), *owned], world_size=world_size)
    except ConfigError as e:
        raise ConfigError(f"study spec {spec.path}: variant {name!r}: {e}") from None
    except SystemExit:  # the flag parser's own error (an unknown flag, a bad value)
        message = captured.getvalue().strip().splitlines()[-1:] or ["its flags do not parse"]
        raise ConfigError(f"study spec {spec.path}: variant {name!r}: {message[0]}") from None


def _check(spec: StudySpec, world_size: int) -> None:
    if spec.baseline not in spec.variants:
        raise ConfigError(f"study spec {spec.path}: no baseline variant {spec.baseline!r} in [variants]")
    if len(spec.variants) < 2:
        raise ConfigError(f"study spec {spec.path}: a study compares at least two variants")
    for claim in spec.claims:
        for name in claim.metric_names():
            if name not in spec.family():
                raise ConfigError(
                    f"study spec {spec.path}: claim {claim.title()!r}: {name!r} is compared only on request; "
                    f'add it to [study] metrics = ["{name}"]'
                )
        if claim.expect != "uncorrelated" and (claim.variant not in spec.variants or claim.variant == spec.baseline):
            raise ConfigError(
                f"study spec {spec.path}: claim {claim.title()!r}: variant must name a variant other than the baseline"
            )
    for name, flags in [("base", spec.base), *spec.variants.items()]:
        owned = [f for f in flags if f.split("=")[0] in OWNED]
        if owned:
            raise ConfigError(f"study spec {spec.path}: {name} sets {owned[0]}; the study sets it for each run")
    configs = {name: dataclasses.asdict(parse_variant(spec, name, world_size)) for name in spec.variants}
    if spec.adapt:
        _check_domain(spec, configs[spec.baseline]["data"])
    for name, config in configs.items():
        if name != spec.baseline and config == configs[spec.baseline]:
            raise ConfigError(
                f"study spec {spec.path}: variant {name!r} configures the same run as the baseline; "
                "give it flags that differ"
            )


def _check_domain(spec: StudySpec, data: dict) -> None:
    """The adapt domain must be among the domains of the data adapt reads (the runs' validation data)."""
    import json

    prefixes = [p for p in (data.get("valid_data_path") or data.get("data_path") or []) if not _is_number(p)]
    if not prefixes:
        raise ConfigError(f"study spec {spec.path}: [adapt] needs runs trained on data with domains (not --mock-data)")
    names: set[str] = set()
    for prefix in prefixes:
        domains = Path(prefix + ".domains.json")
        if domains.is_file():
            names |= set(json.loads(domains.read_text())["names"])
    if names and spec.adapt["domain"] not in names:
        raise ConfigError(
            f"study spec {spec.path}: [adapt] domain {spec.adapt['domain']!r} is not in the validation data "
            f"({', '.join(sorted(names)[:12])}{' ...' if len(names) > 12 else ''})"
        )


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
