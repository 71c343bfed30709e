"""Either trainer continues the other's checkpoint, and both compute the same step.

A chain of one run per link, with identical flags (dropout 0, the spectral router, R_sp, R_cp and
Megatron's load-balancing and z-losses on), in one process and in two (EP 2 alltoall):

    A  moe-reg pretrain, steps 1-2, saves            (our layout = Megatron-LM's)
    R  moe-reg pretrain --load A, steps 3-4, saves at 3 and 4 (the reference)
    B  Megatron-LM's pretrain() --load A, step 3, saves
    C  moe-reg pretrain --load B, step 4, saves

From the same checkpoint and the same batch, B's step 3 equals R's: LM loss, Megatron's aux losses,
the plugin's losses, and every parameter's gradient, read from Adam's first moment
(g = (m_3 - beta1 m_2) / (1 - beta1)) in the saved optimizer states, and its norm. C's step 4 and its
saved weights and optimizer moments equal R's, so optimizer, scheduler and RNG state cross both ways.

It runs Megatron-LM's loop from the installed megatron.training (megatron-core 0.19+: the 0.19.2 pass
of tests/run.sh); a Megatron-LM checkout of 0.16-0.18 (MEGATRON_LM_PATH) pairs with megatron-core 0.16,
whose NullTokenizer counts --vocab-size otherwise, so this test is not run against a checkout.
"""

from __future__ import annotations

import math

import pytest

from helpers import (
    CHECKOUT,
    MEGATRON_LM_MODEL,
    checkpoint_tensors,
    megatron_lm_available,
    megatron_lm_values,
    plugin_lines,
    read_metrics,
    run_cli,
    run_megatron_lm,
)

pytestmark = [
    pytest.mark.compat,
    pytest.mark.multiprocess,
    pytest.mark.skipif(not megatron_lm_available() or bool(CHECKOUT),
                       reason="needs megatron.training from megatron-core 0.19+"),
]

FLAGS = [*MEGATRON_LM_MODEL, "--train-iters", "4", "--moe-router-type", "spectral",
         "--moe-specialization-loss-coeff", "1e-2", "--moe-coupling-loss-coeff", "1e-2",
         "--moe-aux-loss-coeff", "1e-2", "--moe-z-loss-coeff", "1e-3",
         "--clip-grad", "1e9"]  # the norm is computed, nothing is clipped: Adam's moment holds the gradient
LAYOUTS = {"one-process": ([], 1),
           "ep2-alltoall": (["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"], 2)}
BETA1 = 0.9  # Megatron-LM's and our --adam-beta1 default
OURS_ONLY = ["--no-progress-bar"]
MEGATRON_LM_ONLY = ["--no-bias-swiglu-fusion"]  # its fused SwiGLU is compiled; ours runs unfused on CPU


def _ours(out, name: str, extra: list[str], layout: list[str], nproc: int) -> list[dict]:
    log = out / f"{name}.jsonl"
    run_cli(["pretrain", *FLAGS, *layout, *OURS_ONLY, "--log-file", str(log), "--save", str(out / name), *extra],
            nproc=nproc)
    return read_metrics(log)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def chain(request, tmp_path_factory):
    layout, nproc = LAYOUTS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    _ours(out, "A", ["--exit-interval", "2"], layout, nproc)
    reference = {r["iteration"]: r for r in _ours(out, "R", ["--load", str(out / "A"), "--save-interval", "3"],
                                                    layout, nproc)}
    megatron_lm = run_megatron_lm([*FLAGS, *layout, *MEGATRON_LM_ONLY, "--load", str(out / "A"), "--save",
                                   str(out / "B"), "--exit-interval", "3", "--save-interval", "100"], nproc=nproc)
    continued = {r["iteration"]: r for r in _ours(out, "C", ["--load", str(out / "B")], layout, nproc)}
    return out, reference, megatron_lm, continued


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-7)


def test_megatron_lm_loads_ours_and_computes_the_same_step(chain):
    out, reference, megatron_lm, _ = chain
    assert "successfully loaded checkpoint" in megatron_lm.stdout and "at iteration 2" in megatron_lm.stdout
    theirs, ours = megatron_lm_values(megatron_lm.stdout), reference[3]
    assert sorted(theirs) == [3], theirs  # it resumed at step 3 and stopped there
    # Megatron-LM prints 7 significant digits
    for theirs_name, our_name in [("lm loss", "lm loss"), ("load_balancing_loss", "load_balancing_loss"),
                                  ("z_loss", "z_loss")]:
        assert _close(theirs[3][theirs_name], ours[our_name]), (theirs_name, theirs[3], ours)
    assert abs(theirs[3]["grad norm"] - ours["grad norm"]) <= 5e-4  # printed with 3 decimals
    plugin = plugin_lines(megatron_lm.stdout)[3]  # 6 significant digits
    for name in ("specialization_loss", "coupling_loss", "specialization_loss_layer_1", "routing_entropy"):
        assert _close(plugin[name], ours[name]), (name, plugin[name], ours[name])


def test_the_gradients_of_that_step_agree_parameter_by_parameter(chain):
    """g_3 from Adam's first moment before and after step 3, in B's and R's checkpoints."""
    import torch

    out, reference, _, _ = chain
    before = checkpoint_tensors(out / "A" / "iter_0000002")
    theirs, ours = checkpoint_tensors(out / "B" / "iter_0000003"), checkpoint_tensors(out / "R" / "iter_0000003")
    moments = [k for k in ours if k.endswith("exp_avg") or ".exp_avg." in k]
    assert any("router" in k for k in moments) and any("experts" in k for k in moments), moments[:5]
    assert set(moments) <= set(theirs)
    squares = 0.0
    for key in moments:
        g_ours = (ours[key] - BETA1 * before[key]) / (1 - BETA1)
        g_theirs = (theirs[key] - BETA1 * before[key]) / (1 - BETA1)
        assert torch.allclose(g_theirs, g_ours, rtol=1e-5, atol=1e-5), (key, (g_theirs - g_ours).abs().max())
        squares += float(g_ours.double().pow(2).sum())
    assert _close(math.sqrt(squares), reference[3]["grad norm"], rel=1e-5)


def test_ours_loads_megatron_lms_checkpoint_and_continues_exactly(chain):
    out, reference, _, continued = chain
    assert sorted(continued) == [4]
    for name in ("lm loss", "grad norm", "load_balancing_loss", "z_loss", "specialization_loss", "coupling_loss"):
        assert _close(continued[4][name], reference[4][name]), (name, continued[4][name], reference[4][name])
    a, b = checkpoint_tensors(out / "R" / "iter_0000004"), checkpoint_tensors(out / "C" / "iter_0000004")
    assert any(".exp_avg_sq" in k or k.endswith("exp_avg_sq") for k in a) and set(a) == set(b)
    far = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point()}
    assert {k: d for k, d in far.items() if d > 1e-6} == {}
