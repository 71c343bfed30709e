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
def test_quantile_balancing_in_megatron_lms_loop_with_the_plugin():
    proc = run_megatron_lm([*MEGATRON_LM_MODEL, *QB, "--moe-router-type", "spectral", "--train-iters", "3",
                            "--moe-specialization-loss-coeff", "1e-2", "--moe-coupling-loss-coeff", "1e-2",
                            "--no-bias-swiglu-fusion"])
    values = plugin_lines(proc.stdout)
    assert sorted(values) == [1, 2, 3] and all(v["specialization_loss"] > 0 for v in values.values())


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
    probs.sum().backward()
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
