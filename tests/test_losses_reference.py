"""Inside a tiny GPT-MoE, the plugin's R_sp and R_cp values and their router and fc1 gradients
(LM loss x 0) equal a reference computed by hand from the model's own logits and fc1 outputs
with the pure functions of ``megatron_moe_reg.losses``."""

import pytest
import torch
import torch.nn.functional as F

from megatron_moe_reg.integration.regularizers import StepPlan
from megatron_moe_reg.losses import coupling_loss, routing_distribution, specialization_loss

from helpers import SMALL_MODEL_STYLE

pytestmark = pytest.mark.compat

LAMBDA_SP, LAMBDA_CP = 0.7, 0.3
COEFFICIENTS = {"moe_specialization_loss_coeff": LAMBDA_SP, "moe_coupling_loss_coeff": LAMBDA_CP}


@pytest.fixture(scope="module")
def ctx():
    from megatron_moe_reg.training import trainer
    from megatron_moe_reg.training.arguments import parse_args

    cfg = parse_args([*SMALL_MODEL_STYLE, "--mock-data", "--vocab-size", "128", "--num-layers", "4",
                      "--hidden-size", "32",
                      "--num-attention-heads", "4", "--num-experts", "4", "--moe-ffn-hidden-size", "24",
                      "--moe-router-topk", "2", "--seq-length", "16", "--micro-batch-size", "2",
                      "--global-batch-size", "4", "--moe-aux-loss-coeff", "0", "--train-iters", "1",
                      "--lr-warmup-iters", "0", "--moe-layer-freq", "[1,0,1,1]",
                      "--moe-specialization-loss-coeff", str(LAMBDA_SP),
                      "--moe-coupling-loss-coeff", str(LAMBDA_CP)], world_size=1)
    context = trainer.setup(cfg)
    yield context
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def _batches(ctx):
    from megatron_moe_reg.training.data import make_loader

    return [b for _, b in zip(range(ctx.cfg.num_microbatches), make_loader(ctx.datasets[0], ctx.cfg), strict=False)]


def _plugin_gradients(ctx, batches):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_moe_reg.training.step import batch_to_device, loss_func

    def forward_step(data_iterator, model):
        batch = batch_to_device(next(data_iterator))
        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def zero(output_tensor):
            loss, n, report = loss_func(batch["loss_mask"], output_tensor)
            return loss * 0.0, n, report

        return out, zero

    regs = ctx.regularizers
    for chunk in ctx.model:
        chunk.zero_grad_buffer()
    regs.begin_step(1, StepPlan(measure=True))
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches), model=ctx.model,
                                num_microbatches=len(batches), seq_length=ctx.cfg.model.seq_length,
                                micro_batch_size=ctx.cfg.train.micro_batch_size, forward_only=False)
    values = regs.finish_step(1)
    grads = {n: p.main_grad.clone() for n, p in ctx.gpt_model.named_parameters()
             if "router" in n or "linear_fc1" in n}
    return values, grads


