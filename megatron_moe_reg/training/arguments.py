"""Pretraining options: typed groups, flags named as in Megatron-LM, one validation pass."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from megatron_moe_reg import flags
from megatron_moe_reg.config import SCORE_FUNCTIONS, ModelShape, PluginConfig
from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.flags import opt
from megatron_moe_reg.training.routing_trace import check_trace_options

# Megatron-LM's choices, and which of them this entry builds (the others stop with one line)
POSITION_EMBEDDINGS = ("learned_absolute", "rope", "yarn", "mrope", "relative", "none")
TRANSFORMER_IMPLS = ("local", "transformer_engine", "inference_optimized")
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "quantile_balancing", "none")
DISPATCHERS = ("allgather", "alltoall", "flex")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
TOKENIZERS = (
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "Llama2Tokenizer",
    "TikTokenizer",
    "MultimodalTokenizer",
    "NullTokenizer",
    "NullMultimodalTokenizer",
    "SFTTokenizer",
)
CKPT_FORMATS = ("torch", "torch_dist", "torch_dcp", "fsdp_dtensor")
UNSUPPORTED_CHOICES = {  # flag -> (values moe-reg pretrain does not build, what to do instead)
    "position_embedding_type": (("yarn", "mrope", "relative"), "use rope, learned_absolute or none"),
    "transformer_impl": (("inference_optimized",), "use transformer_engine or local"),
    "lr_decay_style": (("WSD",), "use constant, linear, cosine or inverse-square-root"),
    "tokenizer_type": (
        (
            "BertWordPieceLowerCase",
            "BertWordPieceCase",
            "GPT2BPETokenizer",
            "HuggingFaceTokenizer",
            "Llama2Tokenizer",
            "TikTokenizer",
            "MultimodalTokenizer",
            "NullMultimodalTokenizer",
            "SFTTokenizer",
        ),
        "use SentencePieceTokenizer, GPTSentencePieceTokenizer or NullTokenizer, or run Megatron-LM "
        "with the plugin (moe-reg megatron-lm)",
    ),
    "ckpt_format": (("torch", "torch_dcp", "fsdp_dtensor"), "moe-reg pretrain writes torch_dist"),
}


@dataclass
class ModelArgs:
    num_layers: int = opt(4, "number of transformer layers")
    hidden_size: int = opt(256, "transformer hidden size")
    num_attention_heads: int = opt(4, "attention heads")
    group_query_attention: bool = opt(False, "grouped-query attention with --num-query-groups groups")
    num_query_groups: int = opt(1, "query groups with --group-query-attention")
    ffn_hidden_size: int | None = opt(
        None, "dense MLP hidden size (default 4*hidden; with --swiglu 8/3*hidden rounded down to a multiple of 64)"
    )
    kv_channels: int | None = opt(None, "projection size per head (default hidden/heads)")
    seq_length: int = opt(256, "training sequence length")
    max_position_embeddings: int | None = opt(None, "default --seq-length")
    normalization: str = opt("LayerNorm", "normalization layer", choices=["LayerNorm", "RMSNorm"])
    layernorm_epsilon: float = opt(1e-5, "epsilon of the normalization layers", flag="--norm-epsilon")
    swiglu: bool = opt(False, "SwiGLU MLPs (default GELU)")
    add_bias_linear: bool = opt(True, "biases in linear layers", negative="--disable-bias-linear")
    position_embedding_type: str = opt("learned_absolute", "position embedding", choices=list(POSITION_EMBEDDINGS))
    rotary_base: int = opt(10000, "RoPE base")
    untie_embeddings_and_output_weights: bool = opt(False, "separate output projection")
    init_method_std: float = opt(0.02, "std of the normal initialisation")
    hidden_dropout: float = opt(0.1, "dropout after attention/MLP")
    attention_dropout: float = opt(0.1, "dropout on attention probabilities")
    vocab_size: int | None = opt(None, "vocabulary size for --tokenizer-type NullTokenizer")
    make_vocab_size_divisible_by: int = opt(128, "pad the vocabulary to a multiple of this")
    transformer_impl: str = opt(
        "transformer_engine",
        "layer implementation (the default falls back to local, with a note, without a GPU and TE)",
        choices=list(TRANSFORMER_IMPLS),
    )


@dataclass
class MoEArgs:
    num_experts: int | None = opt(None, "routed experts per MoE layer (default: a dense model)")
    moe_ffn_hidden_size: int | None = opt(None, "expert hidden size (default --ffn-hidden-size)")
    moe_router_topk: int = opt(2, "experts per token")
    moe_layer_freq: int | list[int] = opt(
        1, "MoE every N layers, or a 0/1 pattern such as [1,0,1,0]", parser="int_or_list"
    )
    moe_router_load_balancing_type: str = opt("aux_loss", "Megatron balancing loss", choices=list(LOAD_BALANCING_TYPES))
    moe_aux_loss_coeff: float = opt(0.0, "load-balancing loss coefficient")
    moe_z_loss_coeff: float | None = opt(None, "router z-loss coefficient")
    moe_router_score_function: str = opt("softmax", "router score function", choices=list(SCORE_FUNCTIONS))
    moe_router_pre_softmax: bool = opt(False, "softmax before top-k")
    moe_router_topk_scaling_factor: float | None = opt(None, "scale of the top-k probabilities")
    moe_router_enable_expert_bias: bool = opt(False, "aux-loss-free expert bias (sigmoid scores)")
    moe_router_bias_update_rate: float = opt(1e-3, "expert bias update rate")
    moe_router_num_groups: int | None = opt(None, "groups for group-limited routing")
    moe_router_group_topk: int | None = opt(None, "groups selected per token")
    moe_router_dtype: str | None = opt(
        None, "router compute dtype (default: the parameters')", choices=["fp32", "fp64"]
    )
    moe_input_jitter_eps: float | None = opt(None, "router input jitter")
    moe_expert_capacity_factor: float | None = opt(None, "token-dropping capacity factor")
    moe_token_dispatcher_type: str = opt("allgather", "token dispatcher", choices=list(DISPATCHERS))
    moe_shared_expert_intermediate_size: int | None = opt(None, "shared expert hidden size")
    moe_shared_expert_overlap: bool = opt(False, "overlap shared expert with dispatch")
    moe_grouped_gemm: bool = opt(False, "TE grouped GEMM experts (needs TransformerEngine)")
    moe_per_layer_logging: bool = opt(False, "log MoE losses per layer to TensorBoard")


@dataclass
class FusionArgs:
    """Megatron-LM's kernel fusions, on by default as there; ``fusions.fit_fusions`` turns off those
    this machine cannot run, with a note."""

    masked_softmax_fusion: bool = opt(True, "fuse the attention's scaling, masking and softmax (Apex's kernels)")
    bias_gelu_fusion: bool = opt(True, "fuse bias and GELU, tanh approximation (torch.compile; with biases)")
    bias_swiglu_fusion: bool = opt(True, "fuse bias and SwiGLU (torch.compile)")
    bias_dropout_fusion: bool = opt(True, "fuse bias, dropout and the residual add (torch.compile)")
    apply_rope_fusion: bool = opt(True, "TransformerEngine's fused RoPE", flag="--rope-fusion")
    gradient_accumulation_fusion: bool = opt(
        True, "accumulate weight gradients inside the GEMM (Apex's fused_weight_gradient_mlp_cuda)"
    )
    no_persist_layer_norm: bool = opt(False, "no persistent fused layer-norm kernel (Apex's, local layers)")


@dataclass
class ParallelArgs:
    tensor_model_parallel_size: int = opt(1, "tensor-parallel size")
    pipeline_model_parallel_size: int = opt(1, "pipeline-parallel size")
    expert_model_parallel_size: int = opt(1, "expert-parallel size")
    expert_tensor_parallel_size: int | None = opt(None, "expert tensor-parallel size (default TP)")
    context_parallel_size: int = opt(1, "context-parallel size (needs TransformerEngine)")
    sequence_parallel: bool = opt(False, "sequence parallelism (with TP>1)")
    use_distributed_optimizer: bool = opt(False, "shard optimizer state over DP")
    overlap_grad_reduce: bool = opt(False, "overlap DP gradient reduce with backward (GPU)")
    recompute_granularity: str | None = opt(None, "activation recompute", choices=["full", "selective"])
    recompute_method: str | None = opt(None, "full recompute method", choices=["uniform", "block"])
    recompute_num_layers: int | None = opt(None, "layers per recompute unit")
    recompute_modules: list[str] | None = opt(None, "selective recompute modules, e.g. moe moe_act")
    distributed_backend: str = opt(
        "nccl",
        "process-group backend (the default falls back to gloo, with a note, without CUDA)",
        choices=["nccl", "gloo"],
    )


@dataclass
class TrainArgs:
    micro_batch_size: int = opt(4, "sequences per micro-batch per DP rank")
    global_batch_size: int | None = opt(None, "sequences per step (default micro-batch x DP)")
    train_iters: int = opt(100, "optimizer steps")
    lr: float = opt(1e-3, "peak learning rate")
    min_lr: float = opt(0.0, "final learning rate")
    lr_warmup_iters: int = opt(0, "linear warmup steps")
    lr_decay_iters: int | None = opt(None, "decay steps (default --train-iters)")
    lr_decay_style: str = opt("linear", "decay schedule", choices=list(LR_DECAY_STYLES))
    weight_decay: float = opt(0.01, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "Adam beta1")
    adam_beta2: float = opt(0.999, "Adam beta2")
    adam_eps: float = opt(1e-8, "Adam epsilon")
    clip_grad: float = opt(1.0, "gradient clipping norm (0: off)")
    bf16: bool = opt(False, "bf16 mixed precision")
    attention_softmax_in_fp32: bool = opt(False, "attention masking and softmax in fp32 (default: the input's dtype)")
    calculate_per_token_loss: bool = opt(False, "normalise the loss by the global token count")
    check_for_nan_in_loss_and_grad: bool = opt(
        True, "stop before the update when the gradient norm is not finite (a non-finite loss makes it so)"
    )
    seed: int = opt(1234, "random seed")
    exit_interval: int | None = opt(None, "stop after the iteration divisible by this (saving first)")
    exit_duration_in_mins: int | None = opt(None, "save and stop after this many minutes of training")
    exit_signal_handler: bool = opt(False, "on SIGTERM, finish the step, save and exit 0 (Slurm preemption)")


@dataclass
class DataArgs:
    data_path: list[str] | None = opt(None, "dataset prefixes, optionally weighted: [w1] p1 [w2] p2")
    split: str = opt("969,30,1", "train,valid,test split of --data-path")
    train_data_path: list[str] | None = opt(None, "training dataset prefixes")
    valid_data_path: list[str] | None = opt(None, "validation dataset prefixes")
    test_data_path: list[str] | None = opt(None, "test dataset prefixes")
    mock_data: bool = opt(False, "random tokens instead of a dataset")
    tokenizer_type: str = opt("SentencePieceTokenizer", "tokenizer", choices=list(TOKENIZERS))
    tokenizer_model: str | None = opt(None, "SentencePiece model file")
    data_cache_path: str | None = opt(None, "where dataset index caches are written")
    num_workers: int = opt(2, "data-loader worker processes")
    data_full_scan: bool = opt(
        False, "check every token id of the datasets against the vocabulary at start-up (default: a sample)"
    )


@dataclass
class EvalArgs:
    eval_iters: int = opt(100, "validation batches per evaluation")
    eval_interval: int | None = opt(None, "evaluate every N steps (default: only at the end)")


@dataclass
class CheckpointArgs:
    save: str | None = opt(None, "checkpoint directory to write")
    load: str | None = opt(None, "checkpoint directory to resume from")
    save_interval: int | None = opt(None, "save every N steps (and at the end)")
    no_load_optim: bool = opt(False, "do not load optimizer state")
    no_load_rng: bool = opt(False, "do not load RNG state")
    finetune: bool = opt(False, "load weights only and start at iteration 0")
    ckpt_step: int | None = opt(None, "load this iteration of --load instead of the latest one")
    ckpt_format: str = opt("torch_dist", "checkpoint format", choices=list(CKPT_FORMATS))


@dataclass
class LoggingArgs:
    log_interval: int = opt(100, "console/TensorBoard interval in steps")
    tensorboard_dir: str | None = opt(None, "TensorBoard log directory")
    progress_bar: bool = opt(True, "progress bar on rank 0")
    log_file: str | None = opt(None, "also write per-step metrics as JSON lines here")
    moe_routing_trace_path: str | None = opt(
        None, "write Megatron's router decision traces here (router_trace_rank*.jsonl; megatron-core 0.19+)"
    )
    moe_routing_trace_max_training_iters: int | None = opt(
        None, "trace at most N iterations of this launch (default: all)"
    )
    moe_routing_trace_capture_logits: bool = opt(False, "also write each router call's pre-top-k logits")
    moe_routing_trace_capture_hidden_states: bool = opt(False, "also write each router call's input hidden states")
    moe_routing_trace_dump_weights: bool = opt(False, "also write each router's weight matrix and expert bias")


GROUPS: tuple[tuple[str, type, str], ...] = (
    ("model", ModelArgs, "model"),
    ("moe", MoEArgs, "mixture of experts"),
    ("fusion", FusionArgs, "kernel fusions"),
    ("parallel", ParallelArgs, "parallelism"),
    ("train", TrainArgs, "training"),
    ("data", DataArgs, "data"),
    ("eval", EvalArgs, "evaluation"),
    ("ckpt", CheckpointArgs, "checkpointing"),
    ("log", LoggingArgs, "logging"),
    ("plugin", PluginConfig, "megatron-moe-reg"),
)


@dataclass
class RunConfig:
    model: ModelArgs
    moe: MoEArgs
    fusion: FusionArgs
    parallel: ParallelArgs
    train: TrainArgs
    data: DataArgs
    eval: EvalArgs
    ckpt: CheckpointArgs
    log: LoggingArgs
    plugin: PluginConfig
    world_size: int = 1
    command_line: frozenset = frozenset()  # options given as flags (not from --config)
    explicit: frozenset = frozenset()  # options given as flags or in --config
    machine_notes: list[str] = field(default_factory=list)  # defaults this machine could not run

    @property
    def data_parallel_size(self) -> int:
        p = self.parallel
        return self.world_size // (
            p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
        )

    @property
    def global_batch_size(self) -> int:
        """--global-batch-size (``finalize`` fills its default)."""
        assert self.train.global_batch_size is not None, "finalize() fills --global-batch-size"
        return self.train.global_batch_size

    @property
    def lr_decay_iters(self) -> int:
        """--lr-decay-iters (``finalize`` fills its default)."""
        assert self.train.lr_decay_iters is not None, "finalize() fills --lr-decay-iters"
        return self.train.lr_decay_iters

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.train.micro_batch_size * self.data_parallel_size)

    def notices(self) -> list[str]:
        """Options from a config file that have no effect in this run."""
        out = []
        if self.ckpt.save_interval and not self.ckpt.save:
            out.append(f"save-interval {self.ckpt.save_interval} from --config has no effect without --save")
        return out

    def model_shape(self) -> ModelShape:
        """What the plugin's checks read of this run (after ``finalize`` filled the derived sizes)."""
        values = {
            f.name: getattr(group, f.name)
            for name, _, _ in GROUPS
            for group in [getattr(self, name)]
            for f in dataclasses.fields(group)
        }
        return ModelShape.from_options(values)

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name, _, _ in GROUPS}


