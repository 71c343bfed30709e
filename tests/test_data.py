"""prepare-data: embedded corpus, tokenizer, Megatron indexed datasets, domains, reuse."""

import json
import os

import pytest

from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.training import corpus
from megatron_moe_reg.training.prepare_data import PrepareOptions, dataset_prefix, prepare
from megatron_moe_reg.training.tokenizer import SentencePieceTokenizer

TEXTS = {
    "poems": "Roses are red,\n    violets are blue;\nindentation\tand tabs survive.\n",
    "code": "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n    pass\n",
    "prose": "The quick brown fox jumps over the lazy dog. " * 20,
}


def test_embedded_corpus_is_deterministic_and_labelled():
    files = corpus.embedded_corpus_files()
    assert files == corpus.embedded_corpus_files()
    assert len(files) > 100
    rel = [str(f.relative_to(corpus.stdlib_root())) for f in files]
    assert rel == sorted(rel)
    assert not any(part in ("test", "tests", "site-packages") for r in rel for part in r.split("/"))
    docs = {d.source: d for d in corpus.embedded_corpus()}
    assert docs["json/decoder.py"].domain == "json"
    assert docs["argparse.py"].domain == "argparse"
    assert "class ArgumentParser" in docs["argparse.py"].text


def _write_inputs(tmp_path):
    paths = []
    for name, text in TEXTS.items():
        p = tmp_path / f"{name}.txt"
        p.write_text(text)
        paths.append(str(p))
    jl = tmp_path / "records.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"record {i}: " + TEXTS['prose'][:80], "domain": f"d{i % 2}"})
                            for i in range(6)) + "\n")
    return paths + [str(jl)]


def test_round_trip_text_tokens_dataset(tmp_path):
    """Text -> SentencePiece ids -> IndexedDataset -> GPTDataset sample: the same tokens and text."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    inputs = _write_inputs(tmp_path)
    out = tmp_path / "ds"
    manifest = prepare(PrepareOptions(output_dir=str(out), input=inputs, vocab_size=340,
                                      valid_fraction=0.2), log=lambda *_: None)
    tok = SentencePieceTokenizer(manifest["tokenizer_model"])
    docs = list(corpus.user_corpus(inputs))
    by_split = {s: [d for d in docs if corpus.is_validation(d, 0.2)] if s == "valid"
                else [d for d in docs if not corpus.is_validation(d, 0.2)] for s in ("train", "valid")}
    for split, split_docs in by_split.items():
        ds = IndexedDataset(dataset_prefix(out, split))  # kept alive while its arrays are read
        assert len(ds) == len(split_docs)
        meta = json.loads((out / f"{split}_text_document.domains.json").read_text())
        for i, doc in enumerate(split_docs):
            ids = ds[i].tolist()
            assert ids[-1] == tok.eod
            assert ids[:-1] == tok.tokenize(doc.text)
            assert tok.detokenize(ids[:-1]) == doc.text  # whitespace and newlines survive
            assert meta["names"][meta["document_domains"][i]] == doc.domain
            assert meta["document_sources"][i] == doc.source
    domains = {d.domain for d in docs}
    assert {"poems", "code", "prose", "d0", "d1"} == domains


def test_gpt_dataset_reads_the_same_tokens(tmp_path):
    """megatron-core's GPTDataset over the prepared files yields the concatenated documents."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = tmp_path / "ds"
    manifest = prepare(PrepareOptions(output_dir=str(out), input=_write_inputs(tmp_path), vocab_size=340,
                                      valid_fraction=0.2), log=lambda *_: None)
    tok = SentencePieceTokenizer(manifest["tokenizer_model"])
    prefix = manifest["train_data_path"]
    config = GPTDatasetConfig(random_seed=1, sequence_length=16, blend=([prefix], None), split="100,0,0",
                              tokenizer=tok, reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, path_to_cache=str(tmp_path / "cache"))
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [8, 0, 0], lambda: True, config).build()
    indexed = IndexedDataset(prefix)
    docs = [tuple(int(t) for t in indexed[i]) for i in range(len(indexed))]

    def inside_a_document(piece: tuple) -> bool:
        return any(doc[j:j + len(piece)] == piece for doc in docs for j in range(len(doc) - len(piece) + 1))

    assert len(train) >= 8
    for i in range(len(train)):
        sample = train[i]
        full = [int(t) for t in sample["tokens"]] + [int(sample["labels"][-1])]
        assert sample["labels"][:-1].tolist() == sample["tokens"][1:].tolist()
        piece: list[int] = []
        for t in full:  # each EOD-terminated run is a contiguous part of one document
            piece.append(t)
            if t == tok.eod:
                assert inside_a_document(tuple(piece))
                piece = []
        assert not piece or inside_a_document(tuple(piece))


