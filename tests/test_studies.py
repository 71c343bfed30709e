"""``moe-reg study``: a bad spec is one line before any run; a tiny study (2 variants x 2 seeds x 2
steps) runs end to end with a report of every section; restarted after an interruption it redoes no
finished run and resumes the interrupted one from its checkpoint."""

import json
import math
import subprocess
import sys
from pathlib import Path

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
    "claim on an unknown metric": ({"baseline": [], "b": ["--lr", "2e-3"]}, (1, 2), "unknown metric 'speed'",
                                   '[[claims]]\nvariant = "b"\nmetric = "speed"\nexpect = "lower"'),
    "claim on the baseline": ({"baseline": [], "b": ["--lr", "2e-3"]}, (1, 2), "other than the baseline",
                              '[[claims]]\nvariant = "baseline"\nmetric = "PES"\nexpect = "lower"'),
    "claim without expect": ({"baseline": [], "b": ["--lr", "2e-3"]}, (1, 2), "needs expect",
                             '[[claims]]\nvariant = "b"\nmetric = "PES"'),
    "adapt without a domain": ({"baseline": [], "b": ["--lr", "2e-3"]}, (1, 2), "[adapt] needs domain",
                               "[adapt]\ntrain-iters = 2"),
    "adapt on mock data": ({"baseline": [], "b": ["--lr", "2e-3"]}, (1, 2), "not --mock-data",
                           '[adapt]\ndomain = "email"'),
    "claim on an optional metric not asked for": (
        {"baseline": [], "b": ["--lr", "2e-3"]}, (1, 2), 'add it to [study] metrics = ["router SVD entropy"]',
        '[[claims]]\nvariant = "b"\nmetric = "router SVD entropy"\nexpect = "higher"'),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_spec_is_one_line_before_any_run(case, tmp_path, capsys):
    from megatron_moe_reg.cli import main

    variants, seeds, message, *tail = BAD[case]
    spec = _spec(tmp_path / "s.toml", variants, seeds)
    spec.write_text(spec.read_text() + "\n".join(tail) + "\n")
    assert main(["study", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("metrics", ['["speed"]', '["router SVD entropy", "router SVD entropy"]', '"PES"',
                                     '["PES"]'])
def test_bad_optional_metrics_are_one_line(metrics, tmp_path):
    from megatron_moe_reg.errors import ConfigError
    from megatron_moe_reg.studies.spec import load_spec

    spec = _spec(tmp_path / "s.toml", {"baseline": [], "b": ["--lr", "2e-3"]}, extra=f"metrics = {metrics}")
    with pytest.raises(ConfigError, match=r"\[study\] metrics must list distinct optional metrics"):
        load_spec(spec)


def _fake_run(where: Path, kappa: float, entropy: float) -> None:
    """A finished run's files as the study reads them (two MoE layers, one transition)."""
    layer = {"routing_entropy": entropy, "router_condition_number": kappa, "router_svd_entropy": entropy,
             "router_stable_rank": 2.0, "router_row_cosine_mean": 0.1}
    result = {"lm_loss": 5.0 + entropy, "perplexity": 150.0, "layers": [layer, dict(layer)],
              "transitions": [{"mutual_information": 0.1}], "iteration": 2}
    (where / "eval").mkdir(parents=True)
    (where / "eval" / "iter_0000002.json").write_text(json.dumps(result))
    (where / "eval.json").write_text(json.dumps(result))
    (where / "done.json").write_text("{}")


def test_optional_metrics_join_the_family_and_an_infinite_one_is_left_out(tmp_path):
    """Only the optional metrics a spec names are compared (and Holm-corrected with the default
    family); a metric infinite in some run (κ of a rank-deficient router) is left out, said so in
    the report, and a claim on it is inconclusive."""
    from megatron_moe_reg.studies.metrics import METRICS
    from megatron_moe_reg.studies.report import build_report, markdown
    from megatron_moe_reg.studies.runner import run_dir
    from megatron_moe_reg.studies.spec import load_spec

    claims = '[[claims]]\nvariant = "b"\nmetric = "router log condition number"\nexpect = "lower"\n'
    asked = '["router SVD entropy", "router log condition number"]'
    spec_path = _spec(tmp_path / "s.toml", {"baseline": [], "b": ["--lr", "2e-3"]}, extra=f"metrics = {asked}")
    spec_path.write_text(spec_path.read_text() + claims)
    spec = load_spec(spec_path)
    plain = load_spec(_spec(tmp_path / "plain.toml", {"baseline": [], "b": ["--lr", "2e-3"]}))
    assert plain.family() == list(METRICS)
    assert spec.family() == [*METRICS, "router SVD entropy", "router log condition number"]
    out = tmp_path / "out"
    for seed, entropy in ((1, 0.5), (2, 0.6)):
        _fake_run(run_dir(out, "baseline", seed), 4.0, entropy)
        _fake_run(run_dir(out, "b", seed), float("inf") if seed == 2 else 2.0, entropy + 0.1 * seed)
    report = build_report(spec, out)
    compared = report["comparisons"]["b"]
    assert "router SVD entropy" in compared and "router log condition number" not in compared
    assert compared["router SVD entropy"]["mean_diff"] == pytest.approx(0.15)
    assert report["left_out"] == ["router log condition number"]  # the rest is undefined in every run: silent
    assert report["claims"][0]["verdict"] == "inconclusive"
    assert "undefined or infinite" in report["claims"][0]["evidence"]
    assert "Not compared (undefined or infinite in some run):" in markdown(report)
    _fake_run(run_dir(out, "b", 3), 2.0, 0.5)  # a finite κ everywhere: the log of the geometric mean
    for seed in (1, 2):
        (run_dir(out, "b", seed) / "eval.json").write_text(
            (run_dir(out, "b", 3) / "eval.json").read_text().replace('"router_condition_number": 2.0',
                                                                       f'"router_condition_number": {seed + 1}.0'))
    compared = build_report(spec, out)["comparisons"]["b"]
    assert compared["router log condition number"]["mean_diff"] == pytest.approx(
        (math.log(2) + math.log(3)) / 2 - math.log(4))


def _valid_domain(manifest: dict) -> str:
    domains = json.loads(open(manifest["valid_data_path"] + ".domains.json").read())
    return domains["names"][domains["document_domains"][0]]


@pytest.mark.multiprocess
def test_tiny_study_runs_reports_and_resumes(tmp_path, embedded_dataset):
    from helpers import child_env, data_flags

    claims = f"""
[adapt]
domain = "{_valid_domain(embedded_dataset)}"
train-iters = 2
num-tokens = 256
micro-batch-size = 2

[[claims]]
variant = "R_sp"
metric = "co-activation overlap"
expect = "lower"

[[claims]]
variant = "R_sp"
metric = "activation MSO"
expect = "same"

[[claims]]
expect = "uncorrelated"
x = "weight MSO"
y = "activation MSO"
"""
    base = [*(f for f in BASE if f != "--mock-data"), *data_flags(embedded_dataset)]
    spec = _spec(tmp_path / "s.toml", {"baseline": [], "R_sp": ["--moe-specialization-loss-coeff", "2e-3"]}, base=base,
                 extra='metrics = ["router SVD entropy", "router log condition number"]')
    spec.write_text(spec.read_text() + claims)
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
        "weight MSO",
        "load CV",
        "dead experts",
        "pathway MI",
        "cross-layer top-k overlap",
        "predicted load cosine",
        "expert-domain NMI",
        "interference (loss)",
        "interference (accuracy)",
        "adaptation gain (loss)",
        "router SVD entropy",
        "router log condition number",
    } <= set(comparison)
    assert "router stable rank" not in comparison  # not asked for
    for entry in comparison.values():
        assert {"mean_diff", "ci_low", "ci_high", "p_t", "p_holm", "detectable", "words"} <= set(entry)
    # every checkpoint (iterations 1 and 2) evaluated on the same tokens: curves with paired differences
    curves = report["curves"]
    assert curves["baseline"]["iterations"] == [1, 2] and len(curves["R_sp"]["paired"]) == 2
    assert len(report["runs"]["weight MSO"]) == 4 and len(report["per_layer"]["R_sp"]["PES"]) == 2
    verdicts = [c["verdict"] for c in report["claims"]]
    assert len(verdicts) == 3 and verdicts[2] == "inconclusive"  # 4 runs: the interval cannot be narrow
    text = (out / "report.md").read_text()
    assert "| validation loss |" in text and "R_sp against baseline" in text and "## Claims" in text
    for image in ("curves.png", "per_layer.png", "differences.png"):
        assert (out / image).stat().st_size > 1000 and image in (out / "index.html").read_text()
    # the final checkpoint's result, from a process that loaded iteration 1 first, equals a fresh evaluation
    where = out / "runs" / "R_sp" / "seed1"
    fresh = tmp_path / "fresh.json"
    evaluate = [sys.executable, "-m", "megatron_moe_reg.analysis.evaluate", "--load", str(where / "ckpt")]
    subprocess.run([*evaluate, "--out", str(fresh), "--num-tokens", "64", "--sample-tokens", "16"],
                   env=child_env(), check=True, timeout=300)
    final, again = json.loads((where / "eval.json").read_text()), json.loads(fresh.read_text())
    assert final["iteration"] == again["iteration"] == 2
    assert final["lm_loss"] == pytest.approx(again["lm_loss"], rel=1e-6)
    assert final["layers"][0]["pes"] == pytest.approx(again["layers"][0]["pes"], rel=1e-5)
    # an interruption: one run lost its markers and its last evaluation after its last checkpoint
    finished = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/done.json")}
    interrupted = out / "runs" / "R_sp" / "seed2"
    for name in ("done.json", "trained.json", "eval/iter_0000002.json"):
        (interrupted / name).unlink()
    run_cli(["study", str(spec), "--out", str(out)], timeout=900)
    for path, mtime in finished.items():
        if path.parent != interrupted:
            assert path.stat().st_mtime_ns == mtime, path  # not redone
    log = (interrupted / "pretrain.log").read_text()
    assert "loaded checkpoint" in log and (interrupted / "done.json").is_file()  # resumed from its own checkpoint
    assert (interrupted / "eval" / "iter_0000002.json").is_file()
    resumed = [json.loads(line) for line in (interrupted / "log.jsonl").read_text().splitlines() if line.strip()]
    assert len([r for r in resumed if "lm loss" in r]) == 2  # its two steps, none run again after resuming
    # resumed with a changed base: the finished runs would mix two configurations
    spec.write_text(spec.read_text().replace('"--train-iters", "2"', '"--train-iters", "3"'))
    changed = run_cli(["study", str(spec), "--out", str(out)], check=False)
    assert changed.returncode == 2 and "started with another base" in changed.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "examples" /
                                                           "studies").glob("*.toml")))
