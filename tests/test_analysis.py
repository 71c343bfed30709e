"""``moe-reg analyze``: a report from checkpoints of any layout and router, on real validation data."""

import json
import re
from pathlib import Path

import pytest
import torch

from helpers import TINY_MODEL, data_flags, pretrain, run_cli, without

pytestmark = pytest.mark.multiprocess

MODEL = without(TINY_MODEL, "--vocab-size", "--num-layers") + ["--num-layers", "4"]
ANALYZE = ["--num-tokens", "1024", "--sample-tokens", "64"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, embedded_dataset):
    out = tmp_path_factory.mktemp("analysis")
    data = data_flags(embedded_dataset)
    train = ["--train-iters", "6", "--micro-batch-size", "4", "--global-batch-size", "8"]
    pretrain(out, "topk", train + ["--save", str(out / "topk"), "--save-interval", "3"], data=data, model=MODEL)
    # the same weights written by 4 processes with EP=2 and PP=2
    pretrain(out, "resaved", ["--load", str(out / "topk"), "--finetune", "--train-iters", "0", "--lr-decay-iters", "4",
                              "--micro-batch-size", "4", "--global-batch-size", "8",
                              "--expert-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                              "--save", str(out / "ep2pp2")], nproc=4, data=data, model=MODEL)
    pretrain(out, "ermoe", train + ["--moe-router-type", "ermoe", "--moe-eigen-rank", "4",
                                    "--expert-model-parallel-size", "2", "--save", str(out / "ermoe")],
             nproc=2, data=data, model=MODEL)
    return out


def _tree(path: str | Path) -> dict:
    """Every file under ``path`` with its size, modification time and content digest."""
    import hashlib

    return {str(f.relative_to(path)): (f.stat().st_size, f.stat().st_mtime_ns, hashlib.sha1(f.read_bytes()).digest())
            for f in sorted(Path(path).rglob("*")) if f.is_file()}


def _analyze(out: Path, loads: list[str], labels: list[str], name: str) -> dict:
    args = ["analyze", *[x for load in loads for x in ("--load", load)],
            *[x for label in labels for x in ("--label", label)], *ANALYZE, "--out", str(out / name)]
    before = [_tree(load) for load in loads]
    run_cli(args)
    assert [_tree(load) for load in loads] == before  # a checkpoint it reads is never written
    return json.loads((out / name / "metrics.json").read_text())


def test_report_compares_checkpoints_and_links_existing_images(checkpoints):
    out = checkpoints
    report = _analyze(out, [str(out / "topk"), str(out / "ermoe")], ["baseline", "eigen"], "report")
    assert set(report["summary"]) == {"baseline", "eigen"}
    base = report["checkpoints"]["baseline"]
    assert base["router_type"] == "topk" and report["checkpoints"]["eigen"]["router_type"] == "ermoe"
    assert base["num_tokens"] == 1024 and len(base["layers"]) == 4 and len(base["transitions"]) == 3
    assert len(base["domain_names"]) > 3  # real domains of the embedded corpus
    assert report["checkpoints"]["eigen"]["num_tokens"] == 1024  # the same tokens
    for layer in base["layers"]:
        assert 0 < layer["routing_entropy"] <= 1 and 0 <= layer["expert_domain_nmi"] <= 1
        assert sum(layer["load_share"]) == pytest.approx(1.0)
        assert sum(map(sum, layer["expert_domain_counts"])) == 1024
        assert 0 <= layer["coactivation_overlap"] <= 1 and -1 <= layer["pes"] <= 1
    for t in base["transitions"]:
        assert sum(map(sum, t["counts"])) == 1024 and t["mutual_information"] >= 0
        assert 0 < t["predicted_load_cosine"] <= 1 and -1 <= t["predicted_load_spearman"] <= 1
        assert 0 <= t["predicted_topk_overlap"] <= 1
    assert "predicted_topk_overlap" in report["summary"]["eigen"]
    page = (out / "report" / "index.html").read_text()
    images = re.findall(r'src="([^"]+)"', page)
    assert any("transition" in i for i in images) and any("expert_domain" in i for i in images)
    assert any(i.startswith("eigen_") for i in images) and any(i.startswith("baseline_") for i in images)
    assert all((out / "report" / i).is_file() and (out / "report" / i).stat().st_size > 1000 for i in images)


def test_an_iteration_directory_is_evaluated_at_that_iteration(checkpoints):
    out = checkpoints
    latest = _analyze(out, [str(out / "topk")], ["x"], "single")["checkpoints"]["x"]
    earlier = _analyze(out, [str(out / "topk" / "iter_0000003")], ["x"], "iter3")["checkpoints"]["x"]
    assert (latest["iteration"], earlier["iteration"]) == (6, 3)
    assert earlier["lm_loss"] != latest["lm_loss"]


@pytest.mark.compat
def test_report_does_not_depend_on_the_saved_layout(checkpoints):
    out = checkpoints
    one = _analyze(out, [str(out / "topk")], ["x"], "single")["checkpoints"]["x"]
    many = _analyze(out, [str(out / "ep2pp2")], ["x"], "ep2pp2-report")["checkpoints"]["x"]
    skip = {"checkpoint", "iteration"}
    for key, value in one.items():
        if key in skip:
            continue
        if key in ("layers", "transitions"):
            for a, b in zip(value, many[key], strict=False):
                for name, v in a.items():
                    assert b[name] == (pytest.approx(v, rel=1e-5, abs=1e-7) if isinstance(v, float) else v), name
        elif isinstance(value, float):
            assert many[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        else:
            assert many[key] == value, key


def test_bad_input_is_one_line(tmp_path):
    proc = run_cli(["analyze", "--load", str(tmp_path / "missing"), "--out", str(tmp_path / "r")], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--load" in proc.stderr


def _adapt(out: Path, name: str, extra: list[str], data: str, check: bool = True):
    args = ["adapt", "--load", str(out / "topk"), "--data-path", data, "--train-iters", "8", "--lr", "3e-3",
            "--num-tokens", "1024", "--out", str(out / name), *extra]
    before = _tree(out / "topk")
    proc = run_cli(args, check=check)
    assert _tree(out / "topk") == before  # a checkpoint it reads is never written
    return proc if not check else json.loads((out / name / "adapt.json").read_text())


def _largest_domain(manifest: dict) -> str:
    meta = json.loads(Path(manifest["train_data_path"] + ".domains.json").read_text())
    counts = {}
    for d in meta["document_domains"]:
        counts[d] = counts.get(d, 0) + 1
    return meta["names"][max(counts, key=counts.get)]


def test_adapt_changes_only_the_chosen_experts_and_is_deterministic(checkpoints, embedded_dataset):
    from megatron_moe_reg.training.checkpointing import read_model_tensors

    out, data = checkpoints, embedded_dataset["train_data_path"]
    domain = _largest_domain(embedded_dataset)
    first = _adapt(out, "adapt1", ["--domain", domain, "--save", str(out / "adapted")], data)
    second = _adapt(out, "adapt2", ["--domain", domain], data)
    assert first["interference"] == second["interference"] and first["gain"] == second["gain"]
    assert len(first["experts"]) == 4  # one per MoE layer
    assert first["train_losses"][-1] < first["train_losses"][0]
    assert first["gain"]["lm_loss"] > 0  # the adapted experts learned the new domain
    before, after = read_model_tensors(str(out / "topk")), read_model_tensors(str(out / "adapted"))
    assert before.keys() == after.keys()
    chosen = {(layer - 1, expert) for layer, expert in first["experts"]}
    for key, old in before.items():
        new = after[key]
        if ".experts.experts.linear_fc" not in key:
            assert torch.equal(old, new), key
            continue
        for layer in range(old.shape[0]):
            for expert in range(old.shape[1]):
                same = torch.equal(old[layer, expert], new[layer, expert])
                assert same != ((layer, expert) in chosen), (key, layer, expert)


def test_adapt_named_experts_and_bad_domain(checkpoints, embedded_dataset):
    out, data = checkpoints, embedded_dataset["train_data_path"]
    domain = _largest_domain(embedded_dataset)
    named = _adapt(out, "named", ["--domain", domain, "--experts", "2:3", "4:0"], data)
    assert named["experts"] == [[2, 3], [4, 0]]
    proc = _adapt(out, "bad", ["--domain", "no-such-domain"], data, check=False)
    assert proc.returncode == 2 and "--domain no-such-domain" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    tracker = (out / "ermoe" / "latest_checkpointed_iteration.txt").read_bytes()
    proc = _adapt(out, "bad", ["--domain", domain, "--save", str(out / "ermoe")], data, check=False)
    assert proc.returncode == 2 and "already holds a checkpoint" in proc.stderr
    assert (out / "ermoe" / "latest_checkpointed_iteration.txt").read_bytes() == tracker


@pytest.mark.parametrize("kind", ["topk", "ermoe"])
def test_a_captured_layers_router_reroutes_its_own_inputs_exactly(kind, groups):
    """The predictability metrics' router call (``LayerCapture.route``) gives the routing the layer
    made in its forward, and is not captured itself."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_moe_reg.analysis.evaluate import LayerCapture
    from megatron_moe_reg.config import PluginConfig
    from megatron_moe_reg.routers import ROUTERS

    torch.manual_seed(0)
    config = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=4, num_moe_experts=6,
                               moe_router_topk=2, moe_router_dtype="fp32", use_cpu_initialization=True,
                               add_bias_linear=False)
    extra = {"moe_eigen_rank": 3} if kind == "ermoe" else {}
    router = ROUTERS[kind](config=config, pg_collection=groups, plugin=PluginConfig(moe_router_type=kind, **extra))
    router.set_layer_number(1)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = router

        def forward(self, hidden_states):
            return self.router(hidden_states)

    layer = Layer().eval()
    capture = LayerCapture(layer)
    with torch.no_grad():
        layer(torch.randn(7, 3, 16))
        rerouted = capture.route(torch.cat(capture.inputs))
    assert len(capture.maps) == 1 and torch.equal(rerouted, capture.routing_map())
    capture.remove()
