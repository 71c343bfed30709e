"""The add-on path for existing Megatron-LM setups: Megatron-LM's own ``pretrain_gpt.py`` training
loop, data, tokenizers and checkpoints, with the plugin's flags.

``patches/pretrain_gpt_moe_reg.py`` (run from a Megatron-LM checkout) calls ``run_pretrain_gpt``,
which passes Megatron-LM's ``pretrain`` its own dataset provider and forward step, the plugin's
flags as ``extra_args_provider``, and a model provider whose block spec has the plugin's router
and experts swapped in. Three names of Megatron-LM modules are replaced while it runs (each
restored afterwards; Megatron-LM looks them up as module globals at call time):

- ``<builder module>.get_gpt_decoder_block_spec`` (``gpt_builders``, or ``pretrain_gpt`` in
  checkouts without ``gpt_builders.py``): returns Megatron's spec passed through
  ``spec.patch_block_spec`` — the plugin router (``MoESubmodules.router``) and grouped-GEMM
  experts; Megatron-LM has no other way to take a spec that depends on its config.
- ``megatron.training.training.get_model``: after Megatron-LM builds and wraps the model chunks,
  installs the losses and measurements on them (``install.install``).
- ``megatron.training.training.train_step``: ``Regularizers.begin_step`` before each step,
  ``end_step`` and ``report`` after it (TensorBoard and a log line at log-interval steps).

Megatron's own MoE losses and loss scaling are untouched: the plugin's losses are attached with
the same ``MoEAuxLossAutoScaler`` semantics, which Megatron-LM's schedule drives.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Optional

from megatron_moe_reg.config import PluginConfig
from megatron_moe_reg.errors import ConfigError


def add_plugin_args(parser):
    """``extra_args_provider`` for Megatron-LM: one argument group with the plugin's flags."""
    from megatron_moe_reg.training import flags

    flags.add_dataclass_flags(parser, PluginConfig, "megatron-moe-reg")
    return parser


def run_config(args):
    """The plugin's view of a Megatron-LM argument namespace (Megatron-LM's flag names are ours),
    with the plugin options checked against the model options."""
    from megatron_moe_reg.training.arguments import run_config_from_values

    run = run_config_from_values(vars(args), world_size=getattr(args, "world_size", 1))
    run.plugin.validate(run)
    return run


def plugin_config(args) -> PluginConfig:
    """The plugin options of a Megatron-LM argument namespace, validated (``run_config``)."""
    return run_config(args).plugin


class MegatronLMPlugin:
    """The plugin state of one Megatron-LM run: options, router builder and installed losses."""

    def __init__(self, get_args: Callable[[], Any]):
        self.get_args = get_args
        self._run = None
        self.regularizers = None
        self.iteration: Optional[int] = None
        self._auto: Optional[str] = None

    @property
    def run(self):
        if self._run is None:  # Megatron-LM's arguments are parsed and validated by now
            self._run = run_config(self.get_args())
        return self._run

    @property
    def plugin(self) -> PluginConfig:
        return self.run.plugin

    def router(self):
        from megatron_moe_reg.training.trainer import plugin_router

        return plugin_router(self.run)

    def grouped_backend(self) -> str:
        backend = self.plugin.moe_grouped_gemm_backend
        if backend == "te" and not self.get_args().moe_grouped_gemm:
            raise ConfigError("--moe-grouped-gemm-backend te: in Megatron-LM, TEGroupedMLP is selected by its "
                              "own --moe-grouped-gemm; use that flag")
        if backend == "auto":
            if self._auto is None:
                from megatron_moe_reg.training.model import experts_backend

                self._auto = experts_backend(self.run, use_te=False)[0]
            backend = self._auto
        return backend

    # ------------------------------------------------------------------ replaced Megatron-LM names
    def block_spec_function(self, original: Callable) -> Callable:
        from megatron_moe_reg.integration.spec import patch_block_spec

        def get_gpt_decoder_block_spec(config, use_transformer_engine, *args, **kwargs):
            spec = original(config, use_transformer_engine, *args, **kwargs)
            return patch_block_spec(spec, config, use_transformer_engine, router=self.router(),
                                    grouped_backend=self.grouped_backend())

        return get_gpt_decoder_block_spec

    def get_model_function(self, original: Callable) -> Callable:
        from megatron_moe_reg.integration.install import install

        def get_model(*args, **kwargs):
            model = original(*args, **kwargs)
            if self.regularizers is None and self.router() is not None:
                self.regularizers = install(model if isinstance(model, list) else [model], self.plugin)
            return model

        return get_model

    def train_step_function(self, original: Callable, writer: Callable[[], Any],
                            log: Callable[[str], None]) -> Callable:
        def train_step(*args, **kwargs):
            regs = self.regularizers
            if regs is None:
                return original(*args, **kwargs)
            megatron_args = self.get_args()
            iteration = kwargs.get("iteration")
            if iteration is None:  # versions whose train_step is not told the iteration
                iteration = megatron_args.iteration if self.iteration is None else self.iteration
            step = iteration + 1
            measure = step % megatron_args.log_interval == 0
            interval = self.plugin.moe_metrics_interval
            regs.begin_step(measure=measure, expensive=bool(interval) and step % interval == 0)
            out = original(*args, **kwargs)
            regs.end_step()
            values = regs.report(step, writer() if measure else None)
            if measure and values:
                log(f" moe-reg | iteration {step} | " + " | ".join(
                    f"{k} {v:.6g}" for k, v in sorted(values.items()) if "_layer_" not in k))
            self.iteration = step
            return out

        return train_step


@contextlib.contextmanager
def replaced(module, name: str, value):
    """``module.name = value`` while the block runs."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield original
    finally:
        setattr(module, name, original)


def run_pretrain_gpt(argv: Optional[list[str]] = None) -> None:
    """Megatron-LM's ``pretrain_gpt.py`` main with the plugin (run from a Megatron-LM checkout)."""
    from functools import partial

    import megatron.training.training as training
    import pretrain_gpt  # Megatron-LM's, from the checkout on sys.path
    from megatron.core.enums import ModelType
    from megatron.training import get_args, get_tensorboard_writer, print_rank_last

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        import gpt_builders
        from model_provider import model_provider as megatron_model_provider

        builder_module = gpt_builders
        model_provider = partial(megatron_model_provider, gpt_builders.gpt_builder)
    except ImportError:  # older checkouts: pretrain_gpt.model_provider builds the spec itself
        builder_module = pretrain_gpt
        model_provider = pretrain_gpt.model_provider
    state = MegatronLMPlugin(get_args)
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
    try:
        with replaced(builder_module, "get_gpt_decoder_block_spec",
                      state.block_spec_function(builder_module.get_gpt_decoder_block_spec)), \
             replaced(training, "get_model", state.get_model_function(training.get_model)), \
             replaced(training, "train_step",
                      state.train_step_function(training.train_step, get_tensorboard_writer, print_rank_last)):
            training.pretrain(pretrain_gpt.train_valid_test_datasets_provider, model_provider,
                              ModelType.encoder_or_decoder, pretrain_gpt.forward_step,
                              args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
                              extra_args_provider=add_plugin_args)
    except ConfigError as e:
        print(f"pretrain_gpt_moe_reg.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
