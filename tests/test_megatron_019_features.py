"""megatron-core 0.19's routing features with the plugin: quantile balancing (it forbids Megatron's aux
loss; the plugin's losses must not trip that check), router replay (every router keeps non-zero router
gradients on replayed top-k choices) and padding masks (losses and metrics skip padded tokens)."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_moe_reg.config import ROUTER_TYPES, PluginConfig
from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.training.arguments import parse_args
from megatron_moe_reg.training.input_checks import check_run_inputs

from helpers import (
    MEGATRON_LM_MODEL,
    MOCK,
    PARSE_BASE,
    ROOT,
    TINY_MODEL,
    checkpoint_tensors,
    megatron_lm_available,
    plugin_lines,
    read_metrics,
    run_cli,
    run_megatron_lm,
    run_script,
)


def _mcore_019() -> bool:
    from megatron.core import package_info

    return tuple(int(p) for p in package_info.__version__.split(".")[:2]) >= (0, 19)


needs_019 = pytest.mark.skipif(not _mcore_019(), reason="a megatron-core 0.19 feature")
QB = ["--moe-router-load-balancing-type", "quantile_balancing"]
E, H, K = 6, 32, 2


def test_quantile_balancing_options_are_checked_in_one_line():
    if not _mcore_019():
        with pytest.raises(ConfigError, match="quantile_balancing needs megatron-core 0.19"):
            parse_args([*PARSE_BASE, *QB, "--moe-aux-loss-coeff", "0"], world_size=1)
        return
    with pytest.raises(ConfigError, match="forbids Megatron's aux loss: set --moe-aux-loss-coeff 0"):
        parse_args([*PARSE_BASE, *QB, "--moe-aux-loss-coeff", "1e-2"], world_size=1)
    parse_args([*PARSE_BASE, *QB, "--moe-aux-loss-coeff", "0", "--moe-specialization-loss-coeff", "1e-2"],
               world_size=1)


@needs_019
@pytest.mark.compat
@pytest.mark.multiprocess
def test_quantile_balancing_trains_with_the_plugin_losses_under_ep2(tmp_path):
    log = tmp_path / "r.jsonl"
    run_cli(["pretrain", *TINY_MODEL, *MOCK, *QB, "--moe-aux-loss-coeff", "0", "--moe-router-type", "spectral",
             "--moe-specialization-loss-coeff", "1e-2", "--moe-coupling-loss-coeff", "1e-2",
             "--moe-router-stable-rank-coeff", "1e-2", "--expert-model-parallel-size", "2",
             "--moe-token-dispatcher-type", "alltoall", "--train-iters", "3", "--log-file", str(log),
             "--save", str(tmp_path / "ck")], nproc=2)
    steps = read_metrics(log)
    assert [s["iteration"] for s in steps] == [1, 2, 3]
    assert all(s["specialization_loss"] > 0 and s["coupling_loss"] < 0 for s in steps)
    assert all(torch.isfinite(torch.tensor(s["lm loss"])) for s in steps) and "load_balancing_loss" not in steps[0]
    tensors = checkpoint_tensors(tmp_path / "ck" / "iter_0000003")
    (beta,) = [v for k, v in tensors.items() if k.endswith("router.qb_beta")]  # [layers, experts]
    assert beta.shape == (2, 4) and (beta.abs().sum(-1) > 0).all()  # every layer's bias was updated


@needs_019
@pytest.mark.compat
@pytest.mark.multiprocess
@pytest.mark.skipif(not megatron_lm_available(), reason="needs megatron.training (0.19+) or MEGATRON_LM_PATH")
def test_quantile_balancing_in_megatron_lms_loop_with_the_plugin(tmp_path):
    """Also: Megatron-LM's own router tracer records the plugin's router."""
    proc = run_megatron_lm([*MEGATRON_LM_MODEL, *QB, "--moe-router-type", "spectral", "--train-iters", "3",
                            "--moe-specialization-loss-coeff", "1e-2", "--moe-coupling-loss-coeff", "1e-2",
                            "--no-bias-swiglu-fusion", "--moe-routing-trace-path", str(tmp_path / "trace")])
    values = plugin_lines(proc.stdout)
    assert sorted(values) == [1, 2, 3] and all(v["specialization_loss"] > 0 for v in values.values())
    records = [json.loads(line) for line in (tmp_path / "trace" / "router_trace_rank0.jsonl").read_text().splitlines()]
    assert sorted((r["step"], r["layer"]) for r in records) == [(s, la) for s in range(3) for la in (0, 1)
                                                                 for _ in range(2)]  # 2 micro-batches
    assert all(r["topk"] == 2 and r["num_tokens"] == 2 * 32 for r in records)


def _router(kind, pg, **config_options):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_moe_reg.routers import ROUTERS

    config = TransformerConfig(num_layers=2, hidden_size=H, num_attention_heads=4, num_moe_experts=E,
                               moe_router_topk=K, moe_router_dtype="fp32", use_cpu_initialization=True,
                               add_bias_linear=False, **config_options)
    extra = {"ermoe": {"moe_eigen_rank": 4}, "emoe": {"moe_eigen_rank": 4}}.get(kind, {})
    router = ROUTERS[kind](config=config, pg_collection=pg, plugin=PluginConfig(moe_router_type=kind, **extra,
                                                                                  moe_router_stable_rank_coeff=1e-2))
    router.set_layer_number(1)
    return router


@needs_019
@pytest.mark.compat
@pytest.mark.parametrize("kind", ROUTER_TYPES)
def test_router_replay_routes_the_replayed_experts_with_router_gradients(kind, groups):
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    RouterReplay.clear_global_router_replay_instances()
    torch.manual_seed(0)
    router = _router(kind, groups, moe_enable_routing_replay=True)
    router.train()
    x = torch.randn(5, 3, H)
    try:
        RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
        _, recorded_map = router(x)
        (recorded,) = RouterReplay.get_recorded_data()
        target = (recorded + 1) % E  # other experts than the router would choose
        RouterReplay.set_replay_data([target])
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        probs, routing_map = router(x)
    finally:
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()
        RouterReplay.clear_global_router_replay_instances()
    expected = torch.zeros_like(routing_map).scatter_(1, target.long(), True)
    assert torch.equal(routing_map, expected) and not torch.equal(routing_map, recorded_map)
    assert (probs[routing_map] > 0).all() and torch.isfinite(probs).all()
    # a weighted sum: the top-k probabilities of a token sum to 1, so probs.sum() has no gradient
    (probs * torch.randn(probs.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    grads = {n: p.grad for n, p in router.named_parameters()}
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


@needs_019
@pytest.mark.compat
@pytest.mark.multiprocess
def test_losses_and_metrics_skip_padded_tokens(tmp_path):
    """A right-padded batch (causal attention: the real tokens never see the padding): the plugin's
    losses and routing metrics do not change when the padded tokens do, and do without the mask."""
    out = tmp_path / "values.json"
    flags = [*TINY_MODEL, *MOCK, "--moe-specialization-loss-coeff", "1e-2", "--moe-coupling-loss-coeff", "1e-2",
             "--moe-router-stable-rank-coeff", "1e-2", "--micro-batch-size", "2"]
    run_script(ROOT / "tests" / "padding_probe.py", [str(out), *flags])
    values = json.loads(out.read_text())
    masked, masked_other, unmasked = values["masked"], values["masked_other_padding"], values["unmasked"]
    names = [n for n in masked if n.split("_layer_")[0] in ("specialization_loss", "coupling_loss",
                                                              "routing_entropy", "load_max_violation")]
    assert {"specialization_loss", "coupling_loss", "routing_entropy"} <= set(names), sorted(masked)
    assert all(masked[n] == pytest.approx(masked_other[n], rel=1e-6, abs=1e-9) for n in names), values
    assert any(masked[n] != pytest.approx(unmasked[n], rel=1e-4) for n in names), values


TRACE_MODULE_PRESENT = _mcore_019()


@pytest.mark.compat
def test_routing_trace_options_are_checked_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="--moe-routing-trace-capture-logits needs --moe-routing-trace-path DIR"):
        parse_args([*PARSE_BASE, "--moe-routing-trace-capture-logits"], world_size=1)
    trace = ["--moe-routing-trace-path", str(tmp_path / "trace")]
    if not _mcore_019():
        with pytest.raises(ConfigError, match="--moe-routing-trace-path needs megatron-core 0.19"):
            parse_args([*PARSE_BASE, *trace], world_size=1)
        return
    parse_args([*PARSE_BASE, *trace, "--moe-routing-trace-capture-hidden-states"], world_size=1)
    with pytest.raises(ConfigError, match="--moe-routing-trace-max-training-iters must be >= 1, got 0"):
        parse_args([*PARSE_BASE, *trace, "--moe-routing-trace-max-training-iters", "0"], world_size=1)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="is a file; give a directory"):
        check_run_inputs(parse_args([*PARSE_BASE, "--moe-routing-trace-path", str(tmp_path / "a_file")], world_size=1))
    earlier = tmp_path / "trace" / "router_trace_rank0.jsonl"
    earlier.parent.mkdir()
    earlier.write_text('{"step": 0}\n')
    with pytest.raises(ConfigError, match="holds an earlier run's router_trace_rank0.jsonl, which this run, starting "
                                          "at iteration 0, would overwrite; give a new directory, or resume"):
        check_run_inputs(parse_args([*PARSE_BASE, *trace], world_size=1))
    ck = tmp_path / "ck"
    (ck / "iter_0000002").mkdir(parents=True)
    (ck / "iter_0000002" / "metadata.json").write_text("{}")
    (ck / "latest_checkpointed_iteration.txt").write_text("2")
    check_run_inputs(parse_args([*PARSE_BASE, *trace, "--load", str(ck)], world_size=1))  # a resumed run continues
    with pytest.raises(ConfigError, match="would overwrite"):
        check_run_inputs(parse_args([*PARSE_BASE, *trace, "--load", str(ck), "--finetune"], world_size=1))
    (tmp_path / "trace" / "hidden_states_rank0.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ConfigError, match="holds an earlier trace's hidden_states_rank0.bin; give a new directory"):
        check_run_inputs(parse_args([*PARSE_BASE, *trace, "--load", str(ck)], world_size=1))
    assert earlier.read_text() == '{"step": 0}\n'  # untouched
    assert (tmp_path / "trace" / "hidden_states_rank0.bin").read_bytes() == b"\0" * 8


def test_a_resumed_trace_keeps_the_records_before_its_checkpoint(tmp_path):
    from megatron_moe_reg.training.routing_trace import _earlier_records

    path = tmp_path / "router_trace_rank0.jsonl"
    lines = [json.dumps({"step": s, "layer": la, "top_indices": [[0, 1]]}) for s in range(3) for la in (0, 1)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 3, "layer": 0, "top_ind')  # a write cut short
    assert _earlier_records(str(path), 2) == [line + "\n" for line in lines[:4]]
    assert _earlier_records(str(path), 9) == [line + "\n" for line in lines]
    assert _earlier_records(str(path), 0) == [] and _earlier_records(str(tmp_path / "none"), 2) == []


def _trace_records(directory) -> dict[int, list[dict]]:
    return {rank: [json.loads(line) for line in (directory / f"router_trace_rank{rank}.jsonl").read_text().splitlines()]
            for rank in (0, 1)}


def _window_counts(records: list[dict], steps: range, layers: int, experts: int) -> torch.Tensor:
    counts = torch.zeros(layers, experts)
    for r in records:
        if r["step"] in steps:
            counts[r["layer"]] += torch.bincount(torch.tensor(r["top_indices"]).flatten(), minlength=experts)
    return counts


@needs_019
@pytest.mark.compat
@pytest.mark.multiprocess
def test_routing_traces_hold_each_training_forward_once_in_megatrons_format(tmp_path):
    """PP 2 with full recompute, 2 micro-batches and evaluation, the ERMoE router: one record per
    (step, MoE layer, micro-batch) with global layer numbers, whose expert counts are the plugin's load
    metrics; a resumed run keeps the steps before its checkpoint and appends the rest."""
    trace, ck, log = tmp_path / "trace", tmp_path / "ck", tmp_path / "r.jsonl"
    flags = [*TINY_MODEL, *MOCK, "--num-layers", "4", "--pipeline-model-parallel-size", "2", "--global-batch-size",
             "8", "--micro-batch-size", "4", "--recompute-granularity", "full", "--recompute-method", "uniform",
             "--recompute-num-layers", "1", "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "2",
             "--moe-router-type", "ermoe", "--moe-eigen-rank", "4", "--moe-routing-trace-path", str(trace),
             "--save", str(ck), "--save-interval", "2", "--log-file", str(log)]
    run_cli(["pretrain", *flags, "--train-iters", "4"], nproc=2)
    records = _trace_records(trace)
    for rank, layers in ((0, (0, 1)), (1, (2, 3))):
        keys = [(r["step"], r["layer"]) for r in records[rank]]
        assert sorted(keys) == sorted((s, la) for s in range(4) for la in layers for _ in range(2)), rank
        for r in records[rank]:
            assert (r["rank"], r["block"], r["num_tokens"], r["topk"]) == (rank, "decoder", 4 * 32, 2)
            assert all(len(set(row)) == 2 and 0 <= min(row) and max(row) < 4 for row in r["top_indices"])
    logged = [m for m in read_metrics(log) if "load_max_layer_0" in m]
    assert [m["iteration"] for m in logged] == [2, 4]
    everything = records[0] + records[1]
    for m, steps in zip(logged, (range(0, 2), range(2, 4)), strict=True):
        counts = _window_counts(everything, steps, 4, 4)
        assert counts.sum() == 2 * 2 * 8 * 32 * 4  # steps x micro-batches x (4 x 32 tokens) x k x layers
        assert counts.amax(1).tolist() == [m[f"load_max_layer_{i}"] for i in range(4)]
        assert counts.amin(1).tolist() == [m[f"load_min_layer_{i}"] for i in range(4)]
    earlier = [line for line in (trace / "router_trace_rank0.jsonl").read_text().splitlines()
               if json.loads(line)["step"] < 2]
    run_cli(["pretrain", *flags, "--train-iters", "6", "--load", str(ck), "--ckpt-step", "2",
             "--moe-routing-trace-dump-weights"], nproc=2)
    resumed = _trace_records(trace)
    assert (trace / "router_trace_rank0.jsonl").read_text().splitlines()[:len(earlier)] == earlier
    for rank, layers in ((0, (0, 1)), (1, (2, 3))):
        keys = [(r["step"], r["layer"]) for r in resumed[rank]]
        assert sorted(keys) == sorted((s, la) for s in range(6) for la in layers for _ in range(2)), rank
