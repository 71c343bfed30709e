"""``moe-reg study``: a bad spec is one line before any run; a tiny study (2 variants x 2 seeds x 2
steps) runs end to end with a report of every section; restarted after an interruption it redoes no
finished run and resumes the interrupted one from its checkpoint."""

import json

import pytest
import torch

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


@pytest.mark.parametrize("name", ["specialization", "routers", "orthogonality"])
def test_example_studies_are_valid_specs(name, monkeypatch, tmp_path):
    """Every variant's flags parse (the corpus flags swapped for mock data: no dataset here)."""
    import tomllib

    from megatron_moe_reg.studies.spec import load_spec

    from helpers import ROOT

    raw = tomllib.loads((ROOT / "examples" / "studies" / f"{name}.toml").read_text())
    base, data = raw["study"]["base"], ("--tokenizer-model", "--train-data-path", "--valid-data-path")
    base = [v for i, v in enumerate(base) if v not in data and (i == 0 or base[i - 1] not in data)]
    assert len(base) == len(raw["study"]["base"]) - 6
    spec = _spec(tmp_path / f"{name}.toml", raw["variants"], raw["study"]["seeds"],
                 base=[*base, "--mock-data", "--vocab-size", "4096"], extra=f'baseline = "{raw["study"]["baseline"]}"')
    monkeypatch.chdir(ROOT)  # their paths are the checkout's, as the README runs them
    loaded = load_spec(spec)
    assert len(loaded.seeds) >= 3 and loaded.baseline in loaded.variants


@pytest.mark.multiprocess
def test_router_variants_share_every_other_initial_value(tmp_path):
    """At the same seed every non-router parameter is bit-identical at step 0 whatever the router
    (the eigenbasis routers draw their own parameters from a fork of the generator)."""
    from megatron_moe_reg.training.checkpointing import read_model_tensors

    from helpers import pretrain

    tensors = {}
    for router in ("topk", "spectral", "ermoe", "emoe"):
        pretrain(tmp_path, router, ["--train-iters", "0", "--lr-decay-iters", "4", "--save", str(tmp_path / router),
                                    "--moe-router-type", router], model=[*TINY_MODEL, "--mock-data"])
        tensors[router] = read_model_tensors(str(next((tmp_path / router).glob("iter_*"))))
    shared = [k for k in tensors["topk"] if "router" not in k]
    assert len(shared) >= 8  # embeddings, attention, norms, experts, output layer
    for router, values in tensors.items():
        different = [k for k in shared if not torch.equal(values[k], tensors["topk"][k])]
        assert different == [], (router, different)
