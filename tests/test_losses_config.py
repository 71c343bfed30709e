"""Plugin loss and metric options: one-line configuration errors, the top-1 warning, pipeline pairing."""

import pytest

from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.integration.regularizers.coupling import CouplingController
from megatron_moe_reg.training.arguments import parse_args

from helpers import PARSE_BASE

MOCK = PARSE_BASE  # mock data, 8 experts, the small-model style


@pytest.mark.parametrize("argv, message", [
    (["--moe-specialization-loss-coeff", "-1"], "--moe-specialization-loss-coeff must be >= 0"),
    (["--moe-coupling-loss-coeff", "-0.1"], "--moe-coupling-loss-coeff must be >= 0"),
    (["--moe-coupling-loss-coeff", "1e-3", "--num-layers", "2", "--moe-layer-freq", "[1,0]"],
     "--moe-coupling-loss-coeff needs at least two MoE layers, this model has 1"),
    (["--moe-specialization-include-shared-experts"], "needs shared experts"),
    (["--moe-specialization-include-shared-experts", "--moe-shared-expert-intermediate-size", "512",
      "--moe-ffn-hidden-size", "256"], "--moe-shared-expert-intermediate-size 512 != --moe-ffn-hidden-size 256"),
    (["--moe-weight-orthogonality-coeff", "-1"], "--moe-weight-orthogonality-coeff must be >= 0"),
    (["--moe-weight-orthogonality-weights", "fc2"], "needs --moe-weight-orthogonality-coeff > 0"),
    (["--moe-metrics-interval", "-1"], "--moe-metrics-interval must be >= 0"),
    (["--moe-metrics-interval", "10", "--moe-metrics-sample-tokens", "0"], "--moe-metrics-sample-tokens must be >= 1"),
    (["--moe-metrics-interval", "10", "--no-moe-reg-measure"], "drop --no-moe-reg-measure"),
])
def test_bad_plugin_options(argv, message):
    with pytest.raises(ConfigError) as info:
        parse_args(MOCK + argv, world_size=1)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_coupling_variant_is_a_one_line_cli_error():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "megatron_moe_reg.cli", "pretrain", *MOCK,
                           "--moe-coupling-loss-variant", "sum"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--moe-coupling-loss-variant: invalid choice: 'sum'" in proc.stderr


def test_specialization_with_top1_warns_that_it_is_zero():
    with pytest.warns(UserWarning, match="identically 0"):
        parse_args(MOCK + ["--moe-specialization-loss-coeff", "1e-3", "--moe-router-topk", "1",
                           "--moe-router-pre-softmax"], world_size=1)


def test_pairs_follow_the_moe_pattern_and_skip_stages_without_moe_layers():
    # 6 layers [1,0,0,0,1,1] on 3 stages of 2 layers: stage 1 holds no MoE layer.
    ctl = CouplingController(coeff=1.0, variant="product", moe_layers=[1, 5, 6], local_layers=[5, 6],
                             layer_stage={1: 0, 5: 2, 6: 2}, tracker=None, num_layers=6,
                             calculate_per_token_loss=False)
    assert ctl.prev == {5: 1, 6: 5} and ctl.next == {1: 5, 5: 6}
    assert ctl.skipped_pairs == [(1, 5)] and not ctl.needs_neighbours()
    adjacent = CouplingController(coeff=1.0, variant="log", moe_layers=[1, 3, 4], local_layers=[1],
                                  layer_stage={1: 0, 3: 1, 4: 1}, tracker=None, num_layers=4,
                                  calculate_per_token_loss=False)
    assert adjacent.skipped_pairs == [] and adjacent.needs_neighbours()
