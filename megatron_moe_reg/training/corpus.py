"""Documents with domain labels: the embedded default corpus and the user's .txt/.jsonl files.

The embedded corpus is real text present on every machine with Python: the running
interpreter's standard-library source (``sysconfig`` "stdlib" path). Every ``.py`` file
is one document whose domain is its top-level module (``asyncio/events.py`` -> ``asyncio``).
Selection is deterministic: sorted relative paths, excluding tests, site-packages, GUI
demos and generated codec tables.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_moe_reg.errors import ConfigError

EXCLUDED_TOP_LEVEL = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "encodings",
        "__pycache__",
        "config-" + sys.version[:4],
    }
)


@dataclass(frozen=True)
class Document:
    text: str
    domain: str
    source: str  # file path (and line number for JSONL)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def embedded_corpus_files(root: Path | None = None) -> list[Path]:
    """The standard-library source files of the embedded corpus, in a fixed order."""
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in EXCLUDED_TOP_LEVEL or parts[0].startswith("config-"):
            continue
        if any(p in ("test", "tests", "__pycache__") or p.startswith("idle_test") for p in parts):
            continue
        files.append(path)
    return files


def embedded_corpus(root: Path | None = None) -> Iterator[Document]:
    root = root or stdlib_root()
    for path in embedded_corpus_files(root):
        rel = path.relative_to(root)
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield Document(text=text, domain=rel.parts[0].removesuffix(".py"), source=str(rel))


def user_corpus(paths: list[str], json_key: str = "text", domain_key: str = "domain") -> Iterator[Document]:
    """Documents from .txt files (one document per file, domain = file stem) and .jsonl files
    (one document per line, text under ``json_key``, domain under ``domain_key`` or the stem)."""
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"--input {name}: file not found")
        if path.suffix == ".txt":
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield Document(text=text, domain=path.stem, source=str(path))
        elif path.suffix in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise ConfigError(f"--input {name}:{lineno}: not a JSON object") from None
                    if not isinstance(record, dict) or json_key not in record:
                        raise ConfigError(f"--input {name}:{lineno}: no '{json_key}' field (set --json-key)")
                    text = str(record[json_key])
                    if text.strip():
                        yield Document(
                            text=text, domain=str(record.get(domain_key, path.stem)), source=f"{path}:{lineno}"
                        )
        else:
            raise ConfigError(f"--input {name}: expected a .txt or .jsonl file")


def is_validation(doc: Document, valid_fraction: float) -> bool:
    """Deterministic held-out split by a hash of the document's text: the same on every machine and
    wherever the files lie, and identical documents always fall on the same side."""
    h = int(hashlib.sha1(doc.text.encode()).hexdigest()[:8], 16)
    return (h % 10_000) < valid_fraction * 10_000


def fingerprint_files(paths: list[Path]) -> str:
    h = hashlib.sha1()
    for p in paths:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return h.hexdigest()
