"""``pretrain()`` of a GPT-MoE without a Megatron-LM checkout (megatron-core 0.19+ ships
``megatron.training``): the plugin's equivalents of ``pretrain_gpt.py``'s dataset provider, forward
step and main.

- datasets: ``GPTDataset`` over Megatron indexed datasets (``--data-path`` with ``--split``, or
  ``--train-data-path`` / ``--valid-data-path`` / ``--test-data-path``) or ``MockGPTDataset``
  (``--mock-data``), with Megatron-LM's tokenizer, built on the first and last pipeline stages
  (every tensor-parallel rank reads its own copy, so no batch broadcast is needed);
- forward step and loss: ``moe-reg pretrain``'s (``training.step``): the masked token-sum LM loss,
  reported as Megatron-LM's ``lm loss`` (sum, tokens) pair;
- main: 0.19's ``pretrain_gpt.py`` order — startup timestamps, the in-process-restart wrapper,
  ``parse_and_validate_args``, the GPT model config and the config container.
"""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.training import get_args, get_tokenizer

from megatron_moe_reg.training.data import build_gpt_datasets
from megatron_moe_reg.training.step import forward_step


def _built_on_this_rank() -> bool:
    return parallel_state.is_pipeline_first_stage() or parallel_state.is_pipeline_last_stage()


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """(train, valid, test) datasets of the requested sizes, from Megatron-LM's data flags."""
    args = get_args()
    return build_gpt_datasets(
        [int(n or 0) for n in train_val_test_num_samples],
        get_tokenizer(),
        seed=args.seed,
        seq_length=args.seq_length,
        data_path=args.data_path,
        split=args.split,
        train_data_path=args.train_data_path,
        valid_data_path=args.valid_data_path,
        test_data_path=args.test_data_path,
        data_cache_path=args.data_cache_path,
        mock_data=args.mock_data,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        built_on_this_rank=_built_on_this_rank,
    )


train_valid_test_datasets_provider.is_distributed = True  # type: ignore[attr-defined]  # Megatron-LM's flag


def pretrain_gpt(program_start: float) -> None:
    import time

    from megatron.training import inprocess_restart, pretrain, set_startup_timestamps
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    set_startup_timestamps(program_start=program_start, main_entry=time.time())
    run, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    args = parse_and_validate_args(args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    container = pretrain_cfg_container_from_args(args, gpt_config_from_args(args))
    run(container, train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step, store=store)
