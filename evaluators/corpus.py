"""Text corpora split into a training/calibration part and a held-out evaluation part.

Splits are by work (whole files), never by line, so no held-out text ever leaks into calibration or
distillation data. A single file is the one exception: it is cut once, at a line boundary.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".text")


class CorpusError(ValueError):
    """A corpus that cannot be read or split; the message is meant for the user."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    source: str
    train: tuple[Document, ...]
    eval: tuple[Document, ...]
    split_rule: str

    def summary(self) -> dict:
        return {
            "source": self.source,
            "split_rule": self.split_rule,
            "train_documents": [d.name for d in self.train],
            "eval_documents": [d.name for d in self.eval],
            "train_chars": sum(len(d.text) for d in self.train),
            "eval_chars": sum(len(d.text) for d in self.eval),
        }


def read_text_file(path: Path) -> str:
    """Read a UTF-8 text file, refusing binary files with a clear message."""
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise CorpusError(f"data file {path} looks binary (it contains NUL bytes), not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"data file {path} is not UTF-8 text (bad byte at offset {exc.start})") from None


def dedupe(documents: list[Document]) -> list[Document]:
    """Drop byte-identical copies stored under another name (keeps the first)."""
    seen: set[str] = set()
    unique = []
    for doc in documents:
        digest = hashlib.sha256(doc.text.encode("utf-8")).hexdigest()
        if digest not in seen:
            seen.add(digest)
            unique.append(doc)
    return unique


def split_text(text: str, eval_fraction: float) -> tuple[str, str]:
    """Cut one text at the line boundary nearest to (1 - eval_fraction) of its length."""
    cut = int(len(text) * (1.0 - eval_fraction))
    newline = text.rfind("\n", 0, cut)
    if newline > 0:
        cut = newline + 1
    return text[:cut], text[cut:]


def split_documents(source: str, documents: list[Document], eval_fraction: float = 0.1) -> Corpus:
    """Hold out every k-th work (k = 1/eval_fraction) in name order; one work is cut in two."""
    documents = [d for d in dedupe(documents) if d.text.strip()]
    if not documents:
        raise CorpusError(f"corpus {source} is empty (no text found)")
    if len(documents) == 1:
        head, tail = split_text(documents[0].text, eval_fraction)
        if not head.strip() or not tail.strip():
            raise CorpusError(f"corpus {source} is too short to split into training and held-out text")
        name = documents[0].name
        rule = f"single text cut at a line boundary: last {eval_fraction:.0%} held out"
        return Corpus(source, (Document(name, head),), (Document(name, tail),), rule)
    documents = sorted(documents, key=lambda d: d.name)
    step = max(2, round(1.0 / eval_fraction))
    held_out = set(range(step - 1, len(documents), step)) or {len(documents) - 1}
    train = tuple(d for i, d in enumerate(documents) if i not in held_out)
    evaluation = tuple(d for i, d in enumerate(documents) if i in held_out)
    rule = f"by work: every {step}th file in name order held out"
    return Corpus(source, train, evaluation, rule)


def read_documents(path: Path) -> list[Document]:
    """Documents from a text file, or from every text file under a folder (recursively)."""
    if path.is_file():
        return [Document(path.name, read_text_file(path))]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise CorpusError(f"data folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    return [Document(str(p.relative_to(path)), read_text_file(p)) for p in files]


def load_split_folders(source: str, root: Path, rule: str) -> Corpus:
    """A corpus already split on disk as root/train/*.txt and root/eval/*.txt."""
    train = read_documents(root / "train")
    evaluation = read_documents(root / "eval")
    return Corpus(source, tuple(train), tuple(evaluation), rule)
