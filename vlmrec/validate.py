"""Column checks shared by `vlmrec ingest` and its format readers: required columns, integer ids,
timestamps, optional strings. Each raises IngestError naming the file, the column and how many rows.

    uid, null = int_ids(df["user_id"], "events.csv", column_label(df, "user_id"))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

TZ_SUFFIX = r"\d:\d{2}(?::\d{2}(?:[.,]\d+)?)?\s*(?:[zZ]|[+-]\d{2}(?::?\d{2})?)$"  # a time with its UTC offset


class IngestError(ValueError):
    """A bad input: the message names the file, the column and how many rows."""


def require_columns(df: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise IngestError(
            f"{source}: missing {len(missing)} required column(s): {', '.join(missing)} "
            f"(columns found: {', '.join(map(str, df.columns)) or 'none'})"
        )


def column_label(df: pd.DataFrame, column: str) -> str:
    original = df.attrs.get("columns", {}).get(column)
    return f"'{column}'" + (f" (from '{original}')" if original else "")


def int_keys(s: pd.Series) -> pd.Series:
    """Integer-valued entries as nullable Int64, anything else null (for lookups, not validation)."""
    num = pd.to_numeric(s, errors="coerce")
    if pd.api.types.is_bool_dtype(num):
        return pd.Series(pd.NA, index=s.index, dtype="Int64")
    return num.where(num.notna() & (num % 1 == 0)).astype("Int64")


def int_ids(s: pd.Series, source: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(int64 ids with 0 where null, null mask); IngestError naming how many non-null rows are not integers."""
    null = s.isna().to_numpy()
    vals = s[~null]
    out = np.zeros(len(s), dtype=np.int64)
    kind = vals.dtype
    if pd.api.types.is_bool_dtype(kind) or kind.kind in "mM":  # booleans and times are not ids
        bad = np.ones(len(vals), dtype=bool)
    elif pd.api.types.is_integer_dtype(kind):
        out[~null] = vals.to_numpy(dtype=np.int64)
        return out, null
    else:
        if not pd.api.types.is_numeric_dtype(kind):  # text: "12" is an id, "12a" is not
            vals_text = pd.Series(np.asarray(vals.astype(str), dtype=object), index=vals.index).str.strip()
            num = pd.to_numeric(vals_text, errors="coerce")
        else:
            num = vals
        if pd.api.types.is_integer_dtype(num.dtype) and not num.isna().any():
            out[~null] = num.to_numpy(dtype=np.int64)
            return out, null
        f = num.to_numpy(dtype=float, na_value=np.nan)
        bad = ~np.isfinite(f) | (f != np.floor(f)) | (np.abs(f) >= 2.0**63)
        if not bad.any():
            out[~null] = f.astype(np.int64)
            return out, null
    example = vals.iloc[int(np.argmax(bad))]
    raise IngestError(
        f"{source}: column {label}: {int(bad.sum()):,} of {len(s):,} rows are not integer ids (e.g. {example!r})"
    )


def parse_timestamps(s: pd.Series, source: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(UTC microseconds since epoch as int64, null mask); IngestError naming how many rows do not parse."""
    null = s.isna().to_numpy()
    vals = s[~null]
    if pd.api.types.is_datetime64_any_dtype(vals):
        ts = pd.to_datetime(vals, utc=True)
    elif pd.api.types.is_bool_dtype(vals):
        ts = pd.Series(pd.NaT, index=vals.index)
    elif pd.api.types.is_numeric_dtype(vals):
        ts = pd.to_datetime(vals, unit="s", utc=True, errors="coerce")
    else:
        text = vals.astype(str).str.strip()
        num = pd.to_numeric(text, errors="coerce")  # row by row: numbers are Unix seconds, the rest ISO 8601
        is_num = num.notna()
        ts = pd.Series(pd.NaT, index=vals.index, dtype="datetime64[ns, UTC]")
        ts[is_num] = pd.to_datetime(num[is_num], unit="s", utc=True, errors="coerce")
        # naive and offset strings apart: pandas would give a naive string the offset of an earlier row
        aware = text.str.contains(TZ_SUFFIX, regex=True) & ~is_num
        for part in (aware, ~aware & ~is_num):
            ts[part] = pd.to_datetime(text[part], utc=True, format="ISO8601", errors="coerce")
    bad = ts.isna().to_numpy()
    if bad.any():
        example = vals.iloc[int(np.argmax(bad))]
        raise IngestError(
            f"{source}: column {label}: {int(bad.sum()):,} of {len(s):,} rows are not timestamps "
            f"(ISO 8601 or Unix seconds; e.g. {example!r})"
        )
    out = np.zeros(len(s), dtype=np.int64)
    out[~null] = ts.to_numpy(dtype="datetime64[ns]").astype("datetime64[us]").astype(np.int64)
    return out, null


def string_column(df: pd.DataFrame, column: str) -> tuple[pd.Series, int]:
    """The column as object strings with None for null (an absent column is all null), and the null count."""
    if column not in df.columns:
        return pd.Series(None, index=df.index, dtype=object), len(df)
    s = df[column]
    null = s.isna()
    out = s.astype(object).where(null, s.astype(str)).where(~null, None)
    return out, int(null.sum())
