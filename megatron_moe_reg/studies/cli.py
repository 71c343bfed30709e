"""``moe-reg study SPEC.toml [--out DIR] [--parallel N] [--dry-run] [--report-only]``."""

from __future__ import annotations

from pathlib import Path

from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.flags import OneLineErrorParser


def main(argv: list[str]) -> int:
    from megatron_moe_reg.studies.report import write_report
    from megatron_moe_reg.studies.runner import check_pinned, run_study
    from megatron_moe_reg.studies.spec import load_spec

    p = OneLineErrorParser(prog="moe-reg study", description="Paired-seed study of variants of a run.")
    p.add_argument("spec", help="the study's TOML specification")
    p.add_argument("--out", help="study directory (default: runs/study-NAME)")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (the CPU cores are split)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and an estimate of the wall time")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs")
    a = p.parse_args(argv)
    if a.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {a.parallel}")
    spec = load_spec(a.spec)
    out = Path(a.out or f"runs/study-{spec.name}")
    if a.report_only:
        check_pinned(spec, out)
    else:
        run_study(spec, out, parallel=a.parallel, dry_run=a.dry_run)
    if a.dry_run:
        return 0
    report = write_report(spec, out)
    print(f"study: report in {out / 'report.md'} ({report['seeds']} seeds)")
    return 0
