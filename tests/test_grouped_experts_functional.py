"""``grouped_mlp``: the triton kernels (Triton's interpreter on CPU) and the torch._grouped_mm backend
against the per-expert reference, forward and every gradient, in fp32 and in bf16."""

import dataclasses

import pytest
import torch

from megatron_moe_reg.config import GROUPED_GEMM_BACKENDS
from megatron_moe_reg.experts import backend_unavailable_reason, grouped_mlp, grouped_mlp_with_activation
from megatron_moe_reg.experts.layout import stacked

pytestmark = pytest.mark.skipif(backend_unavailable_reason("triton", torch.device("cpu")) is not None,
                                reason="triton is not installed")


def _routing_counts(tokens: int, k: int, experts: int, seed: int) -> list[int]:
    """Rows per expert of ``tokens`` tokens each routed to k distinct experts (a skewed router)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(tokens, experts, generator=g) + torch.linspace(2, 0, experts)
    chosen = scores.topk(k, dim=1).indices.flatten()
    return torch.bincount(chosen, minlength=experts).tolist()


CASES = {  # name: (rows per expert, hidden H, expert ffn F)
    "empty-and-uneven": ([5, 0, 70, 3, 0, 131], 72, 36),
    "k8-e16": (_routing_counts(40, 8, 16, 0), 68, 40),
    "e128-k8": (_routing_counts(48, 8, 128, 1), 36, 20),
    "one-expert": ([67], 132, 68),
    "no-rows": ([0, 0, 0], 36, 20),
}


def _inputs(counts, hidden, ffn, with_probs, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, experts = sum(counts), len(counts)
    x = torch.randn(rows, hidden, generator=g).requires_grad_()
    fc1 = [(torch.randn(2 * ffn, hidden, generator=g) / hidden ** 0.5).requires_grad_() for _ in range(experts)]
    fc2 = [(torch.randn(hidden, ffn, generator=g) / ffn ** 0.5).requires_grad_() for _ in range(experts)]
    probs = torch.rand(rows, generator=g).requires_grad_() if with_probs else None
    return x, fc1, fc2, probs


def _assert_close(a, b, what):
    """Max-abs difference within 2e-6 of the reference's largest magnitude (fp32 sums of ~100 terms)."""
    assert a.shape == b.shape, what
    if b.numel():
        assert (a - b).abs().max().item() <= 2e-6 * max(b.abs().max().item(), 1e-6), what


def _outputs_and_grads(backend, counts, x, fc1, fc2, probs):
    y, z = grouped_mlp_with_activation(x, torch.tensor(counts), fc1, fc2, probs, backend=backend)
    g = torch.Generator().manual_seed(7)
    dy, dz = torch.randn(y.shape, generator=g), torch.randn(z.shape, generator=g)
    inputs = [x, *fc1, *fc2] + ([probs] if probs is not None else [])
    grads = torch.autograd.grad((y * dy).sum() + (z * dz).sum(), inputs, allow_unused=True)
    return [y, z, *grads]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("with_probs", [True, False], ids=["probs", "no-probs"])
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_reference_forward_and_gradients(backend, case, with_probs):
    counts, hidden, ffn = CASES[case]
    args = _inputs(counts, hidden, ffn, with_probs)
    expected = _outputs_and_grads("sequential", counts, *args)
    got = _outputs_and_grads(backend, counts, *args)
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=False)):
        _assert_close(a, b, (case, i))
    empty = [e for e, n in enumerate(counts) if n == 0]
    for e in empty:  # an expert without rows gets zero weight gradients
        assert got[2 + 1 + e].abs().max() == 0 and got[2 + 1 + len(counts) + e].abs().max() == 0


BF16_CASES = {"empty-and-uneven": ([5, 0, 70, 3, 0, 131], 72, 40), "k8-e16": (CASES["k8-e16"][0], 64, 40)}
# of the fp32 reference's largest magnitude; Triton's interpreter rounds fp32 to bf16 by truncation
# where a GPU rounds to nearest, about doubling the rounding error of the kernels' bf16 stores
BF16_TOLERANCE = {"torch": 2e-2, "triton": 4e-2}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", list(BF16_CASES))
def test_bf16_backend_matches_the_fp32_reference(backend, case):
    counts, hidden, ffn = BF16_CASES[case]
    x, fc1, fc2, probs = _inputs(counts, hidden, ffn, True)
    values = [t.detach().bfloat16() for t in (x, *fc1, *fc2)]  # both runs start from these bf16 values

    def leaves(dtype):  # (x, fc1, fc2, probs) as ``dtype`` leaves; probs stay fp32, as the router's
        ts = [t.to(dtype).requires_grad_() for t in values]
        return ts[0], ts[1 : 1 + len(counts)], ts[1 + len(counts) :], probs.detach().requires_grad_()

    expected = _outputs_and_grads("sequential", counts, *leaves(torch.float32))
    got = _outputs_and_grads(backend, counts, *leaves(torch.bfloat16))
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.dtype == (torch.float32 if i == len(got) - 1 else torch.bfloat16), (case, i, a.dtype)
        err = (a.float() - b).abs().max().item()
        assert err <= BF16_TOLERANCE[backend] * max(b.abs().max().item(), 1e-6), (case, i, err)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_stacked_weights_give_the_same_result(backend):
    counts, hidden, ffn = CASES["empty-and-uneven"]
    x, fc1, fc2, probs = _inputs(counts, hidden, ffn, True)
    w1 = torch.stack([w.detach() for w in fc1]).requires_grad_()
    w2 = torch.stack([w.detach() for w in fc2]).requires_grad_()
    y = grouped_mlp(x, counts, w1, w2, probs, backend=backend)
    y_ref = grouped_mlp(x, counts, fc1, fc2, probs, backend="sequential")
    _assert_close(y, y_ref, "y")
    y.sum().backward()
    y_ref.sum().backward()
    _assert_close(w1.grad, torch.stack([w.grad for w in fc1]), "fc1 grad")
    _assert_close(w2.grad, torch.stack([w.grad for w in fc2]), "fc2 grad")


