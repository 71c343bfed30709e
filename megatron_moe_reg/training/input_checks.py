"""Inputs checked before any work starts, each failure one line naming the flag or file.

- Megatron indexed datasets (``PREFIX.idx`` / ``PREFIX.bin``): present; the ``.idx`` header
  (``MMIDIDX\\x00\\x00``, version 1, dtype code, sequence and document counts), its arrays complete;
  document indices rising from 0 to the sequence count; the ``.bin`` exactly as long as the index says;
  token ids below the tokenizer's vocabulary, on a sample of the ``.bin`` (every token with
  ``--data-full-scan``; a manifest of ``prepare-data`` next to the files gives its largest id instead);
- the SentencePiece model loads;
- output locations (``--save``, ``--tensorboard-dir``, ``--log-file``'s folder) can be created and
  written;
- ``--load``: its ``latest_checkpointed_iteration.txt`` names a complete iteration (else the newest
  complete one is named, for ``--ckpt-step``);
- ``--moe-routing-trace-path``: writable, and no earlier trace in it would be overwritten.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.training.routing_trace import check_trace_dir

INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron.core.datasets.indexed_dataset's
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
SAMPLED_TOKENS = 1 << 20  # tokens read by the sampled vocabulary check, in 64 evenly spaced runs
TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron-LM's, naming a checkpoint folder's newest iteration


def iteration_dir(root: str | Path, iteration: int) -> Path:
    """``{root}/iter_{iteration:07d}``: one checkpoint, in Megatron-LM's directory layout."""
    return Path(root) / f"iter_{iteration:07d}"


def dataset_prefixes(values: list[str] | None) -> list[str]:
    """The prefixes of a Megatron blend (``[w1] p1 [w2] p2``: weights are numbers)."""
    prefixes = []
    for value in values or []:
        try:
            float(value)
        except ValueError:
            prefixes.append(value)
    return prefixes


def _max_id_from_manifest(prefix: str) -> int | None:
    manifest = Path(prefix).parent / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    written = {os.path.realpath(p) for p in (data.get("train_data_path"), data.get("valid_data_path")) if p}
    return data.get("max_token_id") if os.path.realpath(prefix) in written else None


def check_indexed_dataset(prefix: str, flag: str, vocab_size: int | None, full_scan: bool = False) -> None:
    """One line for a missing, truncated or corrupt ``PREFIX.idx``/``.bin`` pair or out-of-vocabulary ids."""
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    for path in (idx, bin_):
        if not path.is_file():
            raise ConfigError(f"{flag} {prefix}: {path} not found (a dataset prefix names PREFIX.bin and PREFIX.idx)")
    raw = idx.read_bytes()
    head = len(INDEX_HEADER) + 8 + 1 + 8 + 8
    if len(raw) < head or raw[: len(INDEX_HEADER)] != INDEX_HEADER:
        raise ConfigError(f"{flag} {prefix}: {idx} is not a Megatron indexed-dataset index (bad header)")
    offset = len(INDEX_HEADER)
    version, code = struct.unpack_from("<QB", raw, offset)
    sequences, documents = struct.unpack_from("<QQ", raw, offset + 9)
    if version != 1 or code not in DTYPES:
        raise ConfigError(f"{flag} {prefix}: {idx} has version {version}, dtype code {code}; not readable")
    need = head + sequences * (4 + 8) + documents * 8
    if len(raw) < need:
        raise ConfigError(f"{flag} {prefix}: {idx} is truncated ({len(raw)} bytes, its counts need {need})")
    lengths = np.frombuffer(raw, np.int32, sequences, head)
    pointers = np.frombuffer(raw, np.int64, sequences, head + lengths.nbytes)
    doc_index = np.frombuffer(raw, np.int64, documents, head + lengths.nbytes + pointers.nbytes)
    if documents == 0 or doc_index[0] != 0 or doc_index[-1] != sequences or (np.diff(doc_index) < 0).any():
        raise ConfigError(
            f"{flag} {prefix}: {idx}'s document index does not match its {sequences} sequences (corrupt index)"
        )
    dtype = np.dtype(DTYPES[code])
    expected = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if sequences else 0
    if bin_.stat().st_size != expected:
        raise ConfigError(
            f"{flag} {prefix}: {bin_} has {bin_.stat().st_size} bytes, its index says {expected} (truncated or "
            "not the index's .bin)"
        )
    if vocab_size is None or not sequences:
        return
    largest = None if full_scan else _max_id_from_manifest(prefix)
    if largest is None:
        tokens = np.memmap(bin_, dtype=dtype, mode="r")
        if full_scan or tokens.size <= SAMPLED_TOKENS:
            largest = int(tokens.max())
        else:
            run = SAMPLED_TOKENS // 64
            starts = np.linspace(0, tokens.size - run, 64).astype(np.int64)
            largest = max(int(tokens[s : s + run].max()) for s in starts)
    if largest >= vocab_size:
        raise ConfigError(
            f"{flag} {prefix}: token id {largest} is outside the tokenizer's vocabulary of {vocab_size} "
            "(another tokenizer wrote this dataset? pass its --tokenizer-model)"
        )


