"""Run options: Megatron-LM flag names, config files, derived defaults and one-line errors."""

import subprocess
import sys

import pytest
import torch

from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.training.arguments import parse_args

from helpers import PARSE_BASE

MOCK = PARSE_BASE  # mock data, 8 experts, the small-model style


def test_megatron_flag_names_and_defaults():
    cfg = parse_args(MOCK + ["--num-layers", "6", "--hidden-size", "128", "--num-experts", "16",
                             "--moe-router-topk", "4", "--micro-batch-size", "2",
                             "--moe-layer-freq", "[1,0,1,0,1,0]", "--disable-bias-linear"], world_size=4)
    assert cfg.model.num_layers == 6 and cfg.moe.num_experts == 16 and cfg.moe.moe_router_topk == 4
    assert cfg.moe.moe_layer_freq == [1, 0, 1, 0, 1, 0]
    assert cfg.model.add_bias_linear is False
    # Megatron-LM's sizes: with --swiglu 8/3 x hidden, down to a multiple of 64; hidden / heads per head
    assert cfg.model.ffn_hidden_size == 320 and cfg.moe.moe_ffn_hidden_size == 320
    assert cfg.model.kv_channels == 128 // cfg.model.num_attention_heads
    plain = parse_args([a for a in MOCK if a != "--swiglu"] + ["--hidden-size", "128"], world_size=1)
    assert plain.model.ffn_hidden_size == 4 * 128
    assert cfg.data_parallel_size == 4 and cfg.train.global_batch_size == 8 and cfg.num_microbatches == 1
    assert cfg.parallel.expert_tensor_parallel_size == cfg.parallel.tensor_model_parallel_size


def test_config_file_sets_options_and_flags_override(tmp_path):
    conf = tmp_path / "run.toml"
    conf.write_text('mock-data = true\nvocab-size = 512\n[model]\nhidden-size = 96\nnum_attention_heads = 3\n'
                    'seq-length = 64\n[moe]\nnum-experts = 6\nmoe-layer-freq = [1, 0]\nnum-layers = 2\n')
    cfg = parse_args(["--config", str(conf), "--seq-length", "32"], world_size=1)
    assert cfg.model.hidden_size == 96 and cfg.model.num_attention_heads == 3
    assert cfg.moe.num_experts == 6 and cfg.moe.moe_layer_freq == [1, 0]
    assert cfg.model.seq_length == 32  # the flag wins over the file


EXAMPLE_WORLD_SIZES = {"tiny_cpu.toml": 2, "mixtral_like.toml": 64, "deepseek_like.toml": 16, "gpu_mid.toml": 1}


def test_example_configs_parse():
    from pathlib import Path

    examples = sorted(p.name for p in (Path(__file__).parents[1] / "examples").glob("*.toml"))
    assert examples == sorted(EXAMPLE_WORLD_SIZES)
    for name in examples:
        path = Path(__file__).parents[1] / "examples" / name
        cfg = parse_args(["--config", str(path), "--mock-data", "--vocab-size", "512"],
                         world_size=EXAMPLE_WORLD_SIZES[name])
        assert cfg.notices() == [f"save-interval {cfg.ckpt.save_interval} from --config has no effect "
                                 "without --save"]


