"""Training datasets: where a job may read them from, how they are stored, and what they hold.

A dataset has a *container* (``json``, ``jsonl``, ``csv``, ``parquet``, ``hf_disk``: a
directory written by ``datasets``' ``save_to_disk``) and a *record shape* (``alpaca``,
``sharegpt``, ``openai`` chat or prompt/completion, plain ``text``). ``auto`` takes the container
from the file name (or the uploaded file's original name, ``filename_hint``) or its content, and
the shape from the records' fields; a container format forces the container, a shape format the
shape. Every record becomes a ``Conversation``; ``prepare`` tokenises them for training.

Every problem raises ``DatasetError``, located at the file, line or record, and field.
This module does file I/O only; the rules live in ``dataset_records`` and ``dataset_tokens``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath

from schemas.training import DATASET_FORMATS
from services.trainer.dataset_records import (
    SHAPES,
    Conversation,
    DatasetError,
    Turn,
    json_type,
    to_conversations,
)
from services.trainer.dataset_tokens import IGNORE_INDEX, Example, TokenizedDataset, tokenize

__all__ = [
    "CONTAINERS", "IGNORE_INDEX", "SHAPES", "Conversation", "DatasetError", "DatasetInfo", "Example",
    "LoadedDataset", "TokenizedDataset", "Turn", "detect_container", "load_dataset", "prepare",
    "resolve_path", "tokenize",
]

CONTAINERS = ("json", "jsonl", "csv", "parquet", "hf_disk")
EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
              ".parquet": "parquet", ".pq": "parquet"}
# Files save_to_disk writes: state.json and dataset_info.json (Dataset), dataset_dict.json (DatasetDict).
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
SNIFF_BYTES = 65536


@dataclass(frozen=True)
class LoadedDataset:
    """A validated dataset: its records as conversations and the format they were read as."""

    file: str
    container: str
    shape: str
    conversations: list[Conversation]

    def info(self, tokenized: TokenizedDataset | None = None) -> DatasetInfo:
        """The summary a job reports, with the token counts once tokenised."""
        counts = {}
        if tokenized is not None:
            counts = {"examples": len(tokenized), "dropped": tokenized.dropped, "truncated": tokenized.truncated,
                      "total_tokens": tokenized.total_tokens, "trained_tokens": tokenized.trained_tokens}
        return DatasetInfo(file=self.file, container=self.container, shape=self.shape,
                           records=len(self.conversations), **counts)


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset turned out to be: format detected, records read, examples kept and dropped
    after tokenisation, and tokens per epoch (all, and trained on)."""

    file: str
    container: str
    shape: str
    records: int
    examples: int = 0
    dropped: int = 0
    truncated: int = 0
    total_tokens: int = 0
    trained_tokens: int = 0

    @property
    def format(self) -> str:
        """``container/shape``, e.g. ``jsonl/openai``."""
        return f"{self.container}/{self.shape}"

    def as_dict(self) -> dict:
        """Plain values, for an event's ``data``."""
        return {**asdict(self), "format": self.format}


def resolve_path(path: str, allowed_dirs: Sequence[Path]) -> Path:
    """The real path of ``path`` (symlinks and ``..`` resolved) if it lies inside one of
    ``allowed_dirs`` and exists. A relative path is taken relative to each allowed directory."""
    roots = [Path(d).expanduser().resolve() for d in allowed_dirs]
    if not roots:
        raise DatasetError("path_not_allowed", "this trainer reads no dataset paths; upload the file and "
                           "pass its file id instead", file=path)
    given = Path(path)  # no ~ expansion: the path comes from a job, not from this host's operator
    try:
        candidates = [given.resolve()] if given.is_absolute() else [(root / given).resolve() for root in roots]
    except (ValueError, OSError, RuntimeError) as exc:  # NUL byte, symlink loop
        raise DatasetError("path_not_allowed", f"the path cannot be resolved ({exc})", file=path) from None
    inside = [c for c in candidates if any(c == root or c.is_relative_to(root) for root in roots)]
    if not inside:
        allowed = ", ".join(str(r) for r in roots)
        raise DatasetError("path_not_allowed", f"the path is outside the directories this trainer may read "
                           f"({allowed}); copy the dataset there or upload it", file=path)
    for candidate in inside:
        if candidate.exists():
            return candidate
    raise DatasetError("file_not_found", "the file does not exist", file=path)


def load_dataset(path: str | Path, fmt: str = "auto", filename_hint: str | None = None) -> LoadedDataset:
    """Read and validate the dataset at ``path`` as ``fmt`` (one of ``DATASET_FORMATS``).

    ``filename_hint`` is the name the file was uploaded under (object-store files have no
    extension); it drives detection and names the file in errors. Raises on the first error.
    """
    path = Path(path)
    name = PurePath(filename_hint).name if filename_hint else path.name
    if fmt not in DATASET_FORMATS:
        raise DatasetError("invalid_file_format", f'unknown dataset format "{fmt}" '
                           f"(expected one of: {', '.join(DATASET_FORMATS)})", file=name, field="dataset_format")
    if not path.exists():
        raise DatasetError("file_not_found", "the file does not exist", file=name)
    container = fmt if fmt in CONTAINERS else detect_container(path, name)
    records, unit = READERS[container](path, name)
    shape, conversations = to_conversations(records, fmt if fmt in SHAPES else None, file=name, unit=unit)
    return LoadedDataset(file=name, container=container, shape=shape, conversations=conversations)


