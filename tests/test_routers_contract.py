"""Every router: Megatron's routing contract, robustness, TP tags, state, and configuration errors."""

import pytest
import torch

from megatron_moe_reg.config import ROUTER_TYPES, PluginConfig
from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.routers import ROUTERS
from megatron_moe_reg.training.arguments import parse_args

from helpers import PARSE_BASE

pytestmark = pytest.mark.compat

E, H, K = 6, 32, 2
STATE = {"topk": {"weight"}, "spectral": {"weight", "gain", "power_u", "power_v"},
         "prototype": {"weight", "log_temperature"}, "ermoe": {"basis_raw"},
         "emoe": {"basis_raw", "ownership", "gamma", "offset"}}
POWER = {"power_u", "power_v"}  # kept only by routers that need sigma_max (penalties, spectral)


def _router(kind, pg, sequence_parallel=False, **plugin):
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=2, hidden_size=H, num_attention_heads=4, num_moe_experts=E,
                               moe_router_topk=K, moe_router_dtype="fp32", use_cpu_initialization=True,
                               add_bias_linear=False, moe_aux_loss_coeff=1e-2)
    extra = {"ermoe": {"moe_eigen_rank": 4}, "emoe": {"moe_eigen_rank": 4}}.get(kind, {})
    cfg = PluginConfig(moe_router_type=kind, **{**extra, **plugin})
    router = ROUTERS[kind](config=config, pg_collection=pg, plugin=cfg)
    router.set_layer_number(1)
    return router


@pytest.mark.parametrize("kind", ROUTER_TYPES)
def test_routing_contract(kind, groups):
    torch.manual_seed(0)
    router = _router(kind, groups, moe_router_stable_rank_coeff=1e-2)
    router.train()
    for x in (torch.randn(5, 3, H), torch.zeros(5, 3, H), torch.full((5, 3, H), 1e-30)):
        probs, routing_map = router(x)
        assert probs.shape == (15, E) and routing_map.dtype == torch.bool
        assert (routing_map.sum(-1) == K).all()  # exactly k experts per token
        assert torch.isfinite(probs).all()
        assert (probs[routing_map] > 0).all() and (probs[~routing_map] == 0).all()
    x = torch.randn(4, 2, H, requires_grad=True)
    probs, _ = router(x)
    probs.sum().backward()
    for name, param in router.named_parameters():
        assert getattr(param, "sequence_parallel", None) is False, name  # tagged (False without SP)
    assert set(router.state_dict()) == STATE[kind] | POWER
    assert set(_router(kind, groups).state_dict()) == STATE[kind]  # no penalty: no extra state


def test_plain_topk_router_keeps_megatrons_state_dict(groups):
    from megatron.core.transformer.moe.router import TopKRouter

    plugin = _router("topk", groups)
    megatron = TopKRouter(config=plugin.config, pg_collection=groups)
    assert plugin.state_dict().keys() == megatron.state_dict().keys()


@pytest.mark.parametrize("kind", ROUTER_TYPES)
def test_bf16_parameters_route_in_fp32(kind, groups):
    router = _router(kind, groups, moe_router_spectral_penalty_coeff=1e-2).bfloat16()
    router.train()
    probs, routing_map = router(torch.randn(4, 2, H).bfloat16())
    assert torch.isfinite(probs.float()).all() and (routing_map.sum(-1) == K).all()
    if hasattr(router, "power_u"):
        assert router.power_u.dtype == torch.float32 and router.power_v.dtype == torch.float32


@pytest.mark.parametrize("kind", ROUTER_TYPES)
def test_structural_rank_is_the_routing_matrix_rank(kind, groups):
    """κ and the SVD entropy count the directions a router can have: its declared structural rank
    (EMoE: E = 6 directions in a 4-dim basis) is the routing matrix's rank, and without one the
    matrix has full rank min(E·rows, H)."""
    from megatron_moe_reg.metrics.geometry import router_geometry

    torch.manual_seed(0)
    router = _router(kind, groups)
    W = router.penalty_matrix().detach().double()
    declared = router.penalty_matrix_rank()
    assert int(torch.linalg.matrix_rank(W, rtol=1e-5)) == (declared or min(W.shape))  # fp32 rounding: not a rank
    singular = torch.linalg.svdvals(W)[: declared or min(W.shape)]
    kappa = router_geometry(router.penalty_matrix().detach(), declared)["router_condition_number"]
    assert kappa == pytest.approx(float(singular[0] / singular[-1]), rel=1e-6)
    assert (declared is not None) == (kind == "emoe")


def test_sequence_parallel_tags_new_parameters(groups):
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=2, hidden_size=H, num_attention_heads=4, num_moe_experts=E,
                               moe_router_topk=K, use_cpu_initialization=True, sequence_parallel=True,
                               tensor_model_parallel_size=2, add_bias_linear=False)  # read by the routers only
    for kind in ROUTER_TYPES:
        extra = {"moe_eigen_rank": 4} if kind in ("ermoe", "emoe") else {}
        router = ROUTERS[kind](config=config, pg_collection=groups, plugin=PluginConfig(moe_router_type=kind, **extra))
        assert all(getattr(p, "sequence_parallel", False) for p in router.parameters()), kind


def test_singular_vectors_advance_once_per_step(groups):
    router = _router("spectral", groups)
    router.train()
    router.moe_reg_step = 1
    router(torch.randn(3, 2, H))
    u1 = router.power_u.clone()
    top = torch.linalg.svd(router.penalty_matrix().detach().double())[0][:, 0]
    assert abs(float(u1.double() @ top)) == pytest.approx(1.0, abs=1e-6)  # the top left singular vector
    with torch.no_grad():
        router.weight.add_(0.1 * torch.randn_like(router.weight))  # as an optimizer step would
    router(torch.randn(3, 2, H))  # another micro-batch of the same step: same vectors
    assert torch.equal(router.power_u, u1)
    router.moe_reg_step = 2
    router(torch.randn(3, 2, H))
    assert not torch.equal(router.power_u, u1)


MOCK = PARSE_BASE  # mock data, 8 experts, the small-model style


@pytest.mark.parametrize("argv, message", [
    (["--moe-router-type", "ermoe", "--moe-eigen-rank", "300", "--hidden-size", "256"],
     "--moe-eigen-rank 300 must be between 1 and --hidden-size 256"),
    (["--moe-router-type", "ermoe", "--moe-eigen-threshold", "1.5"], "--moe-eigen-threshold must be in [0, 1]"),
    (["--moe-router-type", "emoe", "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias"],
     "--moe-router-type emoe defines softmax routing"),
    (["--moe-router-type", "prototype", "--moe-z-loss-coeff", "1e-3"], "drop the z-loss"),
    (["--moe-eigen-threshold", "0.5"], "--moe-eigen-threshold applies to --moe-router-type ermoe, not topk"),
    (["--moe-router-type", "spectral", "--moe-prototype-temperature", "2"],
     "--moe-prototype-temperature applies to --moe-router-type prototype"),
    (["--moe-router-spectral-target", "2"], "--moe-router-spectral-target needs --moe-router-spectral-penalty-coeff"),
    (["--moe-router-stable-rank-coeff", "-1"], "--moe-router-stable-rank-coeff must be >= 0"),
    (["--moe-router-type", "spectral", "--moe-router-spectral-gain", "0"], "--moe-router-spectral-gain must be > 0"),
])
def test_bad_router_options(argv, message):
    with pytest.raises(ConfigError) as info:
        parse_args(MOCK + argv, world_size=1)
    assert message in str(info.value) and "\n" not in str(info.value)
