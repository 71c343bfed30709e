"""The plugin's state in one Megatron-LM run, and the replacements it gives Megatron-LM's names.

The plugin's flags are taken off the command line before Megatron-LM parses it
(``split_plugin_flags``), so Megatron-LM's own parser and argument checks run unchanged. Once
Megatron-LM has parsed and validated its arguments, the plugin reads the model's shape from them
(``ModelShape.from_options(vars(args))``: Megatron-LM's flag names are the plugin's) and checks its
options against it, before the model is built.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from megatron_moe_reg import flags
from megatron_moe_reg.config import ModelShape, PluginConfig
from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.experts.selection import choose_backend
from megatron_moe_reg.experts.validation import validate_plugin
from megatron_moe_reg.integration.install import Regularizers, StepPolicy, install, on_console, router_builder
from megatron_moe_reg.integration.megatron.host_device import set_adam_step
from megatron_moe_reg.integration.megatron.modules import moe_layers, unwrap


def add_plugin_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One argument group with the plugin's flags."""
    flags.add_dataclass_flags(parser, PluginConfig, "megatron-moe-reg")
    return parser


def split_plugin_flags(argv: list[str]) -> tuple[PluginConfig, list[str]]:
    """(the plugin options, the rest of ``argv`` for Megatron-LM). Plugin flags are checked on their
    own here; against the model once Megatron-LM's arguments exist (``MegatronLMPlugin.options``)."""
    parser = flags.OneLineErrorParser(prog="moe-reg megatron-lm", add_help=False, allow_abbrev=False)
    add_plugin_args(parser)
    known, rest = parser.parse_known_args(argv)
    plugin = flags.build_dataclass(PluginConfig, vars(known))
    plugin.validate()
    return plugin, rest


def plugin_options(args: Any, plugin: PluginConfig) -> ModelShape:
    """The model shape of a Megatron-LM argument namespace, with ``plugin`` validated against it."""
    shape = ModelShape.from_options(vars(args))
    validate_plugin(plugin, shape)
    return shape


