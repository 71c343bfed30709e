"""The analysis tokens: N tokens of the validation documents, with their domains.

Documents are read from Megatron indexed datasets (``moe-reg prepare-data`` writes one document
per sequence and ``PREFIX.domains.json`` with each document's domain; without that file every
document of a prefix takes the prefix's name as its domain), taken round-robin over the domains
in pieces of up to 256 tokens so that N tokens cover as many domains as they can, joined and cut
into sequences of ``seq_length + 1`` tokens (inputs and next-token labels).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_moe_reg.errors import ConfigError


@dataclass
class AnalysisTokens:
    tokens: torch.Tensor  # [B, S] inputs
    labels: torch.Tensor  # [B, S] next tokens
    domains: torch.Tensor  # [B, S] domain index of each input token
    domain_names: list[str]


def _domains_of(prefix: str, num_documents: int) -> tuple[list[str], list[int]]:
    path = Path(prefix + ".domains.json")
    if path.is_file():
        meta = json.loads(path.read_text())
        if len(meta["document_domains"]) == num_documents:
            return list(meta["names"]), list(meta["document_domains"])
    return [Path(prefix).name], [0] * num_documents


def read_documents(
    prefixes: list[str], max_tokens: int, chunk: int = 256
) -> tuple[list[tuple[np.ndarray, int]], list[str]]:
    """(token ids, domain index) pieces of at most ``chunk`` tokens, taken round-robin over the
    domains (each domain's documents in index order), until ``max_tokens`` are read."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    names: list[str] = []
    by_domain: dict[int, list] = {}
    for prefix in prefixes:
        if not Path(prefix + ".idx").is_file():
            raise ConfigError(
                f"--data-path {prefix}: no {prefix}.idx (give the prefix of a Megatron indexed "
                "dataset, e.g. data/stdlib/valid_text_document)"
            )
        dataset = IndexedDataset(prefix)
        doc_names, doc_domains = _domains_of(prefix, len(dataset))
        offset = len(names)
        names += doc_names
        for i in range(len(dataset)):
            by_domain.setdefault(offset + doc_domains[i], []).append((dataset, i))
    return _round_robin(by_domain, max_tokens, chunk), names


def _round_robin(by_domain: dict[int, list], max_tokens: int, chunk: int) -> list[tuple[np.ndarray, int]]:
    """Pieces of at most ``chunk`` tokens, one per domain in turn, until ``max_tokens`` are taken."""
    streams = {d: [0, 0] for d in by_domain}  # domain -> [document position, token offset]
    pieces: list[tuple[np.ndarray, int]] = []
    have = 0
    while have < max_tokens and streams:
        for domain in sorted(streams):
            if have >= max_tokens:
                break
            position, offset = streams[domain]
            if position >= len(by_domain[domain]):
                del streams[domain]
                continue
            dataset, i = by_domain[domain][position]
            doc = dataset[i]
            piece = np.asarray(doc[offset : offset + min(chunk, max_tokens - have)], dtype=np.int64)
            pieces.append((piece, domain))
            have += len(piece)
            offset += len(piece)
            streams[domain] = [position + 1, 0] if offset >= len(doc) else [position, offset]
    return pieces


def sequences(docs: list[tuple[np.ndarray, int]], names: list[str], num_tokens: int, seq_length: int) -> AnalysisTokens:
    """The documents joined and cut into at most ``num_tokens`` input tokens (whole sequences)."""
    stream = torch.from_numpy(np.concatenate([d for d, _ in docs])) if docs else torch.zeros(0, dtype=torch.long)
    domain = torch.from_numpy(np.concatenate([np.full(len(d), k, dtype=np.int64) for d, k in docs])) if docs else stream
    rows = (min(num_tokens, stream.numel() - 1)) // seq_length
    if rows < 1:
        raise ConfigError(
            f"--data-path: {stream.numel()} tokens, fewer than one sequence of {seq_length + 1}; "
            "give more data or a checkpoint with a shorter --seq-length"
        )
    n = rows * seq_length
    return AnalysisTokens(
        tokens=stream[:n].reshape(rows, seq_length),
        labels=stream[1 : n + 1].reshape(rows, seq_length),
        domains=domain[:n].reshape(rows, seq_length),
        domain_names=names,
    )


def read_tokens(prefixes: list[str], num_tokens: int, seq_length: int) -> AnalysisTokens:
    docs, names = read_documents(prefixes, num_tokens + 1)
    return sequences(docs, names, num_tokens, seq_length)


def random_tokens(num_tokens: int, seq_length: int, vocab_size: int, seed: int = 1234) -> AnalysisTokens:
    """Uniform random tokens (for checkpoints trained on --mock-data): one domain."""
    rows = max(1, num_tokens // seq_length)
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, vocab_size, (rows * seq_length + 1,), generator=g)
    return AnalysisTokens(
        tokens=stream[:-1].reshape(rows, seq_length),
        labels=stream[1:].reshape(rows, seq_length),
        domains=torch.zeros(rows, seq_length, dtype=torch.long),
        domain_names=["mock"],
    )
