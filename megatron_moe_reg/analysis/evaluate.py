"""Evaluate one checkpoint on the analysis tokens in a single CPU/GPU process (any saved layout).

    python -m megatron_moe_reg.analysis.evaluate --load CKPT --out RESULT.json [--data-path P ...]
        [--num-tokens N] [--sample-tokens S] [--micro-batch-size B]
    python -m megatron_moe_reg.analysis.evaluate --load ROOT --every-iteration --out DIR ...

With ``--every-iteration`` every ``iter_N`` under ROOT is evaluated in turn into ``DIR/iter_N.json``
(the model is built once; each iteration's weights are loaded into it; existing results are kept).

The model is rebuilt from the run configuration stored in the checkpoint with every parallel
size set to 1 and loaded through ``dist_checkpointing`` (which reshards any TP/EP/PP layout).
Per MoE layer it captures the layer input x, the router logits and routing map, then computes
(``metrics``): routing entropy, load statistics, the co-activation overlap of the routed experts'
SwiGLU intermediates, PES and activation MSO of all experts on the first S tokens, weight MSO,
router geometry, expert x domain counts and NMI, and the transitions of top-1 experts between
consecutive MoE layers with the predictability of each layer's routing from the previous MoE layer's
inputs (``metrics.predictability``). Costs: one forward over N tokens, one extra pass of the routed
experts and of each router over N tokens, and E expert passes over S tokens per MoE layer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from megatron_moe_reg import metrics
from megatron_moe_reg.errors import ConfigError


def config_from_checkpoint(load: str):
    """The checkpoint's run configuration, as one process with every parallel size 1."""
    from megatron.core import dist_checkpointing

    from megatron_moe_reg.training import arguments, checkpointing
    from megatron_moe_reg.training.distributed import init_process_group

    init_process_group("gloo")
    path = checkpointing.resolve_iteration_dir(load)
    common = dist_checkpointing.load_common_state_dict(str(path))
    saved = common.get("moe_reg_config")
    if not saved:
        raise ConfigError(
            f"--load {load}: the checkpoint has no moe-reg run configuration (it was not written by 'moe-reg pretrain')"
        )
    # the fusions the training machine used do not change the weights: this machine's defaults apply
    values = {k: v for name, group in saved.items() if name != "fusion" for k, v in group.items()}
    if "norm_epsilon" in values:  # the option's name in checkpoints written before it had Megatron-LM's
        values.setdefault("layernorm_epsilon", values.pop("norm_epsilon"))
    values.update(
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=1,
        expert_tensor_parallel_size=None,
        context_parallel_size=1,
        sequence_parallel=False,
        use_distributed_optimizer=False,
        recompute_granularity=None,
        recompute_method=None,
        recompute_num_layers=None,
        recompute_modules=None,
        bf16=False,
        fp16=False,
        train_iters=0,
        global_batch_size=None,
        lr_decay_iters=1,
        lr_warmup_iters=0,
        eval_iters=0,
        eval_interval=None,
        load=str(path.parent),
        ckpt_step=int(common["iteration"]),
        save=None,
        save_interval=None,
        finetune=True,
        no_load_optim=True,
        tensorboard_dir=None,
        log_file=None,
        progress_bar=False,
        mock_data=True,
        data_path=None,
        train_data_path=None,
        valid_data_path=None,
        test_data_path=None,
        moe_reg_measure=False,
        moe_grouped_gemm=False,
        moe_grouped_gemm_backend="sequential",
    )
    cfg = arguments.run_config_from_values(values, world_size=1)
    arguments.finalize(cfg)
    return cfg, saved


def load_single_process(load: str):
    """(training context, run config, saved config) of a checkpoint loaded into one process."""
    from megatron_moe_reg.training import checkpointing, trainer

    cfg, saved = config_from_checkpoint(load)
    ctx = trainer.setup(cfg)
    checkpointing.load_checkpoint(ctx)
    return ctx, cfg, saved


def default_prefixes(data_path: list[str] | None, saved: dict) -> list[str]:
    """``--data-path`` if given, else the checkpoint's validation data, else its training data."""
    return (
        _prefixes(data_path)
        or _prefixes(saved["data"].get("valid_data_path"))
        or _prefixes(saved["data"].get("data_path"))
    )