def build_parser(prog: str = "moe-reg pretrain") -> flags.OneLineErrorParser:
    parser = flags.OneLineErrorParser(prog=prog, description="Pretrain a GPT-MoE on megatron-core.")
    parser.add_argument("--config", help="TOML file of options (flag names as keys); flags override it")
    for _, cls, title in GROUPS:
        flags.add_dataclass_flags(parser, cls, title)
    return parser


def parse_args(argv: list[str] | None = None, world_size: int | None = None) -> RunConfig:
    """Parse flags (and ``--config``), fill derived defaults and validate. Raises ConfigError."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    values = {}
    if ns.config:
        values.update(flags.load_config_file(ns.config, [cls for _, cls, _ in GROUPS]))
    given = {k: v for k, v in vars(ns).items() if k != "config"}
    values.update(given)
    ws = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    cfg = run_config_from_values(values, ws, command_line=frozenset(given))
    finalize(cfg)
    return cfg


def run_config_from_values(values: dict, world_size: int, command_line: frozenset = frozenset()) -> RunConfig:
    """A RunConfig from option values keyed by field name (others ignored; missing ones default)."""
    groups = {name: flags.build_dataclass(cls, values) for name, cls, _ in GROUPS}
    return RunConfig(**groups, world_size=world_size, command_line=command_line, explicit=frozenset(values))


def fit_to_machine(cfg: RunConfig, cuda: bool | None = None, can_import: Callable[[str], bool] | None = None) -> None:
    """Megatron-LM's defaults that need a GPU, TransformerEngine or Apex, on a machine without them: the
    local layer spec, the gloo backend and the fusions without kernels off, each with a note; given
    explicitly, they stay (and fail with one line later, the fusions here). With tensor or context
    parallelism on a GPU, CUDA_DEVICE_MAX_CONNECTIONS=1 unless set. Also reads the "auto" of checkpoints
    written before these defaults. ``cuda`` and ``can_import`` describe another machine."""
    import torch

    from megatron_moe_reg.integration.megatron.fusion_kernels import importable
    from megatron_moe_reg.training.fusions import fit_fusions

    cuda = torch.cuda.is_available() if cuda is None else cuda
    can_import = can_import or importable
    te = can_import("transformer_engine")
    m, p = cfg.model, cfg.parallel
    if m.transformer_impl == "auto" or (
        "transformer_impl" not in cfg.explicit and m.transformer_impl == "transformer_engine" and not (cuda and te)
    ):
        m.transformer_impl = "transformer_engine" if cuda and te else "local"
        if m.transformer_impl == "local":
            cfg.machine_notes.append("no GPU with TransformerEngine here: --transformer-impl local")
    if p.distributed_backend == "auto" or ("distributed_backend" not in cfg.explicit and not cuda):
        p.distributed_backend = "nccl" if cuda else "gloo"
        if not cuda:
            cfg.machine_notes.append("no GPU here: --distributed-backend gloo")
    cfg.machine_notes += fit_fusions(cfg, cuda, m.transformer_impl == "transformer_engine", can_import)
    if cuda and (p.tensor_model_parallel_size > 1 or p.context_parallel_size > 1):
        if "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ:  # read when CUDA creates its context, later
            os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
            cfg.machine_notes.append(
                "tensor / context parallelism on a GPU: CUDA_DEVICE_MAX_CONNECTIONS=1, as Megatron-LM requires "
                "before Blackwell (so the communication overlaps the GEMMs); set it yourself to choose another value"
            )


def finalize(cfg: RunConfig) -> None:
    """Fill defaults that depend on other options, then validate everything."""
    m, moe, p, t = cfg.model, cfg.moe, cfg.parallel, cfg.train
    for name, _, _ in GROUPS:
        flags.reject_non_finite(getattr(cfg, name))
    validate_choices(cfg)
    fit_to_machine(cfg)
    validate_parallel(cfg)
    if m.ffn_hidden_size is None:  # Megatron-LM's: SwiGLU's two input projections keep the parameter count
        m.ffn_hidden_size = int(4 * m.hidden_size * 2 / 3 / 64) * 64 if m.swiglu else 4 * m.hidden_size
    if moe.moe_ffn_hidden_size is None:
        moe.moe_ffn_hidden_size = m.ffn_hidden_size
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads == 0:  # as Megatron-LM
        m.kv_channels = m.hidden_size // m.num_attention_heads
    if p.expert_tensor_parallel_size is None:
        p.expert_tensor_parallel_size = p.tensor_model_parallel_size
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * cfg.data_parallel_size
    if t.lr_decay_iters is None:
        t.lr_decay_iters = t.train_iters
    validate(cfg)
    from megatron_moe_reg.experts.validation import validate_plugin

    validate_plugin(cfg.plugin, cfg.model_shape())


def validate_choices(cfg: RunConfig) -> None:
    """Megatron-LM's choices this entry does not build, and those the installed megatron-core lacks."""
    from megatron.core import package_info
    from packaging.version import Version

    for name, _, _ in GROUPS:
        options = getattr(cfg, name)
        for key, (values, fix) in UNSUPPORTED_CHOICES.items():
            value = getattr(options, key, None)
            if value in values:
                raise ConfigError(f"{flags.flag_name(key)} {value} is not supported by moe-reg pretrain; {fix}")
    moe = cfg.moe
    if moe.moe_router_score_function == "sqrtsoftplus" and Version(package_info.__version__) < Version("0.19"):
        raise ConfigError("--moe-router-score-function sqrtsoftplus needs megatron-core 0.19+; use softmax or sigmoid")
    if moe.moe_router_load_balancing_type == "quantile_balancing":
        if Version(package_info.__version__) < Version("0.19"):
            raise ConfigError(
                "--moe-router-load-balancing-type quantile_balancing needs megatron-core 0.19+; use aux_loss, "
                "seq_aux_loss, global_aux_loss, sinkhorn or none"
            )
        if moe.moe_aux_loss_coeff > 0:  # megatron-core asserts this when it builds the router
            raise ConfigError(
                "--moe-router-load-balancing-type quantile_balancing balances the load with its expert bias "
                f"and forbids Megatron's aux loss: set --moe-aux-loss-coeff 0 (not {moe.moe_aux_loss_coeff}); "
                "the plugin's losses may stay on"
            )
    if moe.moe_token_dispatcher_type == "flex" and cfg.model.transformer_impl != "transformer_engine":
        raise ConfigError(
            "--moe-token-dispatcher-type flex needs TransformerEngine layers (and DeepEP); use allgather or alltoall"
        )


