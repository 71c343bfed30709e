"""``moe-reg adapt``: SR-MoE's interference test (arXiv 2601.03889, papers.md §2).

From a checkpoint, fine-tune only the experts a held-out domain uses most (or named experts) on
that domain, everything else frozen, and measure

    interference  = metric on the original domains, after - before    (the paper's headline; a loss
                    rise or an accuracy drop is interference)
    gain          = on the new domain: LM loss before - after, accuracy after - before

for the LM loss and the next-token accuracy. Data: the documents of ``--data-path`` (default the
checkpoint's validation data) with their domains. The new domain's documents alternate between
fine-tuning (even positions) and its evaluation (odd); the original domains are every other
domain. Chosen experts: per MoE layer, the ``--experts-per-layer`` experts that receive most of
the new domain's top-1 routing (or ``--experts LAYER:EXPERT ...``). Training: LM loss only
(auxiliary and plugin losses get gradient scale 0), AdamW on the chosen experts' fc1/fc2
weights, fixed batch order, one process; the same seed gives the same result.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.flags import OneLineErrorParser
from megatron_moe_reg.training.input_checks import check_output_outside


def _parse_experts(items: list[str]) -> list[tuple[int, int]]:
    out = []
    for item in items:
        try:
            layer, expert = item.split(":")
            out.append((int(layer), int(expert)))
        except ValueError:
            raise ConfigError(
                f"--experts {item}: expected LAYER:EXPERT (layer number as in the logs, 1-based; expert index 0-based)"
            ) from None
    return out


def _top_experts(model, data, per_layer: int, micro_batch_size: int) -> list[tuple[int, int]]:
    """Per MoE layer, the ``per_layer`` experts that take most of ``data``'s top-1 routing."""
    from megatron_moe_reg.analysis.evaluate import LayerCapture, lm_metrics
    from megatron_moe_reg.integration.megatron.modules import moe_layers

    captures = [LayerCapture(layer) for layer in moe_layers(model)]
    lm_metrics(model, data, micro_batch_size)
    chosen = []
    for cap in captures:
        counts = torch.bincount(cap.top1(), minlength=cap.layer.config.num_moe_experts)
        chosen += [(cap.layer.layer_number, int(e)) for e in counts.argsort(descending=True, stable=True)[:per_layer]]
        cap.remove()
    return chosen