def _reference(ctx, batches):
    """Per micro-batch: capture router inputs and fc1 outputs, rebuild z_TKF and the routing
    distributions by hand, and differentiate λ_sp Σ R_sp + λ_cp Σ R_cp (averaged over micro-batches)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_moe_reg.training.data import batch_to_device

    model = ctx.gpt_model
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    cfg = model.config
    regs = ctx.regularizers
    regs.set_coefficients({name: 0.0 for name in COEFFICIENTS})
    regs.begin_step(1, StepPlan())
    params = {n: p for n, p in model.named_parameters() if "router" in n or "linear_fc1" in n}
    total = 0.0
    moe_numbers = [layer.layer_number for layer in layers]  # [1, 3, 4]: layer 2 is dense
    per_layer = {f"specialization_loss_layer_{n - 1}": 0.0 for n in moe_numbers}
    per_layer.update({f"coupling_loss_layer_{n - 1}": 0.0 for n in moe_numbers[1:]})
    try:
        for batch in batches:
            captured = {}
            hooks = []
            for layer in layers:
                def on_router(mod, args, output, layer=layer, captured=captured):
                    captured[layer.layer_number] = {"x": args[0], "routing_map": output[1], "fc1": []}

                hooks.append(layer.router.register_forward_hook(on_router))
                for expert in layer.experts.local_experts:
                    def on_fc1(mod, args, output, layer=layer, captured=captured):
                        captured[layer.layer_number]["fc1"].append(output[0])

                    hooks.append(expert.linear_fc1.register_forward_hook(on_fc1))
            b = batch_to_device(batch)
            model(b["tokens"], b["position_ids"], None, labels=b["labels"])
            for h in hooks:
                h.remove()
            masses, loss = [], 0.0
            for n in sorted(captured):
                c = captured[n]
                router = layers[moe_numbers.index(n)].router
                logits = F.linear(c["x"].reshape(-1, cfg.hidden_size).float(), router.weight.float())
                rmap = c["routing_map"]
                # z of each (token, routed expert): rows of expert e are its tokens in ascending order
                z = torch.zeros(rmap.shape[0], 2, cfg.moe_ffn_hidden_size)
                slot = torch.zeros(rmap.shape[0], dtype=torch.long)
                for e in range(rmap.shape[1]):
                    gate, up = c["fc1"][e].chunk(2, dim=-1)
                    rows = F.silu(gate) * up
                    tokens = torch.nonzero(rmap[:, e]).flatten()
                    z = z.index_put((tokens, slot[tokens]), rows)
                    slot[tokens] += 1
                r_sp = specialization_loss(z)
                per_layer[f"specialization_loss_layer_{n - 1}"] += r_sp.item() / len(batches)
                loss = loss + LAMBDA_SP * r_sp
                masses.append((routing_distribution(logits, "softmax"), rmap))
            for i in range(1, len(masses)):  # the previous *MoE* layer: (1, 3), (3, 4)
                (s_prev, map_prev), (s, cur_map) = masses[i - 1], masses[i]
                r_cp = coupling_loss(s_prev, s, 2, routing_map_prev_TE=map_prev, routing_map_TE=cur_map)
                per_layer[f"coupling_loss_layer_{moe_numbers[i] - 1}"] += r_cp.item() / len(batches)
                loss = loss + LAMBDA_CP * r_cp
            total = total + loss / len(batches)
        grads = dict(zip(params, torch.autograd.grad(total, list(params.values()), allow_unused=True), strict=False))
    finally:
        regs.set_coefficients(COEFFICIENTS)
    return per_layer, grads


def test_values_and_gradients_equal_the_hand_computed_reference(ctx):
    batches = _batches(ctx)
    values, grads = _plugin_gradients(ctx, batches)
    ref_values, ref_grads = _reference(ctx, batches)
    for key, expected in ref_values.items():
        assert values[key] == pytest.approx(expected, rel=1e-5), key
    assert grads.keys() == ref_grads.keys()
    for name, expected in ref_grads.items():
        assert expected is not None and expected.abs().sum() > 0, name
        assert torch.allclose(grads[name], expected, rtol=1e-4, atol=1e-7), (
            name, (grads[name] - expected).abs().max().item())


def test_losses_off_are_still_measured_without_gradient(ctx):
    regs = ctx.regularizers
    regs.set_coefficients({name: 0.0 for name in COEFFICIENTS})
    try:
        values, grads = _plugin_gradients(ctx, _batches(ctx))
    finally:
        regs.set_coefficients(COEFFICIENTS)
    assert values["specialization_loss"] > 0 and values["coupling_loss"] < 0
    assert all(g.abs().sum() == 0 for g in grads.values())  # measured, not trained


def test_padding_tokens_are_left_out(ctx):
    """An MoE layer called with a padding mask: R_sp over the non-padded tokens only."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    layer = next(m for m in ctx.gpt_model.modules() if isinstance(m, MoELayer))
    regs = ctx.regularizers
    regs.begin_step(1, StepPlan(measure=True))
    regs.tracker.clear()
    fc1_rows = []
    hooks = [e.linear_fc1.register_forward_hook(lambda m, a, o: fc1_rows.append(o[0]))
             for e in layer.experts.local_experts]
    seq, batch = 6, 2
    hidden = torch.randn(seq, batch, layer.config.hidden_size)
    padding = torch.zeros(batch, seq, dtype=torch.bool)
    padding[1, 3:] = True  # MoELayer's mask is [batch, seq]; True marks padding for the router
    layer(hidden, padding_mask=padding)
    for h in hooks:
        h.remove()
    rmap = layer.router.moe_reg_last_routing.routing_map
    z = torch.zeros(rmap.shape[0], 2, layer.config.moe_ffn_hidden_size)
    slot = torch.zeros(rmap.shape[0], dtype=torch.long)
    for e in range(rmap.shape[1]):
        gate, up = fc1_rows[e].chunk(2, dim=-1)
        tokens = torch.nonzero(rmap[:, e]).flatten()
        z = z.index_put((tokens, slot[tokens]), (F.silu(gate) * up).detach())
        slot[tokens] += 1
    keep = ~padding.transpose(0, 1).reshape(-1)
    got = regs.tracker.report(["specialization_loss"], layer.config.num_layers, 1)
    regs.begin_step(1, StepPlan())
    assert keep.sum() == 9
    assert got["specialization_loss"] == pytest.approx(specialization_loss(z, keep).item(), rel=1e-5)
    assert got["specialization_loss"] != pytest.approx(specialization_loss(z).item(), rel=1e-3)