def test_rerun_reuses_and_other_inputs_are_refused(tmp_path):
    inputs = _write_inputs(tmp_path)
    out = tmp_path / "ds"
    logs = []
    first = prepare(PrepareOptions(output_dir=str(out), input=inputs, vocab_size=340), log=logs.append)
    mtimes = {p: os.stat(p).st_mtime_ns for p in first["files"]}
    second = prepare(PrepareOptions(output_dir=str(out), input=inputs, vocab_size=340), log=logs.append)
    assert second == first and any("reusing" in line for line in logs)
    assert mtimes == {p: os.stat(p).st_mtime_ns for p in first["files"]}
    with pytest.raises(ConfigError, match="holds a dataset built from other inputs"):
        prepare(PrepareOptions(output_dir=str(out), input=inputs[:2], vocab_size=340), log=logs.append)
    assert mtimes == {p: os.stat(p).st_mtime_ns for p in first["files"]}  # untouched


def test_existing_tokenizer_is_used(tmp_path):
    inputs = _write_inputs(tmp_path)
    first = prepare(PrepareOptions(output_dir=str(tmp_path / "a"), input=inputs, vocab_size=340),
                    log=lambda *_: None)
    second = prepare(PrepareOptions(output_dir=str(tmp_path / "b"), input=inputs,
                                    tokenizer_model=first["tokenizer_model"]), log=lambda *_: None)
    assert second["tokenizer_model"] == first["tokenizer_model"]
    assert not (tmp_path / "b" / "tokenizer.model").exists()


@pytest.mark.parametrize("content, message", [
    ("not json\n", "not a JSON object"),
    ('{"body": "x"}\n', "no 'text' field"),
])
def test_bad_jsonl_is_reported(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(ConfigError, match=message):
        prepare(PrepareOptions(output_dir=str(tmp_path / "o"), input=[str(p), str(p)], vocab_size=340),
                log=lambda *_: None)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("vocab, message", [
    (5000, r"--vocab-size 5000 is more than the training text yields \(\d+ pieces\); lower --vocab-size"),
    (300, r"--vocab-size 300 is less than the \d+ pieces the text's characters and the 256 byte pieces need"),
])
def test_unreachable_vocabulary_size_is_a_one_line_error(tmp_path, vocab, message):
    with pytest.raises(ConfigError, match=message):
        prepare(PrepareOptions(output_dir=str(tmp_path / "o"), input=_write_inputs(tmp_path), vocab_size=vocab),
                log=lambda *_: None)
    assert not (tmp_path / "o").exists()


def test_split_depends_on_the_text_not_on_where_the_files_are(tmp_path):
    a, b = tmp_path / "a", tmp_path / "elsewhere" / "b"
    a.mkdir()
    b.mkdir(parents=True)
    splits = []
    for folder in (a, b):
        docs = list(corpus.user_corpus(_write_inputs(folder)))
        splits.append([corpus.is_validation(d, 0.3) for d in docs])
    assert splits[0] == splits[1] and any(splits[0]) and not all(splits[0])
