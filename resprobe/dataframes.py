"""pandas as an optional dependency: DataFrames of JSON rows, with one clear error where it is missing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from resprobe.errors import BadValue


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise BadValue("DataFrames need pandas: pip install pandas (or use .to_json(), a plain dict)") from None
    return pandas


def frame(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Any:
    """A DataFrame of JSON rows, columns in the rows' order (an empty table keeps ``columns``)."""
    rows = list(rows)
    return _pandas().DataFrame(rows, columns=list(columns) if columns is not None and not rows else None)
