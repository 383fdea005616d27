"""Readers: users' files -> raw rows with their file and line (or row) number, streamed in batches.

Formats: JSONL, JSON arrays, Parquet, CSV, and Hugging Face `datasets` folders written by
`save_to_disk`; paths may be files, globs or folders. A *shard* is the unit one Ray task reads: a
byte range of a JSONL file (with the number of the line it starts on, so line numbers stay exact),
or one whole file of any other format. Presets turn a raw row into a candidate record
{id, question, rationale, answer, cot_answer}; `cot_answer` is the answer the rationale itself ends
with, when the layout says it (GSM8K's `####`, Fine-tune-CoT's `-->`), for the agreement filter.

A row that cannot be read becomes a `Bad` with a reason kind; nothing is dropped silently.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .config import UserError

SUFFIX_FORMAT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ROWS_PER_BATCH = 4096
_HF_MARKERS = ("dataset_info.json", "state.json")
_CALCULATOR = re.compile(r"<<[^<>]*>>")   # GSM8K's calculator annotations: '48/2 = <<48/2=24>>24'


@dataclass
class Bad:
    """A row that could not become a candidate record."""
    kind: str
    reason: str
    raw: str = ""


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _HF_MARKERS)


def expand_paths(spec: str | list[str] | None, fmt: str) -> list[tuple[str, str]]:
    """Files, globs and folders -> sorted (path, format) pairs. A folder is every file with a known
    suffix under it, or one `datasets` save_to_disk folder."""
    specs = [spec] if isinstance(spec, str) else list(spec or [])
    out: list[tuple[str, str]] = []
    for item in specs:
        item = os.path.expanduser(item)
        if glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"{item!r} matches no file")
        else:
            matches = [item]
        for m in matches:
            p = Path(m)
            if fmt in ("auto", "hf") and _is_hf_folder(p):
                out.append((str(p), "hf"))
            elif p.is_dir():
                files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                               and (fmt != "auto" or f.suffix.lower() in SUFFIX_FORMAT))
                if not files:
                    raise UserError(f"folder {m} holds no readable file (.jsonl .json .parquet .csv)")
                out += [(str(f), fmt if fmt != "auto" else SUFFIX_FORMAT[f.suffix.lower()]) for f in files]
            elif p.is_file():
                f = fmt if fmt != "auto" else SUFFIX_FORMAT.get(p.suffix.lower())
                if f is None:
                    raise UserError(f"file {m}: unknown suffix {p.suffix!r}; set data.format")
                out.append((str(p), f))
            else:
                raise UserError(f"file not found: {m}")
    return out


def _newline_after(f, pos: int, size: int) -> int:
    """Offset just past the first newline at or after pos (size if none)."""
    f.seek(pos)
    while pos < size:
        block = f.read(1 << 16)
        i = block.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(block)
    return size


def plan_shards(files: list[tuple[str, str]], split: str, shard_bytes: int) -> list[dict]:
    """One shard per file, except JSONL files larger than shard_bytes: byte ranges cut after a
    newline, each with the line number it starts on (one pass counting newlines)."""
    shards = []
    for path, fmt in files:
        if fmt == "hf":
            for arrow in _hf_arrow_files(Path(path)):
                shards.append({"path": str(arrow), "format": "hf", "split": split})
            continue
        size = os.path.getsize(path)
        if fmt != "jsonl" or size <= shard_bytes:
            shards.append({"path": path, "format": fmt, "split": split, "start": 0, "end": size, "line": 1})
            continue
        with open(path, "rb") as f:
            cuts = [0]
            while cuts[-1] < size:
                cuts.append(_newline_after(f, cuts[-1] + shard_bytes, size))
            f.seek(0)
            line = 1
            for a, b in zip(cuts, cuts[1:]):
                shards.append({"path": path, "format": fmt, "split": split, "start": a, "end": b, "line": line})
                left = b - a
                while left:
                    block = f.read(min(left, 1 << 24))
                    line += block.count(b"\n")
                    left -= len(block)
    return shards


def _hf_arrow_files(folder: Path) -> list[Path]:
    state = folder / "state.json"
    if state.is_file():
        names = [d["filename"] for d in json.loads(state.read_text()).get("_data_files", [])]
        return [folder / n for n in names]
    if (folder / "dataset_dict.json").is_file():
        raise UserError(f"{folder} is a DatasetDict: name its split folders (e.g. {folder}/train) as paths")
    return sorted(folder.glob("*.arrow"))


def _raw_text(data: bytes) -> str:
    return data[:2000].decode("utf-8", errors="replace")


def _batched(rows: Iterator[tuple]) -> Iterator[list]:
    """Group a row-at-a-time reader's (number, row) pairs into lists of ROWS_PER_BATCH."""
    while batch := list(itertools.islice(rows, ROWS_PER_BATCH)):
        yield batch


def _jsonl_rows(shard: dict) -> Iterator[tuple]:
    line = shard["line"]
    with open(shard["path"], "rb") as f:
        f.seek(shard["start"])
        data = f.read(shard["end"] - shard["start"])   # at most shard_mb bytes per task
    for raw in data.split(b"\n"):
        n, line = line, line + 1
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield n, Bad("not_utf8", f"line is not valid UTF-8 (byte {e.start})", _raw_text(raw))
        else:
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                row = Bad("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})", text[:2000])
            if not isinstance(row, (dict, Bad)):
                row = Bad("not_an_object", f"expected a JSON object, got {type(row).__name__}", text[:2000])
            yield n, row