def _prefixes(entries: list[str] | None) -> list[str]:
    """Dataset prefixes of a possibly weighted list ("w1 p1 w2 p2" or "p1 p2"), parsed as the
    dataset builder parses it."""
    from megatron.core.datasets.utils import get_blend_from_list

    blend = get_blend_from_list(entries)
    return list(blend[0]) if blend else []


class LayerCapture:
    """Forward hooks of one MoE layer: its input, router logits and routing."""

    def __init__(self, layer):
        self.layer = layer
        self.inputs: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.maps: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []
        self.handle = layer.register_forward_pre_hook(self._pre, with_kwargs=True)
        router = layer.router
        original = self._route_logits = router.routing

        def routing(logits, *args, **kwargs):
            probs, routing_map = original(logits, *args, **kwargs)
            self.logits.append(logits.detach().reshape(-1, routing_map.shape[-1]).float())
            self.maps.append(routing_map.detach())
            self.probs.append(probs.detach().float())
            return probs, routing_map

        router.routing = routing

    def _pre(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.inputs.append(hidden.detach().reshape(-1, hidden.shape[-1]).float())

    def routing_map(self) -> torch.Tensor:
        return torch.cat(self.maps).bool()

    def route(self, x_TH: torch.Tensor) -> torch.Tensor:
        """The routing map this layer's router gives tokens ``x_TH`` (not captured)."""
        router = self.layer.router
        _, routing_map = self._route_logits(router.gating(x_TH.to(next(router.parameters()).dtype)))
        return routing_map.bool()

    def top1(self) -> torch.Tensor:
        """Each token's routed expert with the largest probability."""
        return torch.cat(self.probs).masked_fill(~self.routing_map(), -1.0).argmax(dim=1)

    def remove(self) -> None:
        self.handle.remove()
        del self.layer.router.routing  # back to the class method


@torch.no_grad()
def lm_metrics(model, data, micro_batch_size: int) -> dict[str, float]:
    """Next-token LM loss and accuracy of ``model`` (eval mode) over ``data``, in micro-batches."""
    model.eval()
    device = next(model.parameters()).device
    loss, correct, count = 0.0, 0, 0
    for start in range(0, data.tokens.shape[0], micro_batch_size):
        tokens = data.tokens[start : start + micro_batch_size].to(device)
        labels = data.labels[start : start + micro_batch_size].to(device)
        logits = model(tokens, torch.arange(tokens.shape[1], device=device).expand_as(tokens), None).float()
        loss += float(
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
        )
        correct += int((logits.argmax(-1) == labels).sum())
        count += labels.numel()
    return {"lm_loss": loss / count, "token_accuracy": correct / count, "tokens": count}


def moe_token_order(values_BS: torch.Tensor, micro_batch_size: int) -> torch.Tensor:
    """Per-token values in the order the MoE layers see the tokens ([S, B] per micro-batch)."""
    return torch.cat([chunk.t().reshape(-1) for chunk in values_BS.split(micro_batch_size)])


def _routed_z(layer, x: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
    """z_TKF: each token's routed experts' SwiGLU intermediates (experts in ascending order)."""
    from megatron_moe_reg.integration.regularizers.specialization import _fc1_modules, glu_intermediate

    rows: list[torch.Tensor] = []

    def capture(module, inputs, output):
        out, bias = output if isinstance(output, tuple) else (output, None)
        rows.append(glu_intermediate(out, bias, layer.config).float())

    handles = [m.register_forward_hook(capture) for m in _fc1_modules(layer.experts)]
    try:
        token_ids = [torch.nonzero(routing_map[:, e]).flatten() for e in range(routing_map.shape[1])]
        order = torch.cat(token_ids)
        counts = torch.tensor([len(t) for t in token_ids])
        layer.experts(
            x[order].to(next(layer.experts.parameters()).dtype), counts, torch.ones(len(order), dtype=torch.float32)
        )
    finally:
        for h in handles:
            h.remove()
    z_rows = torch.cat(rows)
    k = int(routing_map.sum(1).max())
    slot = torch.cumsum(routing_map.long(), dim=1) - 1  # slot of expert e among a token's experts
    experts_of_row = torch.repeat_interleave(torch.arange(routing_map.shape[1]), counts)
    z = z_rows.new_zeros(x.shape[0], k, z_rows.shape[-1])
    z[order, slot[order, experts_of_row]] = z_rows
    return z


def _router_geometry(router) -> dict[str, float]:
    if not hasattr(router, "penalty_matrix"):
        return metrics.router_geometry(router.weight.detach())
    return metrics.router_geometry(router.penalty_matrix().detach(), router.penalty_matrix_rank())


def evaluate(
    load: str, data_path: list[str] | None, num_tokens: int, sample_tokens: int, micro_batch_size: int
) -> dict:
    ctx, cfg, saved = load_single_process(load)
    with torch.no_grad():
        return _measure(ctx, cfg, saved, load, data_path, num_tokens, sample_tokens, micro_batch_size)


def saved_iterations(root: str) -> list[int]:
    """The iterations with a complete checkpoint under ``root`` (``iter_N`` with metadata), ascending."""
    found = []
    for path in Path(root).glob("iter_*"):
        suffix = path.name[len("iter_") :]
        if suffix.isdigit() and (path / "metadata.json").is_file():
            found.append(int(suffix))
    return sorted(found)


def evaluate_every_iteration(
    root: str, out: Path, data_path: list[str] | None, num_tokens: int, sample_tokens: int, micro_batch_size: int
) -> list[Path]:
    """Evaluate each saved iteration of ``root`` not yet in ``out`` (``out/iter_N.json``) on the same
    tokens; the model is built once and each iteration's weights loaded into it."""
    from megatron_moe_reg.training import checkpointing

    iterations = saved_iterations(root)
    if not iterations:
        raise ConfigError(f"--load {root}: no saved iteration (iter_N with metadata.json) found")
    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i in iterations if not (out / f"iter_{i:07d}.json").is_file()]
    written = []
    if todo:
        ctx, cfg, saved = load_single_process(str(checkpointing.iteration_dir(root, todo[0])))
        for iteration in todo:
            if iteration != cfg.ckpt.ckpt_step:
                cfg.ckpt.ckpt_step = iteration
                checkpointing.load_checkpoint(ctx)
            where = checkpointing.iteration_dir(root, iteration)
            with torch.no_grad():
                result = _measure(ctx, cfg, saved, str(where), data_path, num_tokens, sample_tokens, micro_batch_size)
            target = out / f"iter_{iteration:07d}.json"
            tmp = target.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(result))
            tmp.replace(target)
            written.append(target)
    return written


