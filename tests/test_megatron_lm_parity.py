"""The flags ``moe-reg pretrain`` shares with Megatron-LM mean what they mean there: the same default,
type and choices as Megatron-LM's own parser (``megatron.training.arguments``, shipped with
megatron-core 0.19+), except where Megatron-LM leaves a value required or None and this entry needs
one, each listed below with its reason; and the TransformerConfig built from a command line is the one
Megatron-LM builds from it."""

import argparse
import dataclasses
import importlib.util
import typing

import pytest

from megatron_moe_reg import flags
from megatron_moe_reg.training.arguments import GROUPS

pytestmark = [pytest.mark.compat,
              pytest.mark.skipif(importlib.util.find_spec("megatron.training") is None,
                                 reason="needs Megatron-LM's megatron.training (megatron-core 0.19+)")]

# flag -> why our default differs from Megatron-LM's (which is required or None there)
DEFAULT_EXCEPTIONS = {
    "num_layers": "required by Megatron-LM; a 4-layer default lets 'moe-reg pretrain --mock-data' run",
    "hidden_size": "required by Megatron-LM; 256 with the 4-layer default",
    "num_attention_heads": "required by Megatron-LM; 4 with the 4-layer default",
    "seq_length": "required by Megatron-LM (None); 256 with the 4-layer default",
    "micro_batch_size": "None in Megatron-LM (required); 4 here",
    "train_iters": "None in Megatron-LM (then --train-samples); this entry counts iterations only: 100",
    "lr": "None in Megatron-LM (required with an LR schedule); 1e-3 here",
    "split": "None in Megatron-LM, which then uses 969, 30, 1 with --data-path; the same value, given here",
    "tokenizer_type": "None in Megatron-LM (required); the SentencePiece models 'prepare-data' writes",
    "no_load_optim": "a store_true flag whose unset value Megatron-LM leaves None; False here (the same meaning)",
    "no_load_rng": "a store_true flag whose unset value Megatron-LM leaves None; False here (the same meaning)",
}
BOOL_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)


def megatron_lm_actions() -> dict:
    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    out = {}
    for action in parser._actions:
        out.setdefault(action.dest, action)
    return out


def shared_fields():
    theirs = megatron_lm_actions()
    for name, cls, _ in GROUPS:
        if name == "plugin":
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in theirs:
                yield f, hints[f.name], theirs[f.name]


def test_shared_flags_have_megatron_lm_defaults_types_and_choices():
    problems = []
    for f, hint, action in shared_fields():
        ours = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if ours != action.default and not (ours is False and action.default is None and isinstance(
                action, BOOL_ACTIONS)) and f.name not in DEFAULT_EXCEPTIONS:
            problems.append(f"{f.name}: default {ours!r}, Megatron-LM {action.default!r}")
        base, _ = flags._unwrap_optional(hint)
        if not isinstance(action, BOOL_ACTIONS) and action.type is not None and action.nargs is None:
            if f.metadata.get("parser") is None and base is not action.type:
                problems.append(f"{f.name}: type {base}, Megatron-LM {action.type}")
        if action.choices is not None and sorted(map(str, f.metadata.get("choices", []))) != sorted(
                map(str, action.choices)):
            problems.append(f"{f.name}: choices {f.metadata.get('choices')}, Megatron-LM {list(action.choices)}")
    assert problems == []


def test_every_exception_is_a_shared_flag_that_differs():
    fields = {f.name: (f, action) for f, _, action in shared_fields()}
    for name in DEFAULT_EXCEPTIONS:
        f, action = fields[name]
        assert f.default != action.default and action.default in (None, False), name
    assert len(fields) > 80  # most of the entry's flags are Megatron-LM's


# TransformerConfig fields that may differ, with the reason
CONFIG_EXCEPTIONS = {
    "use_cpu_initialization": "the machine's: True without CUDA (Megatron-LM leaves None and needs CUDA)",
    "tensor_parallel_num_weight_shards": "None here, which megatron-core reads as TP x 1, Megatron-LM's 1 at TP 1",
    "expert_tensor_parallel_num_weight_shards": "the same for the experts",
    "inference_sampling_seed": "inference only (Megatron-LM copies --seed into it)",
}


def test_the_transformer_and_optimizer_configs_are_megatron_lms_for_the_same_flags(monkeypatch, capsys):
    """``moe-reg pretrain``'s TransformerConfig and OptimizerConfig equal the ones Megatron-LM's parser,
    validate_args, core_transformer_config_from_args and get_megatron_optimizer_config build from the
    same command line (the fusions given off, as this CPU machine fits them), field by field."""
    import sys

    from megatron.training.argument_utils import core_transformer_config_from_args
    from megatron.training.arguments import parse_args as megatron_lm_parse_args
    from megatron.training.arguments import validate_args

    from megatron_moe_reg.training.arguments import parse_args
    from megatron_moe_reg.training.model import transformer_config

    from helpers import PARSE_BASE

    flags = [*PARSE_BASE, "--bf16", "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4",
             "--seq-length", "256", "--max-position-embeddings", "256", "--micro-batch-size", "4",
             "--train-iters", "100", "--lr", "1e-3", "--min-lr", "1e-4", "--clip-grad", "0.5",
             "--use-distributed-optimizer", "--transformer-impl", "local", "--moe-router-topk", "2",
             "--moe-token-dispatcher-type", "alltoall", "--moe-z-loss-coeff", "1e-3",
             "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion",
             "--no-gradient-accumulation-fusion", "--no-persist-layer-norm"]
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *flags, "--tokenizer-type", "NullTokenizer"])
    args = megatron_lm_parse_args()
    validate_args(args, {})
    theirs = core_transformer_config_from_args(args)
    ours = transformer_config(parse_args(flags, world_size=1), use_te=False)
    capsys.readouterr()  # Megatron-LM prints its arguments
    differences = []
    for f in dataclasses.fields(theirs):
        mine, megatron_lm = getattr(ours, f.name), getattr(theirs, f.name)
        if f.name not in CONFIG_EXCEPTIONS and mine != megatron_lm and repr(mine) != repr(megatron_lm):
            differences.append(f"{f.name}: ours {mine!r}, Megatron-LM {megatron_lm!r}")
    assert differences == []
    assert ours.bf16 and ours.num_moe_experts == 8 and ours.moe_token_dispatcher_type == "alltoall"
    _same_optimizer_config(flags, args)


OPTIMIZER_EXCEPTIONS = {  # options of what this entry does not run: FP8, Muon, offloading, timers
    "fp8_recipe", "muon_momentum", "optimizer_offload_fraction", "barrier_with_L1_time"}


def _same_optimizer_config(flags, args):
    from megatron.training.training import get_megatron_optimizer_config

    from megatron_moe_reg.training.arguments import parse_args
    from megatron_moe_reg.training.trainer import optimizer_config

    theirs, _ = get_megatron_optimizer_config(args)
    ours = optimizer_config(parse_args(flags, world_size=1), args.params_dtype)
    differences = [f"{f.name}: ours {getattr(ours, f.name)!r}, Megatron-LM {getattr(theirs, f.name)!r}"
                   for f in dataclasses.fields(theirs) if f.name not in OPTIMIZER_EXCEPTIONS
                   and repr(getattr(ours, f.name)) != repr(getattr(theirs, f.name))]
    assert differences == []