def test_example_studies_are_valid_specs(name, monkeypatch, tmp_path, embedded_dataset):
    """Each example spec, as written (claims and [adapt] included), with the corpus paths pointed
    at a small dataset built the same way: every variant's flags parse, every claim names a metric
    and a variant, the adapt domain is one of the validation data's."""
    from megatron_moe_reg.studies.spec import load_spec

    from helpers import ROOT

    text = (ROOT / "examples" / "studies" / f"{name}.toml").read_text()
    for key, path in (("tokenizer.model", "tokenizer_model"), ("train_text_document", "train_data_path"),
                      ("valid_text_document", "valid_data_path")):
        assert f"data/stdlib/{key}" in text
        text = text.replace(f"data/stdlib/{key}", embedded_dataset[path])
    text = text.replace('domain = "email"', f'domain = "{_valid_domain(embedded_dataset)}"')
    (tmp_path / f"{name}.toml").write_text(text)
    monkeypatch.chdir(ROOT)  # their paths are the checkout's, as the README runs them
    loaded = load_spec(tmp_path / f"{name}.toml")
    assert len(loaded.seeds) >= 3 and loaded.baseline in loaded.variants and loaded.claims
    assert bool(loaded.adapt) == (name == "interference")


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


def test_the_status_line_survives_runs_that_start_and_end_while_it_is_written(tmp_path, monkeypatch, capsys):
    """Each run's thread prints the line while another run may start or end: the line iterates a
    snapshot, so a run added mid-line neither breaks the study nor shows up half-written."""
    from megatron_moe_reg.studies import runner

    progress = runner.Progress(total=3, done=1, steps=48)
    progress.running["topk/seed1"] = tmp_path / "a"

    def a_run_starts_meanwhile(log):
        progress.running.setdefault("topk/seed2", tmp_path / "b")
        return 5

    monkeypatch.setattr(runner, "_steps_done", a_run_starts_meanwhile)
    progress.show()
    assert capsys.readouterr().out.strip() == "study: 1/3 runs done; topk/seed1 step 5/48"
    assert progress.line() == "study: 1/3 runs done; topk/seed1 step 5/48, topk/seed2 step 5/48"
