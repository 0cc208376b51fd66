"""Reading named columns of a Parquet file with one-line errors.

pyarrow's own messages for a missing column or a mismatched schema print the whole schema (20+
lines); these helpers check the file, the column names and their kinds first and raise one
`UserError` naming the file and the column instead. Used for prompt files, SFT data and
preference shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import UserError

ColumnKind = Literal["string", "binary", "number", "list", "any"]
MAX_NAMES_SHOWN = 12  # a wide table's column list is cut, so the message stays one readable line


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's text (pyarrow appends schemas on the next lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def column_list(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > MAX_NAMES_SHOWN else "")


def kind_matches(kind: ColumnKind, dtype) -> bool:
    """Whether an Arrow type is of the wanted kind (string/binary accept their large variants)."""
    checks = {
        "string": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
        "binary": lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
        "number": lambda t: pa.types.is_integer(t) or pa.types.is_floating(t),
        "list": lambda t: pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t),
        "any": lambda t: True,
    }
    return checks[kind](dtype)


def read_columns(path: str | Path, columns: dict[str, ColumnKind], what: str = "Parquet file"):
    """The `columns` (name -> expected kind) of Parquet file `path` as a pyarrow Table.

    One UserError naming `path` for: not a Parquet file / corrupt, a missing column, a column of the
    wrong kind. `what` says what the file was meant to be ("prompt file", "SFT data", ...).
    """
    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow: ArrowInvalid for non-Parquet bytes, OSError for unreadable files
        raise UserError(f"{path}: not a readable {what} ({first_line(e)})") from None
    for name, kind in columns.items():
        if name not in schema.names:
            raise UserError(f"{path}: no column '{name}' (columns: {column_list(schema.names)})")
        dtype = schema.field(name).type
        if not kind_matches(kind, dtype):
            raise UserError(f"{path}: column '{name}' is {dtype}, expected {kind}")
    try:
        return pq.read_table(path, columns=list(columns))
    except Exception as e:  # truncated or corrupt pages behind a valid footer
        raise UserError(f"{path}: corrupt {what} ({first_line(e)})") from None


def concat_same_schema(tables: list, paths: list[Path]):
    """pa.concat_tables, but a shard whose column types differ from the first shard's is named first."""
    first = tables[0].schema
    for table, path in zip(tables[1:], paths[1:]):
        for f in table.schema:
            want = first.field(f.name).type
            if f.type != want:
                raise UserError(f"{path}: column '{f.name}' is {f.type}, but {paths[0].name} has {want}")
    return pa.concat_tables(tables)