@pytest.mark.parametrize("argv, world, message", [
    (MOCK + ["--moe-router-topk", "10"], 1, "--moe-router-topk 10 exceeds --num-experts 8"),
    (MOCK + ["--num-experts", "6", "--expert-model-parallel-size", "4"], 4,
     "--num-experts 6 is not divisible by --expert-model-parallel-size 4"),
    (["--tokenizer-model", "x.model"], 1, "--data-path (or --train-data-path) is required"),
    (MOCK + ["--tensor-model-parallel-size", "2"], 2, "needs --sequence-parallel"),
    (MOCK + ["--tensor-model-parallel-size", "3"], 2, "world size 2 is not divisible"),
    (MOCK + ["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "--global-batch-size 6"),
    (MOCK + ["--moe-layer-freq", "[1,0]"], 1, "--moe-layer-freq has 2 entries but --num-layers is 4"),
    (MOCK + ["--lr-warmup-iters", "200"], 1, "--lr-warmup-iters 200 must be smaller"),
    (MOCK + ["--moe-aux-loss-coeff", "-1"], 1, "--moe-aux-loss-coeff must be >= 0"),
    (MOCK + ["--moe-coupling-loss-coeff", "nan"], 1, "--moe-coupling-loss-coeff must be a finite number, got nan"),
    (MOCK + ["--moe-specialization-loss-coeff", "inf"], 1, "--moe-specialization-loss-coeff must be a finite"),
    (MOCK + ["--lr", "inf"], 1, "--lr must be a finite number, got inf"),
    (MOCK + ["--norm-epsilon", "nan"], 1, "--norm-epsilon must be a finite number"),
    (["--train-data-path", "/nonexistent/train_text_document", "--tokenizer-model", __file__], 1,
     "--train-data-path /nonexistent/train_text_document: /nonexistent/train_text_document.bin not found"),
    (["--mock-data"], 1, "--vocab-size is required"),
    (MOCK + ["--save-interval", "5"], 1, "--save-interval needs --save"),
    (MOCK + ["--ckpt-step", "3"], 1, "--ckpt-step needs --load"),
    (MOCK + ["--moe-grouped-gemm-backend", "triton", "--no-swiglu"], 1,
     "--moe-grouped-gemm-backend triton computes bias-free SwiGLU experts; add --swiglu"),
    (MOCK + ["--moe-grouped-gemm-backend", "torch", "--recompute-granularity", "selective",
              "--recompute-modules", "moe_act"], 1, "recompute 'moe' instead"),
    (MOCK + ["--moe-grouped-gemm-backend", "triton", "--moe-grouped-gemm"], 1,
     "conflicts with --moe-grouped-gemm-backend triton"),
    (MOCK + ["--moe-grouped-gemm-backend", "te", "--transformer-impl", "local"], 1,
     "--moe-grouped-gemm-backend te needs TransformerEngine layers"),
    (MOCK + ["--moe-grouped-gemm-backend", "torch", "--moe-ffn-hidden-size", "66"], 1,
     "--moe-grouped-gemm-backend torch: the torch grouped GEMM backend needs the expert ffn hidden size (66)"),
])
def test_bad_options_raise_config_errors(argv, world, message):
    with pytest.raises(ConfigError, match=None) as info:
        parse_args(argv, world_size=world)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_triton_backend_without_gpu_or_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="--moe-grouped-gemm-backend triton: Triton kernels need a CUDA device"):
        parse_args(MOCK + ["--moe-grouped-gemm-backend", "triton"])


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("hidden-size = 'wide'\n")
    with pytest.raises(ConfigError, match="--hidden-size expects int"):
        parse_args(["--config", str(bad)] + MOCK)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("hiden-size = 64\n")
    with pytest.raises(ConfigError, match="unknown option 'hiden-size'"):
        parse_args(["--config", str(unknown)] + MOCK)
    with pytest.raises(ConfigError, match="file not found"):
        parse_args(["--config", str(tmp_path / "missing.toml")] + MOCK)


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--mock-data", "--vocab-size", "64", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["pretrain", "--mock-data", "--vocab-size", "64", "--num-experts", "8", "--moe-router-topk", "9"],
     "--moe-router-topk 9 exceeds --num-experts 8"),
    (["pretrain", "--mock-data", "--vocab-size", "64", "--num-experts", "8", "--expert-model-parallel-size", "3"],
     "--expert-model-parallel-size 3"),
    (["pretrain", "--vocab-size", "64", "--tokenizer-type", "NullTokenizer"],
     "--data-path (or --train-data-path) is required"),
    (["prepare-data", "--output-dir", "x", "--valid-fraction", "2"], "--valid-fraction must be in (0, 1)"),
])
def test_cli_reports_one_line_errors(argv, message):
    proc = subprocess.run([sys.executable, "-m", "megatron_moe_reg.cli", *argv], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert message in lines[0] and "Traceback" not in proc.stderr


def test_every_boolean_flag_sets_its_option():
    """``--X`` sets X and ``--no-X`` clears it; a Megatron-LM flag named ``--no-X`` (``--no-load-optim``)
    sets its own option (argparse's BooleanOptionalAction would read any ``--no-`` flag as False)."""
    import dataclasses
    import typing

    from megatron_moe_reg import flags
    from megatron_moe_reg.training.arguments import GROUPS, build_parser

    parser, checked = build_parser(), 0
    for _, cls, _ in GROUPS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if flags._unwrap_optional(hints[f.name])[0] is not bool:
                continue
            flag = flags.field_flag(f)
            assert getattr(parser.parse_args([flag]), f.name) is True, flag
            if not flag.startswith("--no-"):
                assert getattr(parser.parse_args(["--no-" + flag[2:]]), f.name) is False, flag
            checked += 1
    assert checked > 20  # every group's booleans were seen
