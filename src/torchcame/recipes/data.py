"""Byte-level corpora and batches for the recipes; nothing is ever downloaded.

The default corpus is the Python standard library of the running interpreter
(``sysconfig.get_paths()["stdlib"]``): every ``*.py`` file outside ``site-packages``, listed
in sorted order, split into train and validation *by file* with a hash of the file's relative
path (so a file never straddles the split, and the split does not depend on which other files
exist), then read in a deterministic hash order until a byte cap is reached so startup stays
fast. ``--data PATH`` replaces it with any text file (split by contiguous chunks) or folder
(every regular file, split by file like the default).

Tokens are bytes (vocabulary 256). Training batches are random windows drawn from a
``torch.Generator`` seeded by the data seed, so every optimizer of a comparison sees the same
batches in the same order; validation batches are fixed, evenly spaced windows.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "Corpus",
    "load_corpus",
    "load_pydoc_topics",
    "stdlib_files",
    "split_of",
    "BatchSampler",
    "mask_tokens",
    "BYTE_VOCAB",
    "PAD_ID",
    "MASK_ID",
    "CLS_ID",
    "SEP_ID",
    "MLM_VOCAB",
]

BYTE_VOCAB = 256
# special ids for the masked language model, above the 256 byte values
PAD_ID, MASK_ID, CLS_ID, SEP_ID = 256, 257, 258, 259
MLM_VOCAB = 260

FILE_SEPARATOR = b"\n\n"
DEFAULT_MAX_BYTES = 8_000_000
DEFAULT_VAL_FRACTION = 0.1


def _path_hash(rel_path: str) -> int:
    return int.from_bytes(hashlib.sha1(rel_path.encode("utf-8")).digest()[:8], "big")


def split_of(rel_path: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> str:
    """``"val"`` or ``"train"`` for a file, from a hash of its relative (POSIX) path."""
    return "val" if (_path_hash(rel_path) % 10_000) < val_fraction * 10_000 else "train"


def stdlib_files(root: str | os.PathLike[str] | None = None) -> tuple[Path, list[str]]:
    """The sorted relative paths of the ``*.py`` files of the standard library.

    Args:
        root: the library folder; default ``sysconfig.get_paths()["stdlib"]``.

    Returns:
        ``(root, paths)``, excluding ``site-packages``/``dist-packages`` (installed packages,
        not the standard library).
    """
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune installed packages and caches in place, so os.walk does not descend into them
        dirnames[:] = [
            d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
        ]
        rel_dir = Path(dirpath).relative_to(root)
        paths += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    return root, sorted(paths)


@dataclass
class Corpus:
    """A byte corpus split into train and validation token streams.

    Attributes:
        name: a short description of the source.
        train: 1-D ``uint8`` tensor of training bytes.
        val: 1-D ``uint8`` tensor of validation bytes.
        train_files: relative paths of the files in ``train`` (empty for a single file).
        val_files: relative paths of the files in ``val``.
        sha256: fingerprint of ``train`` and ``val``, to tell whether two runs saw the same data.
    """

    name: str
    train: Tensor
    val: Tensor
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    sha256: str = ""

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name,
            "train_bytes": int(self.train.numel()),
            "val_bytes": int(self.val.numel()),
            "train_files": len(self.train_files),
            "val_files": len(self.val_files),
            "sha256": self.sha256,
        }


def _fingerprint(train: bytes, val: bytes) -> str:
    h = hashlib.sha256()
    h.update(len(train).to_bytes(8, "big"))
    h.update(train)
    h.update(val)
    return h.hexdigest()


def _to_tensor(data: bytes) -> Tensor:
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )


def _read_files(
    root: Path, rel_paths: list[str], max_bytes: int, val_fraction: float
) -> tuple[bytes, bytes, list[str], list[str]]:
    """Read files in hash order until each split reaches its share of ``max_bytes``."""
    caps = {
        "val": int(max_bytes * val_fraction),
        "train": max_bytes - int(max_bytes * val_fraction),
    }
    chunks: dict[str, list[bytes]] = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    files: dict[str, list[str]] = {"train": [], "val": []}
    for rel in sorted(rel_paths, key=lambda r: (_path_hash(r), r)):
        split = split_of(rel, val_fraction)
        if sizes[split] >= caps[split]:
            if all(sizes[s] >= caps[s] for s in sizes):
                break
            continue
        try:
            data = (root / rel).read_bytes()
        except OSError:
            continue
        if not data:
            continue
        data = data[: caps[split] - sizes[split]] + FILE_SEPARATOR
        chunks[split].append(data)
        sizes[split] += len(data)
        files[split].append(rel)
    return b"".join(chunks["train"]), b"".join(chunks["val"]), files["train"], files["val"]


def load_corpus(
    path: str | os.PathLike[str] | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> Corpus:
    """Load the default corpus (``path=None``) or a text file or folder.

    Args:
        path: ``None`` for the standard library of this interpreter, a file, or a folder
            (all regular files under it, recursively, hidden ones skipped).
        max_bytes: cap on the bytes read (train and validation together).
        val_fraction: share of files (folders) or of bytes (single file) for validation.

    Returns:
        A :class:`Corpus`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a split would be empty (corpus too small, or a folder whose files all
            hash to one split).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if path is None:
        root, rel_paths = stdlib_files()
        name = f"python{sys.version_info.major}.{sys.version_info.minor} stdlib ({root})"
        train, val, train_files, val_files = _read_files(root, rel_paths, max_bytes, val_fraction)
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"--data {path}: no such file or folder")
        if p.is_file():
            data = p.read_bytes()[:max_bytes]
            n_val = max(1, int(len(data) * val_fraction))
            # the last val_fraction of the file is the validation split
            train, val = data[:-n_val], data[-n_val:]
            train_files, val_files, name = [p.name], [p.name], f"file {p}"
        else:
            rel_paths = sorted(
                f.relative_to(p).as_posix()
                for f in p.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            train, val, train_files, val_files = _read_files(p, rel_paths, max_bytes, val_fraction)
            if not val and len(train_files) > 1:
                # tiny folders: move the last file (in hash order) to validation
                last = train_files.pop()
                data = (p / last).read_bytes()[:max_bytes] + FILE_SEPARATOR
                train, val, val_files = train[: -len(data)], data, [last]
            name = f"folder {p}"
    if len(train) < 2 or len(val) < 2:
        raise ValueError(
            f"corpus too small: {len(train)} train and {len(val)} validation bytes; give more text"
        )
    return Corpus(
        name=name,
        train=_to_tensor(train),
        val=_to_tensor(val),
        train_files=train_files,
        val_files=val_files,
        sha256=_fingerprint(train, val),
    )


def load_pydoc_topics(
    *, max_bytes: int = DEFAULT_MAX_BYTES, chunk: int = 4096, val_every: int = 10
) -> Corpus:
    """English prose from the standard library: the help topics of ``pydoc_data.topics``.

    The documentation text that ``help("assignment")`` prints (~0.46 MB in Python 3.11):
    a different distribution from the default corpus (Python source), present wherever
    Python is. The topics are joined in sorted order and cut into ``chunk``-byte pieces;
    every ``val_every``-th piece is validation (so both splits cover every part of the
    documentation), the rest training.

    Args:
        max_bytes: cap on the bytes used (train and validation together).
        chunk: piece size of the train/validation interleave.
        val_every: one piece in this many goes to validation.
    """
    from pydoc_data.topics import topics

    text = FILE_SEPARATOR.join(
        topics[k].encode("utf-8", errors="replace") for k in sorted(topics)
    )[:max_bytes]
    pieces = [text[i : i + chunk] for i in range(0, len(text), chunk)]
    val = b"".join(p for i, p in enumerate(pieces) if i % val_every == val_every - 1)
    train = b"".join(p for i, p in enumerate(pieces) if i % val_every != val_every - 1)
    if len(train) < 2 or len(val) < 2:
        raise ValueError(f"max_bytes={max_bytes} leaves an empty split of the pydoc topics")
    return Corpus(
        name=f"pydoc_data.topics of python{sys.version_info.major}.{sys.version_info.minor} "
        f"({len(topics)} help topics, English)",
        train=_to_tensor(train),
        val=_to_tensor(val),
        sha256=_fingerprint(train, val),
    )


class BatchSampler:
    """Windows of ``seq_len`` tokens from a byte stream.

    Training batches: ``next(sampler)`` draws ``batch_size`` random start offsets from a
    generator seeded with ``seed``; two samplers with the same stream, sizes and seed yield the
    same batches. Validation batches: :meth:`fixed_batches` returns evenly spaced windows.
    Windows shorter than ``seq_len`` (tiny corpora) are made by repeating the stream.
    """

    def __init__(self, stream: Tensor, batch_size: int, seq_len: int, seed: int = 0) -> None:
        if stream.numel() < 2:
            raise ValueError("stream needs at least 2 tokens")
        if stream.numel() <= seq_len:
            reps = seq_len // stream.numel() + 2
            stream = stream.repeat(reps)
        self.stream = stream.long()
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def _windows(self, starts: Tensor) -> Tensor:
        idx = starts[:, None] + torch.arange(self.seq_len)[None, :]
        return self.stream[idx]

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        high = self.stream.numel() - self.seq_len + 1
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator)
        return self._windows(starts)

    def fixed_batches(self, n_batches: int) -> list[Tensor]:
        """``n_batches`` batches of evenly spaced windows covering the stream."""
        total = n_batches * self.batch_size
        high = self.stream.numel() - self.seq_len
        starts = torch.linspace(0, high, total).long()
        return [self._windows(s) for s in starts.split(self.batch_size)]


def mask_tokens(
    tokens: Tensor,
    generator: torch.Generator,
    *,
    mask_prob: float = 0.15,
    vocab_size: int = BYTE_VOCAB,
) -> tuple[Tensor, Tensor]:
    """BERT masking: choose ``mask_prob`` of the positions; of those 80% become ``MASK_ID``,
    10% a random byte and 10% stay. Returns ``(inputs, labels)`` with labels ``-100`` at
    positions not chosen. At least one position per row is chosen.
    """
    shape = tokens.shape
    chosen = torch.rand(shape, generator=generator) < mask_prob
    # guarantee one target per row so the loss is always defined
    forced = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    chosen.scatter_(-1, forced.unsqueeze(-1), True)
    labels = torch.where(chosen, tokens, torch.full_like(tokens, -100))
    roll = torch.rand(shape, generator=generator)
    inputs = tokens.clone()
    inputs[chosen & (roll < 0.8)] = MASK_ID
    random_pos = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[random_pos] = torch.randint(
        0, vocab_size, (int(random_pos.sum()),), generator=generator
    ).to(tokens.dtype)
    return inputs, labels
