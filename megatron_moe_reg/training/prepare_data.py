"""``moe-reg prepare-data``: text -> SentencePiece tokenizer -> Megatron indexed datasets.

Writes into ``--output-dir``:
  tokenizer.model                      (unless --tokenizer-model is given)
  train_text_document.{bin,idx}        megatron-core IndexedDataset, one EOD-terminated doc each
  valid_text_document.{bin,idx}        held-out documents (deterministic hash split)
  {split}_text_document.domains.json   domain label of every document
  manifest.json                        what was built from what; a re-run with the same
                                       inputs and options reuses it
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megatron_moe_reg import __version__
from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.flags import OneLineErrorParser
from megatron_moe_reg.training import corpus
from megatron_moe_reg.training.tokenizer import SentencePieceTokenizer, train_sentencepiece

SPLITS = ("train", "valid")


@dataclass
class PrepareOptions:
    output_dir: str
    input: list[str] | None = None
    tokenizer_model: str | None = None
    vocab_size: int = 8192
    valid_fraction: float = 0.05
    json_key: str = "text"
    domain_key: str = "domain"
    max_documents: int | None = None
    tokenizer_sample_lines: int = 200_000
    overwrite: bool = False


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser(prog="moe-reg prepare-data", description="Build a tokenizer and Megatron indexed datasets.")
    p.add_argument("--output-dir", required=True, help="directory to write into")
    p.add_argument(
        "--input",
        nargs="+",
        help=".txt/.jsonl files (default: the embedded corpus, this Python's standard-library source)",
    )
    p.add_argument("--tokenizer-model", help="use this SentencePiece model instead of training one")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained tokenizer")
    p.add_argument("--valid-fraction", type=float, default=0.05, help="held-out share of documents")
    p.add_argument("--json-key", default="text", help="text field of .jsonl records")
    p.add_argument("--domain-key", default="domain", help="domain field of .jsonl records")
    p.add_argument("--max-documents", type=int, help="use only the first N documents")
    p.add_argument(
        "--tokenizer-sample-lines", type=int, default=200_000, help="lines (evenly spaced) used to train the tokenizer"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a dataset in --output-dir built from other inputs")
    return p


def dataset_prefix(output_dir: str | Path, split: str) -> str:
    return str(Path(output_dir) / f"{split}_text_document")


def _validate(o: PrepareOptions) -> None:
    if not 0.0 < o.valid_fraction < 1.0:
        raise ConfigError(f"--valid-fraction must be in (0, 1), got {o.valid_fraction}")
    if o.tokenizer_model is None and o.vocab_size < 300:
        raise ConfigError(f"--vocab-size {o.vocab_size} is too small for a byte-fallback tokenizer (>= 300)")
    if o.max_documents is not None and o.max_documents < 2:
        raise ConfigError("--max-documents must be >= 2 (one for training, one held out)")


def _fingerprint(o: PrepareOptions) -> dict:
    if o.input:
        files = [Path(p) for p in o.input]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise ConfigError(f"--input {missing[0]}: file not found")
        source = {"kind": "files", "files": [str(p) for p in files]}
    else:
        files = corpus.embedded_corpus_files()
        source = {"kind": "embedded", "root": str(corpus.stdlib_root())}
    if o.tokenizer_model:
        files = files + [Path(o.tokenizer_model)]
    options = {k: v for k, v in asdict(o).items() if k not in ("output_dir", "overwrite")}
    return {"version": __version__, "source": source, "options": options, "files_sha1": corpus.fingerprint_files(files)}


def _tokenizer_lines(docs: list[corpus.Document], limit: int) -> list[str]:
    lines = [line for d in docs for line in d.text.split("\n") if line.strip()]
    if len(lines) > limit:
        step = len(lines) / limit
        lines = [lines[int(i * step)] for i in range(limit)]
    return lines


def _write_split(docs: list[corpus.Document], tokenizer: SentencePieceTokenizer, prefix: str) -> tuple[int, int]:
    """Write one split; returns (tokens, largest token id)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = np.uint16 if tokenizer.vocab_size < 65500 else np.int32
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    import torch

    n_tokens = largest = 0
    batch = 256
    for start in range(0, len(docs), batch):
        chunk = docs[start : start + batch]
        for ids in tokenizer.tokenize_many([d.text for d in chunk]):
            ids = ids + [tokenizer.eod]
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            n_tokens += len(ids)
            largest = max(largest, max(ids))
    builder.finalize(prefix + ".idx")
    names = sorted({d.domain for d in docs})
    index = {n: i for i, n in enumerate(names)}
    Path(prefix + ".domains.json").write_text(
        json.dumps(
            {
                "names": names,
                "document_domains": [index[d.domain] for d in docs],
                "document_sources": [d.source for d in docs],
            }
        )
    )
    return n_tokens, largest