def sentencepiece_vocab_size(path: str) -> int:
    if not Path(path).is_file():
        raise ConfigError(f"--tokenizer-model {path} not found")
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=path).vocab_size()
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"--tokenizer-model {path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None


def check_writable_dir(path: str, flag: str) -> None:
    """``path`` can be created and a file written in it (a probe file, removed again)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".moe-reg-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write there ({e.strerror or e}); choose another location") from None


def complete_iterations(root: Path) -> list[int]:
    """Iterations of a checkpoint directory whose save finished (renamed from ``.partial``, with metadata)."""
    found = []
    for child in root.glob("iter_*"):
        name = child.name[len("iter_") :]
        if name.isdigit() and (child / "metadata.json").is_file():
            found.append(int(name))
    return sorted(found)


def check_checkpoint_dir(load: str, ckpt_step: int | None, resuming_into_save: bool) -> None:
    """``--load`` (and ``--ckpt-step``) name a complete checkpoint. ``resuming_into_save``: --load is --save,
    where a missing or empty directory means a fresh start."""
    root = Path(load)
    if not root.is_dir():
        if resuming_into_save:
            return
        raise ConfigError(f"--load {load}: no such directory")
    tracker = root / TRACKER_FILE
    complete = complete_iterations(root)
    newest = (
        f"the newest complete one is {complete[-1]} (--ckpt-step {complete[-1]})" if complete else "none is complete"
    )
    if ckpt_step is not None:
        if ckpt_step not in complete:
            raise ConfigError(
                f"--ckpt-step {ckpt_step}: {iteration_dir(root, ckpt_step)} is missing or partial; {newest}"
            )
        _check_readable(root, ckpt_step, complete)
        return
    if not tracker.exists():
        if resuming_into_save and not complete:
            return
        hint = f"; {newest}" if complete else ""
        raise ConfigError(f"--load {load}: no {TRACKER_FILE} found (not a checkpoint directory){hint}")
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ConfigError(f"--load {load}: {tracker} holds {text[:40]!r}, not an iteration; {newest}")
    if int(text) not in complete:
        raise ConfigError(
            f"--load {load}: {TRACKER_FILE} names iteration {text}, which is missing or partial; {newest}"
        )
    _check_readable(root, int(text), complete)


def _check_readable(root: Path, iteration: int, complete: list[int]) -> None:
    """The iteration's metadata parses and its common state (``common.pt``, before megatron-core 0.19's
    format) loads."""
    path = iteration_dir(root, iteration)
    others = [i for i in complete if i != iteration]
    other = f"the newest other complete one is {others[-1]} (--ckpt-step {others[-1]})" if others else "no other"
    try:
        json.loads((path / "metadata.json").read_text())
        if (path / "common.pt").is_file():
            import torch

            torch.load(path / "common.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # any failure to read is a damaged file
        raise ConfigError(f"--load {root}: {path} is damaged ({type(e).__name__}); {other}") from None


def check_run_inputs(cfg) -> None:
    """Every file and folder ``moe-reg pretrain`` reads or writes, before the processes start work."""
    d, ck, log = cfg.data, cfg.ckpt, cfg.log
    null_tokenizer = d.tokenizer_type == "NullTokenizer" or (d.mock_data and not d.tokenizer_model)
    if null_tokenizer:
        vocab = cfg.model.vocab_size
    else:
        vocab = sentencepiece_vocab_size(d.tokenizer_model) if d.tokenizer_model else None
    if not d.mock_data:
        for flag, values in (
            ("--data-path", d.data_path),
            ("--train-data-path", d.train_data_path),
            ("--valid-data-path", d.valid_data_path),
            ("--test-data-path", d.test_data_path),
        ):
            for prefix in dataset_prefixes(values):
                check_indexed_dataset(prefix, flag, vocab, d.data_full_scan)
    if ck.save:
        check_writable_dir(ck.save, "--save")
    if log.tensorboard_dir:
        check_writable_dir(log.tensorboard_dir, "--tensorboard-dir")
    if log.log_file:
        check_writable_dir(os.path.dirname(os.path.abspath(log.log_file)), "--log-file")
    if ck.load:
        check_checkpoint_dir(ck.load, ck.ckpt_step, resuming_into_save=ck.load == ck.save)
    if log.moe_routing_trace_path:
        check_trace_dir(log.moe_routing_trace_path, resumes=resumes_from_checkpoint(ck))
        check_writable_dir(log.moe_routing_trace_path, "--moe-routing-trace-path")


def resumes_from_checkpoint(ck) -> bool:
    """The run continues a checkpoint's iteration (``--load`` holds one, and no ``--finetune``); call
    after ``check_checkpoint_dir``."""
    if not ck.load or ck.finetune:
        return False
    return ck.ckpt_step is not None or (Path(ck.load) / TRACKER_FILE).is_file()


def check_output_outside(out: str, flag: str, loads: list[str]) -> None:
    """A command that reads checkpoints never writes into one: ``out`` is not inside a ``--load``."""
    target = Path(out).resolve()
    for load in loads:
        root = Path(load).resolve()
        if target == root or root in target.parents:
            raise ConfigError(f"{flag} {out} is inside --load {load}; write the results somewhere else")
    check_writable_dir(out, flag)
