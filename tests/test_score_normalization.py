"""Sigmoid / sqrtsoftplus score normalization: Megatron's s / (Σs + 1e-20) lets a router lower the
load-balancing loss by shrinking every score (Megatron-LM #1545); the log-space normalization of
--moe-router-exact-score-normalization does not, and aux_loss_score_mass_lost shows the regime."""

import pytest
import torch
import torch.nn.functional as F

from megatron_moe_reg.config import PluginConfig
from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.losses import routing_distribution
from megatron_moe_reg.losses.routing_scores import log_softplus
from megatron_moe_reg.metrics import aux_score_mass_lost
from megatron_moe_reg.training.arguments import parse_args

from helpers import PARSE_BASE

pytestmark = pytest.mark.compat  # the router tests also against megatron-core 0.19 (sqrtsoftplus)
E, H, K = 6, 16, 2
SCORES = {"sigmoid": torch.sigmoid, "sqrtsoftplus": lambda z: F.softplus(z).sqrt()}
COLLAPSED = {"sigmoid": -60.0, "sqrtsoftplus": -120.0}  # every score below 1e-20 (fp32)
NEAR_EPS = {"sigmoid": -50.0, "sqrtsoftplus": -96.0}  # scores summing to about 1e-20: part of the mass lost


def _megatron_normalized(z, fn):
    s = SCORES[fn](z.float())
    return s / (s.sum(-1, keepdim=True) + 1e-20)


@pytest.mark.parametrize("fn", SCORES)
def test_log_space_normalization_is_megatrons_quotient_without_the_epsilon(fn):
    z = torch.randn(64, E, generator=torch.Generator().manual_seed(0)) * 4
    assert torch.allclose(routing_distribution(z, fn), _megatron_normalized(z, fn), atol=1e-7)
    collapsed = z / 4 + COLLAPSED[fn]
    assert float(_megatron_normalized(collapsed, fn).sum(-1).max()) < 0.5  # mass lost
    exact = routing_distribution(collapsed, fn)
    assert torch.allclose(exact.sum(-1), torch.ones(64), atol=1e-6)
    reference = torch.softmax(torch.log(SCORES[fn](collapsed.double())), -1)  # fp64 has no underflow here
    assert torch.allclose(exact.double(), reference, atol=1e-6)
    z64 = (torch.randn(3, E, dtype=torch.float64) * 30).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: routing_distribution(a, fn), (z64,))


def test_log_softplus_is_accurate_and_finite_everywhere():
    z = torch.linspace(-300, 40, 4001, dtype=torch.float64)
    reference = torch.log(torch.log1p(torch.exp(z)))  # fp64: exact enough down to -300
    assert float(((log_softplus(z) - reference).abs() / reference.abs()).max()) < 1e-9
    z = torch.tensor([-1e4, -200.0, -15.0, 0.0, 80.0], requires_grad=True)
    log_softplus(z).sum().backward()
    assert torch.isfinite(log_softplus(z)).all() and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("fn", SCORES)
def test_aux_score_mass_lost_is_the_share_megatron_drops(fn):
    z = torch.randn(8, E, generator=torch.Generator().manual_seed(1))
    assert float(aux_score_mass_lost(z, fn)) < 1e-18
    assert float(aux_score_mass_lost(z, "softmax")) == 0.0
    collapsed = z + COLLAPSED[fn]
    expected = 1 - _megatron_normalized(collapsed, fn).double().sum(-1)
    assert float(aux_score_mass_lost(collapsed, fn)) == pytest.approx(float(expected.mean()), rel=1e-4)
    half = torch.cat([z[:4], collapsed[4:]])  # padding mask: True = keep
    keep = torch.tensor([True] * 4 + [False] * 4)
    assert float(aux_score_mass_lost(half, fn, keep)) < 1e-18
    assert float(aux_score_mass_lost(half, fn, ~keep)) == pytest.approx(float(expected[4:].mean()), rel=1e-4)


def _router(groups, fn, exact):
    from megatron.core import package_info
    from megatron.core.transformer.transformer_config import TransformerConfig
    from packaging.version import Version

    from megatron_moe_reg.routers import ROUTERS

    if fn == "sqrtsoftplus" and Version(package_info.__version__) < Version("0.19"):
        pytest.skip("megatron-core routes with sqrtsoftplus scores from 0.19")
    config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=4, num_moe_experts=E,
                               moe_router_topk=K, moe_router_dtype="fp32", use_cpu_initialization=True,
                               add_bias_linear=False, moe_aux_loss_coeff=1.0, moe_router_score_function=fn,
                               moe_router_load_balancing_type="aux_loss")
    plugin = PluginConfig(moe_router_exact_score_normalization=exact, moe_reg_measure=False)
    router = ROUTERS["topk"](config=config, pg_collection=groups, plugin=plugin)
    router.set_layer_number(1)
    return router.train()