def validate_parallel(cfg: RunConfig) -> None:
    p, ws = cfg.parallel, cfg.world_size
    for name in (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "expert_model_parallel_size",
        "context_parallel_size",
    ):
        if getattr(p, name) < 1:
            raise ConfigError(f"{flags.flag_name(name)} must be >= 1")
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    if ws % model_parallel:
        raise ConfigError(
            f"world size {ws} is not divisible by --tensor-model-parallel-size x "
            f"--pipeline-model-parallel-size x --context-parallel-size = {model_parallel}; "
            "change the parallel sizes or the number of processes"
        )
    etp = p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    expert_group = p.expert_model_parallel_size * etp
    if (ws // p.pipeline_model_parallel_size) % expert_group:
        raise ConfigError(
            f"--expert-model-parallel-size {p.expert_model_parallel_size} x --expert-tensor-parallel-size "
            f"{etp} (default: --tensor-model-parallel-size) does not divide the "
            f"{ws // p.pipeline_model_parallel_size} ranks of a pipeline stage; change the expert "
            "parallel sizes or the number of processes"
        )


def _check_prefixes(flag: str, entries: list[str] | None) -> None:
    """Every dataset prefix in a (possibly weighted) list must have .bin and .idx files."""
    for entry in entries or []:
        try:
            float(entry)
            continue  # a blend weight
        except ValueError:
            pass
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(entry + suffix):
                raise ConfigError(
                    f"{flag} {entry}: {entry}{suffix} not found (give the dataset prefix "
                    "without .bin/.idx, as written by 'moe-reg prepare-data')"
                )


def check_paths(cfg: RunConfig) -> None:
    """Input files named by flags exist (checked before any process group or model is built)."""
    d = cfg.data
    if d.tokenizer_model and not os.path.isfile(d.tokenizer_model):
        raise ConfigError(f"--tokenizer-model {d.tokenizer_model}: file not found")
    if d.mock_data:
        return
    for flag, entries in (
        ("--data-path", d.data_path),
        ("--train-data-path", d.train_data_path),
        ("--valid-data-path", d.valid_data_path),
        ("--test-data-path", d.test_data_path),
    ):
        _check_prefixes(flag, entries)
    if cfg.ckpt.load and not os.path.isdir(cfg.ckpt.load) and cfg.ckpt.load != cfg.ckpt.save:
        raise ConfigError(f"--load {cfg.ckpt.load}: directory not found")


def validate(cfg: RunConfig) -> None:
    """Cross-option checks. Each message names the flag and says how to fix it."""
    m, moe, p, t, d = cfg.model, cfg.moe, cfg.parallel, cfg.train, cfg.data
    positive = {
        "num_layers": m.num_layers,
        "hidden_size": m.hidden_size,
        "num_attention_heads": m.num_attention_heads,
        "seq_length": m.seq_length,
        "micro_batch_size": t.micro_batch_size,
        "global_batch_size": cfg.global_batch_size,
        "moe_router_topk": moe.moe_router_topk,
        "log_interval": cfg.log.log_interval,
    }
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{flags.flag_name(name)} must be >= 1, got {value}")
    if t.train_iters < 0:
        raise ConfigError(f"--train-iters must be >= 0, got {t.train_iters}")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads {m.num_attention_heads}"
        )
    if moe.num_experts is not None:
        if moe.num_experts < 1:
            raise ConfigError(f"--num-experts must be >= 1, got {moe.num_experts}")
        if moe.moe_router_topk > moe.num_experts:
            raise ConfigError(
                f"--moe-router-topk {moe.moe_router_topk} exceeds --num-experts "
                f"{moe.num_experts}; choose a top-k <= the number of experts"
            )
        if moe.num_experts % p.expert_model_parallel_size:
            raise ConfigError(
                f"--num-experts {moe.num_experts} is not divisible by "
                f"--expert-model-parallel-size {p.expert_model_parallel_size}; choose an "
                "EP size that divides the number of experts"
            )
        if isinstance(moe.moe_layer_freq, list) and len(moe.moe_layer_freq) != m.num_layers:
            raise ConfigError(
                f"--moe-layer-freq has {len(moe.moe_layer_freq)} entries but "
                f"--num-layers is {m.num_layers}; give one 0/1 per layer"
            )
        if isinstance(moe.moe_layer_freq, int) and moe.moe_layer_freq < 1:
            raise ConfigError("--moe-layer-freq must be >= 1 or a 0/1 list")
        if moe.moe_router_topk == 1 and moe.moe_router_score_function == "softmax" and not moe.moe_router_pre_softmax:
            raise ConfigError("--moe-router-topk 1 with softmax scores needs --moe-router-pre-softmax")
        if moe.moe_router_enable_expert_bias and moe.moe_router_score_function == "softmax":
            raise ConfigError("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid")
        if moe.moe_aux_loss_coeff < 0:
            raise ConfigError(f"--moe-aux-loss-coeff must be >= 0, got {moe.moe_aux_loss_coeff}")
        if moe.moe_z_loss_coeff is not None and moe.moe_z_loss_coeff < 0:
            raise ConfigError(f"--moe-z-loss-coeff must be >= 0, got {moe.moe_z_loss_coeff}")
    tp = p.tensor_model_parallel_size
    if tp > 1 and moe.num_experts and not p.sequence_parallel:
        raise ConfigError("MoE training with --tensor-model-parallel-size > 1 needs --sequence-parallel")
    if p.sequence_parallel and tp == 1:
        raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if p.sequence_parallel and m.seq_length % tp:
        raise ConfigError(f"--seq-length {m.seq_length} is not divisible by --tensor-model-parallel-size {tp}")
    if m.num_layers % p.pipeline_model_parallel_size:
        raise ConfigError(
            f"--num-layers {m.num_layers} is not divisible by "
            f"--pipeline-model-parallel-size {p.pipeline_model_parallel_size}"
        )
    per_step = t.micro_batch_size * cfg.data_parallel_size
    if cfg.global_batch_size % per_step:
        raise ConfigError(
            f"--global-batch-size {t.global_batch_size} is not divisible by "
            f"--micro-batch-size x data-parallel size = {per_step}"
        )
    if t.lr_warmup_iters >= cfg.lr_decay_iters:
        raise ConfigError(
            f"--lr-warmup-iters {t.lr_warmup_iters} must be smaller than --lr-decay-iters "
            f"{t.lr_decay_iters} (default: --train-iters); lower the warmup or set "
            "--lr-decay-iters"
        )
    if t.min_lr > t.lr:
        raise ConfigError(f"--min-lr {t.min_lr} exceeds --lr {t.lr}")
    if d.mock_data and (d.data_path or d.train_data_path or d.valid_data_path or d.test_data_path):
        raise ConfigError("--mock-data trains on random tokens; drop it, or drop the data paths")
    if not d.mock_data and not d.data_path and not d.train_data_path:
        raise ConfigError(
            "--data-path (or --train-data-path) is required; pass --mock-data to train "
            "on random tokens, or build a dataset with 'moe-reg prepare-data'"
        )
    if d.data_path and d.train_data_path:
        raise ConfigError("give either --data-path with --split, or --train-data-path/--valid-data-path")
    if not d.mock_data and d.tokenizer_type != "NullTokenizer" and not d.tokenizer_model:
        raise ConfigError(
            f"--tokenizer-type {d.tokenizer_type} needs --tokenizer-model (the .model "
            "file written by 'moe-reg prepare-data')"
        )
    if d.tokenizer_type == "NullTokenizer" or (d.mock_data and not d.tokenizer_model):
        if m.vocab_size is None:
            raise ConfigError("--vocab-size is required with --mock-data or --tokenizer-type NullTokenizer")
    check_paths(cfg)
    check_trace_options(cfg.log, cfg.explicit)
    if cfg.ckpt.save_interval is not None and cfg.ckpt.save_interval < 1:
        raise ConfigError("--save-interval must be >= 1")
    if cfg.ckpt.save_interval and not cfg.ckpt.save and "save_interval" in cfg.command_line:
        raise ConfigError("--save-interval needs --save DIR")
    if cfg.ckpt.ckpt_step is not None:
        if not cfg.ckpt.load:
            raise ConfigError("--ckpt-step needs --load")
        if cfg.ckpt.ckpt_step < 0:
            raise ConfigError(f"--ckpt-step must be >= 0, got {cfg.ckpt.ckpt_step}")
    if p.recompute_granularity == "full" and p.recompute_method is None:
        raise ConfigError("--recompute-granularity full needs --recompute-method uniform|block")
