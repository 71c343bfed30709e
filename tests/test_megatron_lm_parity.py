"""The flags ``moe-reg pretrain`` shares with Megatron-LM mean what they mean there: the same default,
type and choices as Megatron-LM's own parser (``megatron.training.arguments``, shipped with
megatron-core 0.19+), except where Megatron-LM leaves a value required or None and this entry needs
one, each listed below with its reason."""

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