def _load_balancing_loss(router, logits):
    """Megatron's logged load-balancing loss (loss / coeff) of one routing call, and its gradient
    along a shift of every logit (the direction that shrinks every score)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    clear_aux_losses_tracker()
    shift = torch.zeros((), requires_grad=True)
    probs, _ = router.routing((logits + shift).reshape(-1, 1, E))
    (probs * 0).sum().backward()  # only the attached aux loss has a gradient
    value = float(get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"][0])
    clear_aux_losses_tracker()
    return value, float(shift.grad)


@pytest.mark.parametrize("fn", SCORES)
def test_megatrons_normalization_lets_shrinking_scores_lower_the_balancing_loss(groups, fn):
    """The same routing: at moderate logits both give the balanced value ~1; with every score below
    1e-20, Megatron's loss falls towards 0 and its gradient rewards shrinking the scores further,
    while the log-space normalization keeps the loss at least 1 (and, as log σ(z) ≈ z there, shift
    invariant: no such gradient)."""
    z = torch.randn(32, E, generator=torch.Generator().manual_seed(2)) * 0.1
    megatron, exact = _router(groups, fn, False), _router(groups, fn, True)
    moderate = [_load_balancing_loss(r, z) for r in (megatron, exact)]
    assert moderate[0][0] == pytest.approx(moderate[1][0], rel=1e-5) and moderate[0][0] >= 1.0
    hacked, hacked_grad = _load_balancing_loss(megatron, z + NEAR_EPS[fn])
    kept, kept_grad = _load_balancing_loss(exact, z + NEAR_EPS[fn])
    assert kept >= 1.0 and hacked < 0.5 * kept
    assert hacked_grad > 0 and abs(kept_grad) < 1e-3 * hacked_grad  # descent lowers every logit
    assert _load_balancing_loss(megatron, z + COLLAPSED[fn] - 20.0)[0] < 1e-3  # and the loss vanishes


def test_the_replacement_is_restored_after_each_routing_call(groups):
    from megatron.core.transformer.moe import router as megatron_router

    original = megatron_router.compute_routing_scores_for_aux_loss
    _load_balancing_loss(_router(groups, "sigmoid", True), torch.randn(8, E))
    assert megatron_router.compute_routing_scores_for_aux_loss is original


@pytest.mark.parametrize("argv, message", [
    (["--moe-aux-loss-coeff", "1e-2"], "--moe-router-exact-score-normalization changes sigmoid and sqrtsoftplus"),
    (["--moe-router-score-function", "sigmoid", "--moe-aux-loss-coeff", "0"],
     "the load-balancing losses, which are off (--moe-aux-loss-coeff 0)"),
    (["--moe-router-score-function", "sigmoid", "--moe-aux-loss-coeff", "1e-2", "--moe-router-load-balancing-type",
      "none"], "--moe-router-load-balancing-type none does not use; choose one of aux_loss, seq_aux_loss"),
])
def test_the_flag_refuses_runs_where_it_would_do_nothing(argv, message):
    with pytest.raises(ConfigError) as info:
        parse_args([*PARSE_BASE, "--moe-router-exact-score-normalization", *argv], world_size=1)
    assert message in str(info.value) and "\n" not in str(info.value)
    parse_args([*PARSE_BASE, "--moe-router-exact-score-normalization", "--moe-router-score-function", "sigmoid",
                "--moe-aux-loss-coeff", "1e-2"], world_size=1)


@pytest.mark.multiprocess
def test_ordinary_training_is_unchanged_and_the_flag_is_parallel_invariant(tmp_path):
    """With scores far from 1e-20 the flag changes nothing measurable (same losses, same weights'
    path), and under TP x SP the load-balancing loss and the new metric match one process."""
    from helpers import MOCK, TINY_MODEL, pretrain

    steps = ["--train-iters", "3", "--lr-decay-iters", "3", "--micro-batch-size", "4", "--global-batch-size", "8",
             "--moe-router-score-function", "sigmoid", "--moe-aux-loss-coeff", "1e-2"]
    flag = ["--moe-router-exact-score-normalization"]
    model = [*TINY_MODEL, *MOCK]
    plain = pretrain(tmp_path, "plain", steps, model=model, data=[])
    exact = pretrain(tmp_path, "exact", steps + flag, model=model, data=[])
    tp = pretrain(tmp_path, "tp2", steps + flag + ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                  nproc=2, model=model, data=[])
    assert len(plain) == len(exact) == len(tp) == 3
    for a, b, c in zip(plain, exact, tp, strict=True):
        for key in ("lm loss", "grad norm", "load_balancing_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key
            assert c[key] == pytest.approx(b[key], rel=2e-5, abs=1e-7), key
        assert 0 < a["aux_loss_score_mass_lost"] < 1e-18 and 0 < b["aux_loss_score_mass_lost"] < 1e-18
        assert c["aux_loss_score_mass_lost"] == pytest.approx(b["aux_loss_score_mass_lost"], rel=1e-4)