class MegatronLMPlugin:
    """The plugin state of one Megatron-LM run: options, router builder and installed losses."""

    def __init__(self, plugin: PluginConfig, get_args: Callable[[], Any], log: Callable[[str], None] = print):
        self.plugin, self.get_args, self.log = plugin, get_args, log
        self._shape: ModelShape | None = None
        self._backend: tuple[str, str] | None = None
        self.regularizers: Regularizers | None = None
        self.iteration: int | None = None

    @property
    def shape(self) -> ModelShape:
        if self._shape is None:  # Megatron-LM's arguments are parsed and validated by now
            self._shape = plugin_options(self.get_args(), self.plugin)
        return self._shape

    def router(self):
        return router_builder(self.plugin, self.shape)

    def experts_backend(self) -> tuple[str, str]:
        """(backend, how it was chosen), measured once for ``auto``."""
        backend = self.plugin.moe_grouped_gemm_backend
        if backend == "te" and not self.shape.moe_grouped_gemm:
            raise ConfigError(
                "--moe-grouped-gemm-backend te: in Megatron-LM, TEGroupedMLP is selected by its "
                "own --moe-grouped-gemm; use that flag"
            )
        if self._backend is None:
            self._backend = choose_backend(backend, self.shape)
        return self._backend

    def grouped_backend(self) -> str:
        return self.experts_backend()[0]

    # ------------------------------------------------------------------ replacements of Megatron-LM names
    def block_spec_function(self, original: Callable) -> Callable:
        from megatron_moe_reg.integration.megatron.spec import patch_block_spec

        def get_gpt_decoder_block_spec(config, use_transformer_engine, *args, **kwargs):
            spec = original(config, use_transformer_engine, *args, **kwargs)
            return patch_block_spec(
                spec, config, use_transformer_engine, router=self.router(), grouped_backend=self.grouped_backend()
            )

        return get_gpt_decoder_block_spec

    def setup_model_function(self, original: Callable) -> Callable:
        """``setup_model_and_optimizer``: after Megatron-LM builds, wraps and loads the model chunks,
        install the losses and measurements on them and say what was swapped in."""

        def setup_model_and_optimizer(*args, **kwargs):
            self.record_options(self.get_args())
            out = original(*args, **kwargs)
            model, optimizer = out[0], out[1]
            iteration = self.get_args().iteration
            if set_adam_step(optimizer, iteration):  # a distributed-optimizer load without Apex / TE
                self.log(
                    f"moe-reg: the distributed optimizer's Adam step, which this checkpoint does not hold "
                    f"without Apex or TransformerEngine, is set to the iteration ({iteration}): exact unless "
                    "fp16 loss scaling skipped steps"
                )
            chunks = model if isinstance(model, list) else [model]
            if self.regularizers is None and self.router() is not None:
                policy = StepPolicy.of(self.plugin, self.get_args().log_interval)
                self.regularizers = install(chunks, self.plugin, policy)
            self.log(self.summary(chunks))
            return out

        return setup_model_and_optimizer

    def record_options(self, args: Any) -> None:
        """Put the plugin's options into Megatron-LM's namespace, which its checkpoints save as ``args``
        (so ``moe-reg pretrain`` checks the router type of a checkpoint it loads). Megatron-LM's own
        names are left alone."""
        for f in dataclasses.fields(self.plugin):
            if not hasattr(args, f.name):
                setattr(args, f.name, getattr(self.plugin, f.name))

    def summary(self, chunks: list) -> str:
        """What the plugin put into the model (this rank's MoE layers)."""
        layers = [layer for chunk in chunks for layer in moe_layers(unwrap(chunk))]
        if not layers:
            return "moe-reg: no MoE layer on this rank; the plugin is idle here"
        router = type(layers[0].router).__name__
        experts = type(layers[0].experts).__name__
        backend, how = self.experts_backend()
        parts = [
            f"moe-reg: {len(layers)} MoE layers on this rank",
            f"router {self.plugin.moe_router_type} ({router})",
            f"experts {backend} ({experts}{', ' + how if how else ''})",
        ]
        regs = self.regularizers
        if regs is not None:
            parts.append("regularizers " + ", ".join(regs.components) if regs.components else "no regularizer")
            if regs.skipped_coupling_pairs:
                parts.append(
                    f"coupling pairs {regs.skipped_coupling_pairs} skipped (a pipeline stage without MoE layers)"
                )
        return " | ".join(parts)

    def train_step_function(
        self, original: Callable, writers: Callable[[], tuple[Any, Any]], log: Callable[[str], None]
    ) -> Callable:
        """``train_step``: the plugin's step around Megatron-LM's; at log steps its values go to
        Megatron-LM's TensorBoard and W&B writers (``writers()``) and a line beside its own (the
        losses, also per layer, and a few routing summaries)."""

        def train_step(*args, **kwargs):
            regs = self.regularizers
            if regs is None:
                return original(*args, **kwargs)
            iteration = kwargs.get("iteration")
            if iteration is None:  # a train_step not told the iteration: count from Megatron-LM's args
                iteration = self.get_args().iteration if self.iteration is None else self.iteration
            step = iteration + 1
            regs.begin_step(step)
            out = original(*args, **kwargs)
            log_step = regs.policy.is_log_step(step)
            tensorboard, wandb = writers() if log_step else (None, None)
            values = regs.finish_step(step, tensorboard)
            if log_step and values:
                if wandb is not None:
                    wandb.log({f"moe_reg/{k}": v for k, v in values.items()}, step)
                log(
                    f" moe-reg | iteration {step} | "
                    + " | ".join(f"{k} {v:.6g}" for k, v in sorted(values.items()) if on_console(k, loss_layers=True))
                )
            self.iteration = step
            return out

        return train_step