def prepare(path: str | Path, tokenizer, max_seq_length: int, fmt: str = "auto",
            filename_hint: str | None = None) -> tuple[TokenizedDataset, DatasetInfo]:
    """Load, validate and tokenise a dataset; refuses one left with nothing to train on."""
    loaded = load_dataset(path, fmt, filename_hint)
    tokenized = tokenize(loaded.conversations, tokenizer, max_seq_length)
    if not tokenized.examples:
        raise DatasetError("no_trainable_examples", f"every example lost its trained tokens to truncation at "
                           f"max_seq_length={max_seq_length}; raise max_seq_length", file=loaded.file)
    return tokenized, loaded.info(tokenized)


def detect_container(path: Path, name: str) -> str:
    """The container of ``path``: a saved dataset directory, else by ``name``'s extension, else by content."""
    if path.is_dir():
        if any((path / marker).exists() for marker in HF_MARKERS):
            return "hf_disk"
        raise DatasetError("invalid_file_format", "the directory is not a dataset saved with save_to_disk "
                           f"(none of {', '.join(HF_MARKERS)} in it)", file=name)
    container = EXTENSIONS.get(PurePath(name).suffix.lower())
    if container == "json":
        return _json_or_lines(path)
    return container or _sniff(path, name)


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(SNIFF_BYTES)


def _json_or_lines(path: Path) -> str:
    """``jsonl`` when the first line is a whole JSON object and more follows, else ``json``."""
    text = _head(path).decode("utf-8-sig", errors="replace").lstrip()
    first, _, rest = text.partition("\n")
    try:
        is_object = isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return "json"
    return "jsonl" if is_object and rest.strip() else "json"


def _sniff(path: Path, name: str) -> str:
    """The container of an extension-less file, from its first bytes."""
    head = _head(path)
    if head.startswith(b"PAR1"):  # Parquet's magic number
        return "parquet"
    text = head.decode("utf-8-sig", errors="replace").lstrip()
    if not text:
        raise DatasetError("empty_file", "the file is empty", file=name)
    if text[0] == "[":
        return "json"
    if text[0] == "{":
        return _json_or_lines(path)
    if "," in text.partition("\n")[0]:
        return "csv"
    raise DatasetError("invalid_file_format", "cannot tell the file's format; name it .jsonl, .json, .csv or "
                       ".parquet, or set dataset_format", file=name)


def _read_text(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError("invalid_file_format", f"the file is not UTF-8 text (byte {exc.start})", file=name) from None


def _json_records(path: Path, name: str) -> tuple[Iterable[tuple[int, object]], str]:
    text = _read_text(path, name)
    if not text.strip():
        raise DatasetError("empty_file", "the file is empty", file=name)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError("invalid_json", f"invalid JSON ({exc.msg} at column {exc.colno})", file=name,
                           line=exc.lineno) from None
    if isinstance(data, dict):
        data = data["data"] if isinstance(data.get("data"), list) else [data]
    if not isinstance(data, list):
        raise DatasetError("invalid_file_format", 'expected a JSON array of records or an object with a "data" '
                           f"array, got {json_type(data)}", file=name)
    return enumerate(data, 1), "record"


def _jsonl_records(path: Path, name: str) -> tuple[Iterable[tuple[int, object]], str]:
    def lines() -> Iterator[tuple[int, object]]:
        with path.open(encoding="utf-8-sig") as f:
            number = 0
            try:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError("invalid_json", f"invalid JSON ({exc.msg} at column {exc.colno})",
                                   file=name, line=number) from None
            except UnicodeDecodeError:
                raise DatasetError("invalid_file_format", "the line is not UTF-8 text", file=name,
                                   line=number + 1) from None

    return lines(), "line"


def _csv_records(path: Path, name: str) -> tuple[Iterable[tuple[int, object]], str]:
    # A chat's "messages" JSON in one cell easily passes csv's 128 KiB default field limit.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = [{k: v for k, v in row.items() if k is not None} for row in csv.DictReader(f)]
    except csv.Error as exc:
        raise DatasetError("invalid_file_format", f"the file is not readable CSV ({exc})", file=name) from None
    except UnicodeDecodeError:
        raise DatasetError("invalid_file_format", "the file is not UTF-8 text", file=name) from None
    return enumerate(rows, 1), "record"


def _parquet_records(path: Path, name: str) -> tuple[Iterable[tuple[int, object]], str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError):  # the message names the server-side path: not for the user
        raise DatasetError("invalid_file_format", "the file is not readable Parquet", file=name) from None
    return enumerate(rows, 1), "record"


def _hf_disk_records(path: Path, name: str) -> tuple[Iterable[tuple[int, object]], str]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except (FileNotFoundError, ValueError):  # the message names the server-side path: not for the user
        raise DatasetError("invalid_file_format", "the path is not a dataset saved with save_to_disk",
                           file=name) from None
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset and len(dataset) != 1:
            raise DatasetError("invalid_file_format", 'the saved dataset has no "train" split (splits: '
                               f"{', '.join(dataset)})", file=name)
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    return enumerate(dataset.to_list(), 1), "record"


READERS = {"json": _json_records, "jsonl": _jsonl_records, "csv": _csv_records,
           "parquet": _parquet_records, "hf_disk": _hf_disk_records}