def prepare(o: PrepareOptions, log=print) -> dict:
    """Build (or reuse) the tokenizer and datasets. Returns the manifest."""
    _validate(o)
    out = Path(o.output_dir)
    manifest_path = out / "manifest.json"
    fingerprint = _fingerprint(o)
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == fingerprint and all(Path(p).is_file() for p in manifest["files"]):
            log(f"reusing the dataset in {out} (same inputs and options)")
            return manifest
        if not o.overwrite:
            raise ConfigError(
                f"--output-dir {out} holds a dataset built from other inputs or options; "
                "choose another --output-dir or pass --overwrite"
            )
    elif out.exists() and any(out.iterdir()) and not o.overwrite:
        raise ConfigError(
            f"--output-dir {out} is not empty and holds no dataset manifest; choose an empty or new directory"
        )

    started = time.time()
    docs = list(corpus.user_corpus(o.input, o.json_key, o.domain_key) if o.input else corpus.embedded_corpus())
    if o.max_documents is not None:
        docs = docs[: o.max_documents]
    split_docs = {"valid": [d for d in docs if corpus.is_validation(d, o.valid_fraction)]}
    split_docs["train"] = [d for d in docs if not corpus.is_validation(d, o.valid_fraction)]
    if not split_docs["valid"]:  # tiny inputs: hold out the last document
        split_docs["valid"], split_docs["train"] = docs[-1:], docs[:-1]
    if not split_docs["train"]:
        raise ConfigError("--input holds too few documents to keep one for training")

    # Build into a temporary directory, then move into place: a failure leaves nothing half-written.
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if o.tokenizer_model:
        tokenizer_path = str(Path(o.tokenizer_model).resolve())
    else:
        log(f"training a {o.vocab_size}-piece SentencePiece tokenizer on {len(split_docs['train'])} documents")
        train_sentencepiece(
            _tokenizer_lines(split_docs["train"], o.tokenizer_sample_lines), str(tmp / "tokenizer"), o.vocab_size
        )
        tokenizer_path = str(tmp / "tokenizer.model")
    tokenizer = SentencePieceTokenizer(tokenizer_path)
    counts = {}
    for split in SPLITS:
        n, largest = _write_split(split_docs[split], tokenizer, dataset_prefix(tmp, split))
        counts[split] = {"documents": len(split_docs[split]), "tokens": n, "max_token_id": largest}
        log(f"{split}: {len(split_docs[split])} documents, {n} tokens")

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for item in sorted(tmp.iterdir()):
        target = out / item.name
        item.replace(target)
        files.append(str(target))
    shutil.rmtree(tmp, ignore_errors=True)
    if not o.tokenizer_model:
        tokenizer_path = str(out / "tokenizer.model")
    manifest = {
        "fingerprint": fingerprint,
        "files": files,
        "tokenizer_model": tokenizer_path,
        "vocab_size": tokenizer.vocab_size,
        "max_token_id": max(c["max_token_id"] for c in counts.values()),  # read by pretrain's start-up check
        "splits": counts,
        "train_data_path": dataset_prefix(out, "train"),
        "valid_data_path": dataset_prefix(out, "valid"),
        "seconds": round(time.time() - started, 1),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


def pretrain_flags(manifest: dict) -> str:
    return (
        f"--tokenizer-model {manifest['tokenizer_model']} "
        f"--train-data-path {manifest['train_data_path']} "
        f"--valid-data-path {manifest['valid_data_path']}"
    )


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    options = PrepareOptions(**vars(ns))
    manifest = prepare(options)
    print(f"dataset ready; train with: moe-reg pretrain {pretrain_flags(manifest)}", flush=True)
    return 0
