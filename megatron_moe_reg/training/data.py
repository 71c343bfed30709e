"""GPT datasets (megatron-core ``BlendedMegatronDatasetBuilder`` + ``GPTDataset``/``MockGPTDataset``)
and micro-batch loaders with Megatron-LM's sample order."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list

from megatron_moe_reg.training.arguments import RunConfig
from megatron_moe_reg.training.dataset_cache import prebuilt_per_node
from megatron_moe_reg.training.distributed import on_gpu


def dataset_sizes(cfg: RunConfig) -> list[int]:
    """Samples to draw per split: every training step, and one fixed validation/test set."""
    gbs = cfg.global_batch_size
    return [cfg.train.train_iters * gbs, cfg.eval.eval_iters * gbs, cfg.eval.eval_iters * gbs]


def build_datasets(cfg: RunConfig, tokenizer) -> tuple:
    d = cfg.data
    return build_gpt_datasets(
        dataset_sizes(cfg),
        tokenizer,
        seed=cfg.train.seed,
        seq_length=cfg.model.seq_length,
        data_path=d.data_path,
        split=d.split,
        train_data_path=d.train_data_path,
        valid_data_path=d.valid_data_path,
        test_data_path=d.test_data_path,
        data_cache_path=d.data_cache_path,
        mock_data=d.mock_data,
    )


def build_gpt_datasets(
    sizes: list[int],
    tokenizer,
    *,
    seed: int,
    seq_length: int,
    data_path: list[str] | None,
    split: str | None,
    train_data_path: list[str] | None = None,
    valid_data_path: list[str] | None = None,
    test_data_path: list[str] | None = None,
    data_cache_path: str | None = None,
    mock_data: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    built_on_this_rank=lambda: True,
) -> tuple:
    """(train, valid, test) GPT datasets of ``sizes`` samples, with Megatron-LM's data flags."""
    blend_per_split = None
    if train_data_path:
        blend_per_split = [
            get_blend_from_list(train_data_path),
            get_blend_from_list(valid_data_path),
            get_blend_from_list(test_data_path),
        ]
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=get_blend_from_list(data_path),
        blend_per_split=blend_per_split,
        split=split if data_path else None,
        path_to_cache=data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
    )
    cls = MockGPTDataset if mock_data else GPTDataset
    gpt_logger = logging.getLogger(GPTDataset.__module__)
    level = gpt_logger.level
    if mock_data:  # mock indices are never cached; megatron warns about that on every build
        gpt_logger.setLevel(logging.ERROR)

    def build() -> tuple:
        return tuple(BlendedMegatronDatasetBuilder(cls, sizes, built_on_this_rank, config).build())

    try:
        if not mock_data:
            prebuilt_per_node(data_cache_path, build)
        return build()
    finally:
        gpt_logger.setLevel(level)


class MicroBatchSampler:
    """Megatron-LM's pretraining order: each step consumes ``global_batch`` consecutive samples;
    micro-batch ``m`` of DP rank ``r`` is ``start + m*mbs*dp + [r*mbs, (r+1)*mbs)``."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.total, self.consumed = total_samples, consumed_samples
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // (self.mbs * self.dp_size))

    def __iter__(self) -> Iterator[list[int]]:
        span = self.mbs * self.dp_size
        for start in range(self.consumed, self.total - span + 1, span):
            first = start + self.dp_rank * self.mbs
            yield list(range(first, first + self.mbs))


def make_loader(
    dataset, cfg: RunConfig, consumed_samples: int = 0, total_samples: int | None = None
) -> torch.utils.data.DataLoader | None:
    if dataset is None:
        return None
    total = len(dataset) if total_samples is None else min(total_samples, len(dataset))
    sampler = MicroBatchSampler(
        total,
        consumed_samples,
        cfg.train.micro_batch_size,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=on_gpu(),
        persistent_workers=cfg.data.num_workers > 0,
    )


def needs_data() -> bool:
    """Only the first (tokens) and last (labels) pipeline stages read batches."""
    return parallel_state.is_pipeline_first_stage() or parallel_state.is_pipeline_last_stage()


def batch_to_device(batch: dict | None) -> dict:
    """Move a micro-batch to the device and keep what this pipeline stage needs."""
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    if batch is None:
        return dict.fromkeys(keys)
    device = torch.cuda.current_device() if on_gpu() else "cpu"
    out = {k: batch[k].to(device, non_blocking=True) for k in keys}
    if parallel_state.get_context_parallel_world_size() > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        out = get_batch_on_this_cp_rank(out)
    if not parallel_state.is_pipeline_first_stage():
        out["tokens"] = out["position_ids"] = None
    if not parallel_state.is_pipeline_last_stage():
        out["labels"] = out["loss_mask"] = None
    return out
