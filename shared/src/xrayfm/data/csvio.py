"""Strict CSV reading: malformed rows and unknown label values are errors that name their lines."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from xrayfm.errors import DataError, list_offenders


def read_csv_strict(
    path: Path, *, header: bool = True, names: Sequence[str] | None = None, **kwargs
) -> pd.DataFrame:
    """Read a CSV (as strings unless ``dtype`` says otherwise); bad rows raise DataError listing the lines.

    Uses pandas' fast C parser; only when it fails do we rescan with the csv module to list every bad line
    (pandas stops at the first one).
    """
    if not path.exists():
        raise DataError(f"label file not found: {path}")
    try:
        kwargs.setdefault("dtype", str)
        return pd.read_csv(
            path, keep_default_na=False, header=0 if header else None, names=names, engine="c", **kwargs
        )
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path} is empty") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        bad = _bad_lines(path, header=header, expected=len(names) if names else None)
        # The kind of problem and where, never the file's bytes (an error may travel to an API caller).
        kind = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else "not parseable as CSV"
        detail = f"lines with the wrong number of fields: {list_offenders(bad)}" if bad else kind
        raise DataError(f"malformed CSV {path}: {detail}") from None


def _bad_lines(path: Path, *, header: bool, expected: int | None) -> list[int]:
    opener = _open_text(path)
    with opener as fh:
        rows = csv.reader(fh)
        bad = []
        for lineno, row in enumerate(rows, start=1):
            if expected is None:
                expected = len(row)
                if header:
                    continue
            if row and len(row) != expected:
                bad.append(lineno)
    return bad


def _open_text(path: Path):
    if path.suffix == ".gz":
        import gzip

        return gzip.open(path, "rt", newline="", errors="replace")
    return open(path, newline="", errors="replace")  # noqa: SIM115 (returned for a with-block)


def require_columns(df: pd.DataFrame, columns: Sequence[str], path: Path) -> None:
    """DataError naming the missing columns when any is absent (not the file's own header: its contents)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks the columns {missing} ({len(df.columns)} columns found in its header)")


def read_labelled_csv(
    path: Path, label_columns: Sequence[str], allowed=(1.0, 0.0, -1.0)
) -> tuple[pd.DataFrame, np.ndarray]:
    """Read a CSV whose ``label_columns`` hold 1.0 / 0.0 / -1.0 / blank; returns (text columns, labels).

    Labels come back as float32 [N, L] with NaN for blank. The fast path lets pandas' C parser convert
    the label columns; if any cell is not a number we re-read as text to name every offending cell.
    Values outside ``allowed`` (``2``, ``yes``, ``1.5``) raise DataError naming their lines and columns.
    """
    head = read_csv_strict(path, nrows=0)
    require_columns(head, label_columns, path)
    text_columns = [c for c in head.columns if c not in label_columns]
    try:
        df = read_csv_strict(
            path,
            dtype={**{c: "float32" for c in label_columns}, **{c: str for c in text_columns}},
            na_values={c: [""] for c in label_columns},
        )
    except ValueError:
        _raise_unknown_values(path, label_columns, allowed)
        raise
    raw = df[list(label_columns)].to_numpy(dtype=np.float32)
    if (~np.isnan(raw) & ~np.isin(raw, allowed)).any():
        _raise_unknown_values(path, label_columns, allowed)
    return df[text_columns], raw


def _raise_unknown_values(path: Path, columns: Sequence[str], allowed) -> None:
    """Re-read the file as text and raise DataError naming each offending cell by line and column, and the
    kind of problem, not its value (slow path, errors only)."""
    df = read_csv_strict(path)
    problems = []
    for col in columns:
        text = df[col].str.strip()
        values = pd.to_numeric(text, errors="coerce")
        bad = ((values.isna() & (text != "")) | (values.notna() & ~values.isin(allowed))).to_numpy()
        problems += [
            f"line {i + 2} {col} ({'not a number' if pd.isna(values.iat[i]) else 'a number not allowed'})"
            for i in np.flatnonzero(bad)[:10]
        ]
    if problems:
        raise DataError(
            f"unknown label values in {path} (allowed: {', '.join(map(str, allowed))} or blank): "
            f"{list_offenders(problems)}"
        )