def _measure(
    ctx, cfg, saved: dict, load: str, data_path, num_tokens: int, sample_tokens: int, micro_batch_size: int
) -> dict:
    from megatron_moe_reg.analysis.tokens import random_tokens, read_tokens
    from megatron_moe_reg.integration.megatron.modules import moe_layers

    model = ctx.gpt_model
    seq = cfg.model.seq_length
    prefixes = default_prefixes(data_path, saved)
    data = (
        read_tokens(prefixes, num_tokens, seq) if prefixes else random_tokens(num_tokens, seq, ctx.tokenizer.vocab_size)
    )
    layers = moe_layers(model)
    if not layers:
        raise ConfigError(f"--load {load}: the model has no MoE layers")
    captures = [LayerCapture(layer) for layer in layers]
    try:
        return _layer_results(cfg, model, data, layers, captures, load, prefixes, micro_batch_size, sample_tokens)
    finally:
        for cap in captures:
            cap.remove()


def _layer_results(cfg, model, data, layers, captures, load, prefixes, micro_batch_size, sample_tokens) -> dict:
    from megatron_moe_reg.integration.megatron.expert_weights import local_expert_outputs, local_expert_weights

    lm = lm_metrics(model, data, micro_batch_size)
    domain = moe_token_order(data.domains, micro_batch_size)
    num_domains = len(data.domain_names)
    result: dict = {
        "checkpoint": str(load),
        "iteration": cfg.ckpt.ckpt_step,
        "router_type": cfg.plugin.moe_router_type,
        "num_experts": cfg.moe.num_experts,
        "topk": cfg.moe.moe_router_topk,
        "num_tokens": lm["tokens"],
        "sample_tokens": 0,
        "lm_loss": lm["lm_loss"],
        "perplexity": math.exp(min(lm["lm_loss"], 50.0)),
        "token_accuracy": lm["token_accuracy"],
        "domain_names": data.domain_names,
        "layers": [],
        "data_path": prefixes or None,
    }
    top1 = []
    score_function = cfg.moe.moe_router_score_function
    for layer, cap in zip(layers, captures, strict=False):
        x = torch.cat(cap.inputs)
        routing_map = cap.routing_map()
        logits = torch.cat(cap.logits)
        first = cap.top1()
        top1.append(first)
        counts = routing_map.sum(0).double()
        sample = x[:sample_tokens]
        outputs = local_expert_outputs(layer.experts, sample, cfg.moe.num_experts)  # one process: all experts
        result["sample_tokens"] = sample.shape[0]
        expert_domain = metrics.joint_counts(first, domain, cfg.moe.num_experts, num_domains)
        entry = {
            "layer_number": layer.layer_number,
            "routing_entropy": float(metrics.routing_entropy(metrics.router_distribution(logits, score_function))),
            **metrics.load_statistics(counts),
            "load_share": (counts / counts.sum()).tolist(),
            "coactivation_overlap": float(metrics.coactivation_overlap(_routed_z(layer, x, routing_map))),
            "pes": float(metrics.pairwise_expert_similarity(outputs)),
            "activation_mso": float(metrics.activation_mso(outputs)),
            "weight_mso_fc1": float(metrics.weight_mso(local_expert_weights(layer.experts, "fc1"))),
            "weight_mso_fc2": float(metrics.weight_mso(local_expert_weights(layer.experts, "fc2"))),
            **_router_geometry(layer.router),
            "expert_domain_nmi": metrics.normalized_mutual_information(first, domain),
            "expert_domain_counts": expert_domain.tolist(),
        }
        result["layers"].append(entry)
    result["transitions"] = []
    for i in range(len(layers) - 1):
        joint = metrics.joint_counts(top1[i], top1[i + 1], cfg.moe.num_experts, cfg.moe.num_experts)
        actual = captures[i + 1].routing_map()
        predicted = captures[i + 1].route(torch.cat(captures[i].inputs))  # layer i+1's router on layer i's inputs
        cosine, spearman = metrics.load_agreement(predicted.sum(0), actual.sum(0))
        result["transitions"].append(
            {
                "from_layer": layers[i].layer_number,
                "to_layer": layers[i + 1].layer_number,
                "mutual_information": metrics.pathway_mutual_information(top1[i], top1[i + 1], cfg.moe.num_experts),
                "conditional_entropy": metrics.pathway_conditional_entropy(top1[i], top1[i + 1], cfg.moe.num_experts),
                "predicted_load_cosine": cosine,
                "predicted_load_spearman": spearman,
                "predicted_topk_overlap": metrics.topk_overlap(predicted, actual),
                "counts": joint.tolist(),
            }
        )
    result["top10_pathway_share"] = metrics.top_pathway_share(torch.stack(top1), top=10)
    return result


def main(argv: list[str]) -> int:
    from megatron_moe_reg.training.distributed import teardown

    p = argparse.ArgumentParser(prog="python -m megatron_moe_reg.analysis.evaluate")
    p.add_argument("--load", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data-path", nargs="+")
    p.add_argument("--num-tokens", type=int, default=8192)
    p.add_argument("--sample-tokens", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--every-iteration", action="store_true", help="every iter_N under --load into --out DIR")
    a = p.parse_args(argv)
    if a.every_iteration:
        evaluate_every_iteration(a.load, Path(a.out), a.data_path, a.num_tokens, a.sample_tokens, a.micro_batch_size)
    else:
        result = evaluate(a.load, a.data_path, a.num_tokens, a.sample_tokens, a.micro_batch_size)
        Path(a.out).write_text(json.dumps(result))
    teardown()
    return 0


if __name__ == "__main__":
    from megatron_moe_reg.errors import quiet_third_party_warnings, run_guarded

    quiet_third_party_warnings()
    sys.exit(run_guarded(main, sys.argv[1:]))