def main(argv: list[str]) -> int:
    p = OneLineErrorParser(
        prog="moe-reg adapt",
        description="Fine-tune chosen experts on a held-out domain "
        "and measure interference on the other domains (SR-MoE's test).",
    )
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--domain", required=True, help="the held-out domain to adapt to (a name in PREFIX.domains.json)")
    p.add_argument(
        "--data-path", nargs="+", help="dataset prefixes with domains (default: the checkpoint's validation data)"
    )
    p.add_argument("--experts", nargs="+", help="LAYER:EXPERT pairs to fine-tune instead of the most used ones")
    p.add_argument("--experts-per-layer", type=int, default=1)
    p.add_argument("--train-iters", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--num-tokens", type=int, default=8192, help="tokens of each evaluation set and of fine-tuning data")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", required=True, help="directory for adapt.json")
    p.add_argument("--save", help="also write the adapted model as a checkpoint here")
    a = p.parse_args(argv)
    if a.train_iters < 1 or a.experts_per_layer < 1 or a.lr <= 0:
        raise ConfigError("--train-iters and --experts-per-layer must be >= 1 and --lr > 0")
    if not Path(a.load).is_dir():
        raise ConfigError(f"--load {a.load}: no such directory")
    check_output_outside(a.out, "--out", [a.load])
    if a.save:
        from megatron_moe_reg.training.checkpointing import latest_iteration

        if Path(a.save).resolve() == Path(a.load).resolve() or latest_iteration(a.save) is not None:
            raise ConfigError(
                f"--save {a.save} already holds a checkpoint; give a new directory "
                "(existing checkpoints are never overwritten)"
            )
    result = adapt(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapt.json").write_text(json.dumps(result, indent=1))
    print(
        f"interference (original domains): loss {result['interference']['lm_loss']:+.4f}, "
        f"accuracy {result['interference']['token_accuracy']:+.4f} | gain on {a.domain}: "
        f"loss {result['gain']['lm_loss']:+.4f} | {out / 'adapt.json'}"
    )
    return 0


def adapt(a) -> dict:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_moe_reg.analysis.evaluate import default_prefixes, lm_metrics, load_single_process
    from megatron_moe_reg.analysis.tokens import read_documents, sequences
    from megatron_moe_reg.integration.megatron.expert_weights import WEIGHT_KINDS, local_expert_weights
    from megatron_moe_reg.integration.megatron.modules import moe_layers
    from megatron_moe_reg.training import checkpointing
    from megatron_moe_reg.training.distributed import teardown

    ctx, cfg, saved = load_single_process(a.load)
    prefixes = default_prefixes(a.data_path, saved)
    if not prefixes:
        raise ConfigError("--data-path: the checkpoint was trained on --mock-data; give dataset prefixes with domains")
    docs, names = read_documents(prefixes, 1 << 62, chunk=1 << 62)  # whole documents
    if a.domain not in names:
        raise ConfigError(
            f"--domain {a.domain}: not among the data's domains ({', '.join(sorted(set(names))[:20])}"
            f"{' ...' if len(set(names)) > 20 else ''})"
        )
    target = {i for i, n in enumerate(names) if n == a.domain}
    new_docs = [d for d in docs if d[1] in target]
    seq = cfg.model.seq_length
    train_data = sequences(new_docs[0::2], names, a.num_tokens, seq)
    new_eval = sequences(new_docs[1::2] or new_docs, names, a.num_tokens, seq)
    original = sequences([d for d in docs if d[1] not in target], names, a.num_tokens, seq)

    model = ctx.gpt_model
    by_number = {layer.layer_number: layer for layer in moe_layers(model)}
    chosen = (
        _parse_experts(a.experts)
        if a.experts
        else _top_experts(model, train_data, a.experts_per_layer, a.micro_batch_size)
    )
    for layer_number, expert in chosen:
        if layer_number not in by_number or not 0 <= expert < cfg.moe.num_experts:
            raise ConfigError(
                f"--experts {layer_number}:{expert}: MoE layers are {sorted(by_number)}, "
                f"experts 0..{cfg.moe.num_experts - 1}"
            )
    params = [local_expert_weights(by_number[n].experts, kind)[e] for n, e in chosen for kind in WEIGHT_KINDS]
    before = {
        "original": lm_metrics(model, original, a.micro_batch_size),
        "new": lm_metrics(model, new_eval, a.micro_batch_size),
    }

    for param in model.parameters():
        param.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    torch.manual_seed(a.seed)
    optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    MoEAuxLossAutoScaler.set_loss_scale(torch.zeros(()))  # LM loss only
    order = random.Random(a.seed)
    rows = list(range(train_data.tokens.shape[0]))
    device = next(model.parameters()).device
    losses = []
    model.train()
    for _ in range(a.train_iters):
        batch = order.sample(rows, min(a.micro_batch_size, len(rows)))
        tokens, labels = train_data.tokens[batch].to(device), train_data.labels[batch].to(device)
        per_token = model(tokens, torch.arange(seq, device=device).expand_as(tokens), None, labels=labels)
        loss = per_token.float().mean()
        loss.backward()
        for param in params:  # Megatron's DDP hooks accumulate into main_grad
            grad = getattr(param, "main_grad", None)
            if grad is not None:
                param.grad = grad.to(param.dtype).clone()
                grad.zero_()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    after = {
        "original": lm_metrics(model, original, a.micro_batch_size),
        "new": lm_metrics(model, new_eval, a.micro_batch_size),
    }
    if a.save:
        ctx.cfg.ckpt.save = a.save
        for key, value in saved["data"].items():  # the data the model was trained on, not the analysis's
            setattr(ctx.cfg.data, key, value)
        checkpointing.save_checkpoint(ctx, 0, 0)
    teardown()
    return {
        "checkpoint": a.load,
        "domain": a.domain,
        "experts": chosen,
        "train_iters": a.train_iters,
        "lr": a.lr,
        "seed": a.seed,
        "train_losses": losses,
        "before": before,
        "after": after,
        "interference": {k: after["original"][k] - before["original"][k] for k in ("lm_loss", "token_accuracy")},
        "gain": {
            "lm_loss": before["new"]["lm_loss"] - after["new"]["lm_loss"],
            "token_accuracy": after["new"]["token_accuracy"] - before["new"]["token_accuracy"],
        },
    }
