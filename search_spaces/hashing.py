"""The file hash every integrity check uses: the built-in assets' downloads and weights, a model's content hash
(a recipe's model identity), the student cache's entries. Here, at the bottom of the import graph, so planner
and search_spaces share one without either importing the other's internals."""
from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20  # read 1 MiB at a time: a weight file is never held in memory whole


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()
