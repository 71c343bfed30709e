"""The add-on path for existing Megatron-LM setups: Megatron-LM's own ``pretrain_gpt.py`` training
loop, data, tokenizers and checkpoints, with the plugin's flags.

``patches/pretrain_gpt_moe_reg.py`` (run from a Megatron-LM checkout) calls ``run_pretrain_gpt``,
which passes Megatron-LM's ``pretrain`` its own dataset provider and forward step, the plugin's
flags as ``extra_args_provider``, and a model provider whose block spec has the plugin's router
and experts swapped in. Three names of Megatron-LM modules are replaced while it runs (rows of
scope ``megatron-lm`` in the patch table ``integration.megatron.patches``; each restored afterwards;
Megatron-LM looks them up as module globals at call time):

- ``gpt_builders.get_gpt_decoder_block_spec``: returns Megatron's spec passed through
  ``spec.patch_block_spec`` — the plugin router (``MoESubmodules.router``) and grouped-GEMM
  experts; Megatron-LM has no other way to take a spec that depends on its config.
- ``megatron.training.training.get_model``: after Megatron-LM builds and wraps the model chunks,
  installs the losses and measurements on them (``install.install``).
- ``megatron.training.training.train_step``: ``Regularizers.begin_step`` before each step and
  ``finish_step`` after it, the same step policy as ``moe-reg pretrain`` (TensorBoard and a log
  line at log-interval steps).

Megatron's own MoE losses and loss scaling are untouched: the plugin's losses are attached with
the same ``MoEAuxLossAutoScaler`` semantics, which Megatron-LM's schedule drives.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from megatron_moe_reg import flags
from megatron_moe_reg.config import ModelShape, PluginConfig
from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.experts.selection import choose_backend
from megatron_moe_reg.experts.validation import validate_plugin
from megatron_moe_reg.integration.install import Regularizers, StepPolicy, install, router_builder
from megatron_moe_reg.integration.megatron import patches


def add_plugin_args(parser):
    """``extra_args_provider`` for Megatron-LM: one argument group with the plugin's flags."""
    flags.add_dataclass_flags(parser, PluginConfig, "megatron-moe-reg")
    return parser


def plugin_options(args) -> tuple[PluginConfig, ModelShape]:
    """The plugin options of a Megatron-LM argument namespace and its model shape, validated."""
    plugin = flags.build_dataclass(PluginConfig, vars(args))
    shape = ModelShape.from_options(vars(args))
    validate_plugin(plugin, shape)
    return plugin, shape


def plugin_config(args) -> PluginConfig:
    """The validated plugin options of a Megatron-LM argument namespace."""
    return plugin_options(args)[0]


class MegatronLMPlugin:
    """The plugin state of one Megatron-LM run: options, router builder and installed losses."""

    def __init__(self, get_args: Callable[[], Any]):
        self.get_args = get_args
        self._options: tuple[PluginConfig, ModelShape] | None = None
        self.regularizers: Regularizers | None = None
        self.iteration: int | None = None
        self._backend: str | None = None

    @property
    def options(self) -> tuple[PluginConfig, ModelShape]:
        if self._options is None:  # Megatron-LM's arguments are parsed and validated by now
            self._options = plugin_options(self.get_args())
        return self._options

    @property
    def plugin(self) -> PluginConfig:
        return self.options[0]

    def router(self):
        return router_builder(*self.options)

    def grouped_backend(self) -> str:
        backend = self.plugin.moe_grouped_gemm_backend
        if backend == "te" and not self.get_args().moe_grouped_gemm:
            raise ConfigError(
                "--moe-grouped-gemm-backend te: in Megatron-LM, TEGroupedMLP is selected by its "
                "own --moe-grouped-gemm; use that flag"
            )
        if self._backend is None:
            self._backend = choose_backend(backend, self.options[1])[0]
        return self._backend

    # ------------------------------------------------------------------ replaced Megatron-LM names
    def block_spec_function(self, original: Callable) -> Callable:
        from megatron_moe_reg.integration.megatron.spec import patch_block_spec

        def get_gpt_decoder_block_spec(config, use_transformer_engine, *args, **kwargs):
            spec = original(config, use_transformer_engine, *args, **kwargs)
            return patch_block_spec(
                spec, config, use_transformer_engine, router=self.router(), grouped_backend=self.grouped_backend()
            )

        return get_gpt_decoder_block_spec

    def get_model_function(self, original: Callable) -> Callable:
        def get_model(*args, **kwargs):
            model = original(*args, **kwargs)
            if self.regularizers is None and self.router() is not None:
                policy = StepPolicy.of(self.plugin, self.get_args().log_interval)
                self.regularizers = install(model if isinstance(model, list) else [model], self.plugin, policy)
            return model

        return get_model

    def train_step_function(
        self, original: Callable, writer: Callable[[], Any], log: Callable[[str], None]
    ) -> Callable:
        def train_step(*args, **kwargs):
            regs = self.regularizers
            if regs is None:
                return original(*args, **kwargs)
            iteration = kwargs.get("iteration")
            if iteration is None:  # versions whose train_step is not told the iteration
                iteration = self.get_args().iteration if self.iteration is None else self.iteration
            step = iteration + 1
            regs.begin_step(step)
            out = original(*args, **kwargs)
            log_step = regs.policy.is_log_step(step)
            values = regs.finish_step(step, writer() if log_step else None)
            if log_step and values:
                log(
                    f" moe-reg | iteration {step} | "
                    + " | ".join(f"{k} {v:.6g}" for k, v in sorted(values.items()) if "_layer_" not in k)
                )
            self.iteration = step
            return out

        return train_step


def run_pretrain_gpt(argv: list[str] | None = None) -> None:
    """Megatron-LM's ``pretrain_gpt.py`` main with the plugin (run from a Megatron-LM checkout)."""
    from functools import partial

    import gpt_builders  # Megatron-LM's scripts (core_v0.16+), from the checkout on sys.path
    import megatron.training.training as training
    import pretrain_gpt
    from megatron.core.enums import ModelType
    from megatron.training import get_args, get_tensorboard_writer, print_rank_last
    from model_provider import model_provider as megatron_model_provider

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    model_provider = partial(megatron_model_provider, gpt_builders.gpt_builder)
    state = MegatronLMPlugin(get_args)
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
    try:
        with (
            patches.replaced("megatron-lm.block-spec", state.block_spec_function),
            patches.replaced("megatron-lm.get_model", state.get_model_function),
            patches.replaced(
                "megatron-lm.train_step",
                lambda original: state.train_step_function(original, get_tensorboard_writer, print_rank_last),
            ),
        ):
            training.pretrain(
                pretrain_gpt.train_valid_test_datasets_provider,
                model_provider,
                ModelType.encoder_or_decoder,
                pretrain_gpt.forward_step,
                args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
                extra_args_provider=add_plugin_args,
            )
    except ConfigError as e:
        print(f"pretrain_gpt_moe_reg.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
