"""Wrong invocations of every command: exit status 2, one line naming the flag or file, no traceback,
before any work starts (no process group, nothing written).

Each case runs the command in this process through ``moe-reg``'s own entry (``cli.main``); the
dataset cases corrupt copies of a dataset written by ``prepare-data``. Two cases run under torchrun
with two processes, where the line must appear once."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from helpers import MOCK, TINY_MODEL, data_flags, run_cli

TINY = [*TINY_MODEL, "--train-iters", "2"]
N_CASES = 42  # the rows of _cases


def _corrupt(dataset: dict, out: Path, how: str) -> dict:
    """A copy of the embedded dataset's train split, damaged as ``how`` says; returns its flags' manifest."""
    out.mkdir(parents=True, exist_ok=True)
    src = Path(dataset["train_data_path"])
    prefix = out / "train_text_document"
    for ext in (".bin", ".idx"):
        shutil.copy(str(src) + ext, str(prefix) + ext)
    idx, bin_ = Path(str(prefix) + ".idx"), Path(str(prefix) + ".bin")
    raw = bytearray(idx.read_bytes())
    if how == "truncated-bin":
        bin_.write_bytes(bin_.read_bytes()[:-10])
    elif how == "bad-header":
        raw[:4] = b"XXXX"
        idx.write_bytes(raw)
    elif how == "truncated-idx":
        idx.write_bytes(raw[: len(raw) // 2])
    elif how == "document-index":
        sequences, documents = struct.unpack_from("<QQ", raw, 18)
        struct.pack_into("<q", raw, len(raw) - 8, sequences + 5)  # the last document ends past the sequences
        idx.write_bytes(raw)
    elif how == "missing-bin":
        bin_.unlink()
    return {**dataset, "train_data_path": str(prefix), "valid_data_path": str(prefix)}


def _cases(tmp: Path, dataset: dict) -> list[tuple[str, list[str], str]]:
    a_file = tmp / "a_file"
    a_file.write_text("x")
    junk_model = tmp / "junk.model"
    junk_model.write_bytes(b"not a sentencepiece model")
    stale = tmp / "stale"
    (stale / "iter_0000003").mkdir(parents=True)
    (stale / "iter_0000003" / "metadata.json").write_text("{}")
    (stale / "iter_0000005.partial").mkdir()
    (stale / "latest_checkpointed_iteration.txt").write_text("5")
    damaged = tmp / "damaged"
    for iteration in (3, 6):
        (damaged / f"iter_{iteration:07d}").mkdir(parents=True)
        (damaged / f"iter_{iteration:07d}" / "metadata.json").write_text("{}")
    (damaged / "iter_0000006" / "common.pt").write_bytes(b"\x80\x02truncated")
    (damaged / "latest_checkpointed_iteration.txt").write_text("6")
    garbled = tmp / "garbled"
    garbled.mkdir()
    (garbled / "latest_checkpointed_iteration.txt").write_text("five\n")
    real = data_flags(dataset)
    p = ["pretrain", *TINY]
    cases = [
        ("mock and data", [*p, *MOCK, *real[2:4]], "--mock-data trains on random tokens"),
        ("no data", p, "--data-path (or --train-data-path) is required"),
        ("nan coefficient", [*p, *MOCK, "--moe-coupling-loss-coeff", "nan"], "--moe-coupling-loss-coeff"),
        ("inf lr", [*p, *MOCK, "--lr", "inf"], "--lr"),
        ("unknown flag", [*p, *MOCK, "--moe-coupling-loss-cof", "1"], "unrecognized arguments: --moe-coupling-loss"),
        ("bad choice", [*p, *MOCK, "--moe-router-type", "cosine"], "--moe-router-type"),
        ("not a number", [*p, *MOCK, "--hidden-size", "big"], "--hidden-size"),
        ("heads", [*p, *MOCK, "--num-attention-heads", "5"], "--num-attention-heads"),
        ("topk > experts", [*p, *MOCK, "--moe-router-topk", "9"], "--moe-router-topk"),
        ("ep too large", [*p, *MOCK, "--expert-model-parallel-size", "2"], "--expert-model-parallel-size"),
        ("warmup", [*p, *MOCK, "--lr-warmup-iters", "5"], "--lr-warmup-iters"),
        ("unsupported choice", [*p, *MOCK, "--position-embedding-type", "yarn"], "--position-embedding-type yarn"),
        ("missing config", [*p, *MOCK, "--config", str(tmp / "none.toml")], "none.toml"),
        ("save under a file", [*p, *MOCK, "--save", str(a_file / "ck")], f"--save {a_file / 'ck'}: cannot write"),
        ("tensorboard under a file", [*p, *MOCK, "--tensorboard-dir", str(a_file / "tb")], "--tensorboard-dir"),
        ("log file under a file", [*p, *MOCK, "--log-file", str(a_file / "r.jsonl")], "--log-file"),
        ("trace option without a trace", [*p, *MOCK, "--moe-routing-trace-dump-weights"],
         "--moe-routing-trace-dump-weights needs --moe-routing-trace-path DIR"),
        ("latest names a partial save", [*p, *MOCK, "--load", str(stale)],
         "names iteration 5, which is missing or partial; the newest complete one is 3 (--ckpt-step 3)"),
        ("garbled latest", [*p, *MOCK, "--load", str(garbled)], "holds 'five', not an iteration"),
        ("damaged common state", [*p, *MOCK, "--load", str(damaged)],
         f"{damaged / 'iter_0000006'} is damaged (UnpicklingError); the newest other complete one is 3"),
        ("load without a tracker", [*p, *MOCK, "--load", str(tmp)], "not a checkpoint directory"),
        ("missing ckpt step", [*p, *MOCK, "--load", str(stale), "--ckpt-step", "4"], "--ckpt-step 4"),
        ("missing tokenizer", [*p, "--tokenizer-model", str(tmp / "none.model"), *real[2:]],
         f"--tokenizer-model {tmp / 'none.model'}: file not found"),
        ("corrupt tokenizer", [*p, "--tokenizer-model", str(junk_model), *real[2:]], "not a SentencePiece model"),
        ("ids outside the vocabulary", [*p, "--tokenizer-type", "NullTokenizer", "--vocab-size", "16", *real[2:]],
         "outside the tokenizer's vocabulary of 16"),
        ("missing dataset", [*p, real[0], real[1], "--train-data-path", str(tmp / "nothing")], "nothing.bin not found"),
    ]
    for how, message in [("truncated-bin", "bytes, its index says"), ("bad-header", "bad header"),
                         ("truncated-idx", "is truncated"), ("document-index", "document index does not match"),
                         ("missing-bin", ".bin not found")]:
        broken = data_flags(_corrupt(dataset, tmp / how, how))
        cases.append((f"dataset: {how}", [*p, *broken], message))
    cases += [
        ("prepare-data: missing input", ["prepare-data", "--input", str(tmp / "none.jsonl"), "--output-dir",
                                         str(tmp / "d")], "none.jsonl"),
        ("prepare-data: non-empty output", ["prepare-data", "--output-dir", str(tmp)], f"--output-dir {tmp}"),
        ("analyze: not a checkpoint", ["analyze", "--load", str(tmp / "nothing"), "--out", str(tmp / "r")],
         "nothing"),
        ("adapt: not a checkpoint", ["adapt", "--load", str(tmp / "nothing"), "--domain", "x", "--out",
                                     str(tmp / "adapted")], "nothing"),
        ("analyze: --out inside --load", ["analyze", "--load", str(stale), "--out", str(stale / "report")],
         f"--out {stale / 'report'} is inside --load {stale}"),
        ("analyze: --out under a file", ["analyze", "--load", str(stale), "--out", str(a_file / "r")],
         "--out"),
        ("adapt: --out inside --load", ["adapt", "--load", str(stale), "--domain", "x", "--out", str(stale)],
         f"--out {stale} is inside --load {stale}"),
        ("unknown command", ["pretrian"], "unknown command 'pretrian'"),
        ("add-on: bad router", ["megatron-lm", "--moe-router-type", "cosine"], "--moe-router-type"),
        ("add-on: nan coefficient", ["megatron-lm", "--moe-specialization-loss-coeff", "nan"],
         "--moe-specialization-loss-coeff"),
        ("add-on: negative coefficient", ["megatron-lm", "--moe-coupling-loss-coeff", "-1"],
         "--moe-coupling-loss-coeff"),
    ]
    return cases


@pytest.fixture(scope="module")
def cases(embedded_dataset, tmp_path_factory):
    return _cases(tmp_path_factory.mktemp("bad"), embedded_dataset)


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    from megatron_moe_reg import cli

    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own exit, after its one line
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_sweep_has_at_least_30_cases(cases):
    assert len(cases) == N_CASES >= 30 and len({name for name, _, _ in cases}) == len(cases)


@pytest.mark.parametrize("index", range(N_CASES))
def test_bad_invocation(index, cases, capsys, monkeypatch):
    import torch.distributed as dist

    def no_work(*args, **kwargs):
        raise AssertionError("a process group was started: the check came after work began")

    monkeypatch.setattr(dist, "init_process_group", no_work)
    name, argv, message = cases[index]
    code, out, err = _run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (name, code, err[-2000:])
    assert len(lines) == 1 and message in lines[0], (name, lines)
    assert "Traceback" not in out + err


@pytest.mark.multiprocess
def test_under_torchrun_the_line_is_printed_once(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    proc = run_cli(["pretrain", *TINY, *MOCK, "--expert-model-parallel-size", "2", "--save", str(a_file / "ck")],
                   nproc=2, check=False)
    assert proc.returncode != 0  # torchrun reports its failed workers; no worker prints a traceback:
    assert not [line for line in proc.stderr.splitlines() if "megatron" in line and line.strip().startswith('File "')]
    assert proc.stderr.count(f"--save {a_file / 'ck'}: cannot write there") == 1, proc.stderr[-3000:]
