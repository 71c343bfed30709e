"""``moe-reg study``: a bad spec is one line before any run; a tiny study (2 variants x 2 seeds x 2
steps) runs end to end with a report of every section; restarted after an interruption it redoes no
finished run and resumes the interrupted one from its checkpoint."""

import json

import pytest

from helpers import TINY_MODEL, run_cli

BASE = [
    *TINY_MODEL,
    "--mock-data",
    "--train-iters",
    "2",
    "--lr-warmup-iters",
    "0",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "2",
    "--save-interval",
    "1",
]


def _spec(path, variants, seeds=(1, 2), base=BASE, extra=""):
    lines = [
        "[study]",
        f"base = {json.dumps(base)}",
        f"seeds = {list(seeds)}",
        "eval-tokens = 64",
        "metrics-tokens = 16",
        extra,
        "[variants]",
    ]
    lines += [f"{name} = {json.dumps(flags)}" for name, flags in variants.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


BAD = {
    "unknown flag": ({"baseline": [], "x": ["--moe-no-such-flag", "1"]}, (1, 2), "variant 'x'"),
    "no baseline": ({"a": [], "b": ["--lr", "2e-3"]}, (1, 2), "no baseline variant"),
    "one seed": ({"baseline": [], "b": ["--lr", "2e-3"]}, (1,), "at least two seeds"),
    "same as the base": ({"baseline": [], "b": ["--lr", "1e-3"]}, (1, 2), "same run as the baseline"),
    "owned flag": ({"baseline": [], "b": ["--seed", "3"]}, (1, 2), "the study sets it"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_spec_is_one_line_before_any_run(case, tmp_path, capsys):
    from megatron_moe_reg.cli import main

    variants, seeds, message = BAD[case]
    spec = _spec(tmp_path / "s.toml", variants, seeds)
    assert main(["study", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.multiprocess
def test_tiny_study_runs_reports_and_resumes(tmp_path):
    spec = _spec(tmp_path / "s.toml", {"baseline": [], "R_sp": ["--moe-specialization-loss-coeff", "2e-3"]})
    out = tmp_path / "out"
    dry = run_cli(["study", str(spec), "--out", str(out), "--dry-run"])
    assert "4 of 4 runs to go" in dry.stdout and not out.exists()
    run_cli(["study", str(spec), "--out", str(out)], timeout=900)
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == 2 and set(report["variants"]) == {"baseline", "R_sp"}
    comparison = report["comparisons"]["R_sp"]
    assert {
        "validation loss",
        "perplexity",
        "routing entropy",
        "co-activation overlap",
        "PES",
        "activation MSO",
        "load CV",
        "dead experts",
        "pathway MI",
    } <= set(comparison)
    for entry in comparison.values():
        assert {"mean_diff", "ci_low", "ci_high", "p_t", "p_holm", "detectable", "words"} <= set(entry)
    text = (out / "report.md").read_text()
    assert "| validation loss |" in text and "R_sp against baseline" in text and (out / "index.html").is_file()
    # an interruption: one run lost its finished marker after its last checkpoint
    finished = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/done.json")}
    interrupted = out / "runs" / "R_sp" / "seed2"
    (interrupted / "done.json").unlink()
    run_cli(["study", str(spec), "--out", str(out)], timeout=900)
    for path, mtime in finished.items():
        if path.parent != interrupted:
            assert path.stat().st_mtime_ns == mtime, path  # not redone
    log = (interrupted / "pretrain.log").read_text()
    assert "loaded checkpoint" in log and (interrupted / "done.json").is_file()  # resumed from its own checkpoint
    resumed = [json.loads(line) for line in (interrupted / "log.jsonl").read_text().splitlines() if line.strip()]
    assert len([r for r in resumed if "lm loss" in r]) == 2  # its two steps, none run again after resuming
