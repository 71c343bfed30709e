"""Tokenizers for GPT datasets: SentencePiece (trained by ``prepare-data`` or the user's) and Null.

Both expose what megatron-core's ``GPTDataset`` reads from a tokenizer (``vocab_size``,
``eod``, ``pad``, ``unique_identifiers``). ``eod`` is SentencePiece's end-of-sentence id,
as in Megatron-LM's ``GPTSentencePieceTokenizer``.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from megatron_moe_reg.errors import ConfigError

# Special ids used when ``prepare-data`` trains a tokenizer.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


class SentencePieceTokenizer:
    def __init__(self, model_path: str):
        path = Path(model_path)
        if not path.is_file():
            raise ConfigError(f"--tokenizer-model {model_path}: file not found")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"--tokenizer-model {model_path}: not a SentencePiece model ({e})") from None
        self.model_path = str(path)
        digest = hashlib.sha1(path.read_bytes()).hexdigest()[:16]
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("model_sha1", digest), ("vocab_size", self.vocab_size)]
        )

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    eos = eod

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        return self._sp.pad_id()

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_many(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode(list(ids))


class NullTokenizer:
    """Token ids are the data; the last id is end-of-document (Megatron's NullTokenizer)."""

    def __init__(self, vocab_size: int):
        self._vocab_size = vocab_size
        self.unique_identifiers = OrderedDict([("class", type(self).__name__), ("vocab_size", vocab_size)])

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._vocab_size - 1

    eos = eod

    @property
    def pad(self) -> int:
        return -1


def train_sentencepiece(sentences: Iterable[str], model_prefix: str, vocab_size: int) -> str:
    """Train a byte-fallback BPE SentencePiece model that round-trips text exactly.

    Identity normalization and no whitespace folding keep code indentation; newlines are
    a user-defined piece because SentencePiece trains on single lines.
    """
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type="bpe",
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"],
            max_sentencepiece_length=16,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            minloglevel=2,
            num_threads=2,
            train_extremely_large_corpus=False,
        )
    except RuntimeError as e:
        most = re.search(r"Vocabulary size too high.*<= (\d+)", str(e))
        least = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", str(e))
        if most:
            raise ConfigError(
                f"--vocab-size {vocab_size} is more than the training text yields "
                f"({most.group(1)} pieces); lower --vocab-size or add documents"
            ) from None
        if least:
            raise ConfigError(
                f"--vocab-size {vocab_size} is less than the {least.group(1)} pieces the text's "
                "characters and the 256 byte pieces need; raise --vocab-size"
            ) from None
        raise
    return model_prefix + ".model"


Tokenizer = SentencePieceTokenizer | NullTokenizer


def build_tokenizer(data_args, vocab_size: int | None) -> Tokenizer:
    if data_args.tokenizer_type == "NullTokenizer" or (data_args.mock_data and not data_args.tokenizer_model):
        if vocab_size is None:
            raise ConfigError("--vocab-size is required with --mock-data or --tokenizer-type NullTokenizer")
        return NullTokenizer(vocab_size)
    return SentencePieceTokenizer(data_args.tokenizer_model)