def test_evenly_spaced_weights_are_stacked_without_a_copy():
    buffer = torch.randn(4, 6, 8)
    views = list(buffer.unbind(0))
    assert stacked(views).data_ptr() == buffer.data_ptr()
    assert torch.equal(stacked(views), buffer)
    separate = [torch.randn(6, 8) for _ in range(3)]
    assert torch.equal(stacked(separate), torch.stack(separate))


def test_backend_errors_name_the_problem(monkeypatch):
    x = torch.randn(4, 18)
    w1, w2 = torch.randn(2, 20, 18), torch.randn(2, 18, 10)
    with pytest.raises(ValueError, match="multiple of 4"):
        grouped_mlp(x, [2, 2], w1, w2, backend="torch")
    with pytest.raises(ValueError, match="TEGroupedMLP"):
        grouped_mlp(x, [2, 2], w1, w2, backend="te")
    with pytest.raises(ValueError, match="unknown backend"):
        grouped_mlp(x, [2, 2], w1, w2, backend="cutlass")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "CUDA device" in backend_unavailable_reason("triton", torch.device("cpu"))
    assert GROUPED_GEMM_BACKENDS == ("auto", "triton", "torch", "te", "sequential")


@pytest.mark.compat
@pytest.mark.parametrize("probs_on_input", [False, True], ids=["probs-before-fc2", "probs-on-input"])
def test_module_equals_sequential_mlp_with_its_state_dict(groups, probs_on_input):
    """GroupedGemmExperts loads SequentialMLP's state dict unchanged and computes the same output
    (Megatron's ``moe_apply_probs_on_input`` included)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_moe_reg.experts.grouped_experts import GroupedGemmExperts
    from megatron_moe_reg.integration.megatron import compat

    config = TransformerConfig(num_layers=1, hidden_size=36, num_attention_heads=4, num_moe_experts=3,
                               moe_ffn_hidden_size=20, moe_router_topk=1 if probs_on_input else 2,
                               moe_apply_probs_on_input=probs_on_input, moe_router_pre_softmax=probs_on_input,
                               gated_linear_unit=True,
                               activation_func=torch.nn.functional.silu, add_bias_linear=False,
                               use_cpu_initialization=True, bias_activation_fusion=False,
                               gradient_accumulation_fusion=False)
    spec = compat.moe_submodules(get_gpt_layer_local_spec(num_experts=3).submodules.mlp).experts
    submodules = spec.keywords["submodules"] if hasattr(spec, "keywords") else spec.submodules
    torch.manual_seed(0)
    reference = SequentialMLP(3, config, submodules, pg_collection=groups)
    grouped = GroupedGemmExperts(3, config, submodules, pg_collection=groups, backend="triton")
    assert grouped.state_dict().keys() == reference.state_dict().keys()
    grouped.load_state_dict(reference.state_dict())
    counts = torch.tensor([7, 0, 12])
    x = torch.randn(19, 36)
    probs = torch.rand(19)
    expected, _ = reference(x, counts, probs)
    seen = []
    grouped.register_activation_hook(lambda module, z: seen.append(z.shape))
    got, bias = grouped(x, counts, probs)
    assert bias is None and seen == [(19, 20)]
    _assert_close(got, expected, "output")
    gelu = dataclasses.replace(config, gated_linear_unit=False, activation_func=torch.nn.functional.gelu)
    with pytest.raises(ValueError, match="gated_linear_unit=False, an activation other than silu"):
        GroupedGemmExperts(3, gelu, submodules, pg_collection=groups, backend="triton")


def test_auto_selection_measures_the_backends_that_run():
    from megatron_moe_reg.experts.selection import ExpertShape, fastest_backend

    best, times = fastest_backend(["torch", "sequential"], ExpertShape(4, 32, 16, 64), "cpu", torch.float32)
    assert set(times) == {"torch", "sequential"} and best == min(times, key=times.get)
    best, times = fastest_backend(["torch", "sequential"], ExpertShape(4, 30, 16, 64), "cpu", torch.float32)
    assert set(times) == {"sequential"} and best == "sequential"  # 30 fp32 values: not 16-byte rows