def _read_jsonl(shard: dict) -> Iterator[list]:
    return _batched(_jsonl_rows(shard))


def _read_json_array(shard: dict) -> Iterator[list]:
    """A JSON array is parsed whole by one task (the format cannot be streamed); prefer JSONL for
    large sets. Invalid UTF-8 inside a string rejects that row, not the file."""
    data = Path(shard["path"]).read_bytes()
    try:
        rows = json.loads(data.decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as e:
        yield [(0, Bad("invalid_json", f"file is not valid JSON: {e.msg} (line {e.lineno} column {e.colno})",
                       _raw_text(data)))]
        return
    if not isinstance(rows, list):
        yield [(0, Bad("not_an_array", f"expected a JSON array of objects, got {type(rows).__name__}", _raw_text(data)))]
        return
    for start in range(0, len(rows), ROWS_PER_BATCH):
        yield [(i + 1, row if isinstance(row, dict) else
                Bad("not_an_object", f"expected a JSON object, got {type(row).__name__}", str(row)[:2000]))
               for i, row in enumerate(rows[start:start + ROWS_PER_BATCH], start=start)]


def _read_parquet(shard: dict) -> Iterator[list]:
    import pyarrow.parquet as pq

    n = 0
    for rb in pq.ParquetFile(shard["path"]).iter_batches(batch_size=ROWS_PER_BATCH):
        rows = rb.to_pylist()
        yield [(n + i + 1, row) for i, row in enumerate(rows)]
        n += len(rows)


def _read_hf(shard: dict) -> Iterator[list]:
    import pyarrow as pa

    n = 0
    with pa.memory_map(shard["path"]) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        for rb in batches:
            rows = rb.to_pylist()
            yield [(n + i + 1, row) for i, row in enumerate(rows)]
            n += len(rows)


def _csv_rows(shard: dict) -> Iterator[tuple]:
    with open(shard["path"], "rb") as f:
        text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.DictReader(text)
        end = 1   # the header line
        for row in reader:
            n, end = end + 1, reader.line_num   # a quoted field may span lines: the row starts after the last
            if None in row or None in row.values():
                row = Bad("bad_csv_row", f"row has {len(row) - (None in row) + len(row.get(None) or [])} fields, "
                          f"the header has {len(reader.fieldnames)}", json.dumps(row, default=str)[:2000])
            yield n, row


def _read_csv(shard: dict) -> Iterator[list]:
    return _batched(_csv_rows(shard))


READERS = {"jsonl": _read_jsonl, "json": _read_json_array, "parquet": _read_parquet, "csv": _read_csv, "hf": _read_hf}


def read_shard(shard: dict) -> Iterator[list]:
    """Batches of (line or row number, raw row dict | Bad)."""
    try:
        yield from READERS[shard["format"]](shard)
    except (OSError, ValueError) as e:   # an unreadable file (corrupt Parquet, bad Arrow) is one reject
        yield [(0, Bad("unreadable_file", f"{type(e).__name__}: {e}"[:500]))]


# ---- presets: raw row -> candidate record ----------------------------------------------------

def get_field(row: dict, dotted: str):
    value = row
    for key in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def derived_id(question, rationale) -> str:
    """Rows without an id get one from their content: stable when files are reordered or re-sharded."""
    blob = f"{question}\x00{rationale}".encode("utf-8", errors="surrogateescape")
    return "h-" + hashlib.blake2b(blob, digest_size=8).hexdigest()


def _fields(row: dict, fields: dict) -> dict:
    out = {k: get_field(row, fields.get(k, k)) for k in ("id", "question", "rationale", "answer")}
    out["cot_answer"] = None
    return out


def _gsm8k(row: dict, fields: dict) -> dict | Bad:
    text = get_field(row, fields.get("answer", "answer"))
    if not isinstance(text, str):
        return Bad("missing_field", "gsm8k: field 'answer' must hold 'rationale ... #### answer'")
    head, sep, tail = text.rpartition("####")
    if not sep:
        return Bad("unreadable_answer", "gsm8k: answer text has no '#### <answer>' line", text[:2000])
    return {"id": get_field(row, fields.get("id", "id")), "question": get_field(row, fields.get("question", "question")),
            "rationale": _CALCULATOR.sub("", head).rstrip(), "answer": tail.strip(), "cot_answer": tail.strip()}


def _fine_tune_cot(row: dict, fields: dict) -> dict | Bad:
    prompt, completion = row.get("prompt"), row.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        return Bad("missing_field", "fine_tune_cot: rows need text fields 'prompt' and 'completion'")
    question = prompt.rstrip()
    question = question[:-3].rstrip() if question.endswith("###") else question
    body = completion.strip()
    body = body[:-3].rstrip() if body.endswith("END") else body
    rationale, sep, cot_answer = body.rpartition("-->")
    if not sep:
        return Bad("unreadable_answer", "fine_tune_cot: completion has no '--> <answer>'", completion[:2000])
    gold = get_field(row, fields.get("answer", "answer"))   # a separate gold answer, when the file has one
    return {"id": get_field(row, fields.get("id", "id")), "question": question, "rationale": rationale.strip(),
            "answer": gold if gold is not None else cot_answer.strip(), "cot_answer": cot_answer.strip()}


PRESETS = {"fields": _fields, "gsm8k": _gsm8k, "fine_tune_cot": _fine_tune_cot,
           # rows built in code (gsm_symbolic) are candidates already
           "canonical": lambda row, fields: dict(row)}
