"""Label CSVs in the competition format, validated before any training starts.

Labels are `img_name,target` (1 = fake, 0 = real); a test list needs only `img_name`.
A manifest adds `method,parent,region`. Names are relative to an image root and may not
escape it.
"""

from __future__ import annotations

import io
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

# pandas is imported where a table is read: infer.py reaches LabelError through the data
# config without reading any table, and importing pandas would cost its fast path ~0.5 s.
if TYPE_CHECKING:
    import pandas as pd

SHOW = 5  # how many offending names an error message lists
DELIMITERS = (",", "\t", ";")  # what spreadsheets export: CSV, tab-separated text, European-locale CSV


class LabelError(ValueError):
    """A label CSV is malformed; the message names the file and the reason."""


def _listing(names: list[str]) -> str:
    shown = ", ".join(map(str, names[:SHOW]))
    more = f" and {len(names) - SHOW} more" if len(names) > SHOW else ""
    return f"{shown}{more}"


def safe_join(root: str | Path, name: str) -> Path:
    """Join `name` under `root`, refusing absolute names and names that climb out of it."""
    rel = PurePosixPath(str(name).replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or str(name).startswith("~"):
        raise LabelError(f"{name}: path escapes the image root {root}")
    return Path(root) / rel


def _decode(path: Path) -> str:
    """The file's text. UTF-8 (a leading byte-order mark, as spreadsheets write, is dropped);
    anything else is refused with the encoding it looks like, because image names decoded with
    a guessed encoding would not match the files on disk."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        # Every byte sequence decodes as Latin-1, so the name is a description, not a check;
        # cp1252 is what Windows spreadsheets write for "ANSI".
        raise LabelError(
            f"{path}: not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); it looks Latin-1 / "
            "Windows-1252 encoded: save it as UTF-8 (CSV UTF-8 in a spreadsheet)"
        ) from None


def _delimiter(header: str, required: list[str]) -> str:
    """The delimiter among comma, tab and semicolon under which the header names the required columns."""
    for sep in DELIMITERS:
        if set(required) <= {c.strip() for c in header.split(sep)}:
            return sep
    return ","


def read_table(path: Path, required: list[str]) -> pd.DataFrame:
    """A label-like CSV as strings, whatever a spreadsheet made of it: comma, tab or semicolon
    separated, spaces around the values, a byte-order mark. Raises LabelError naming what was
    found and what is expected when the required columns are not there."""
    import pandas as pd

    text = _decode(path)
    header = text.split("\n", 1)[0]
    sep = _delimiter(header, required)
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
        raise LabelError(f"{path}: not a readable CSV ({str(err).strip().splitlines()[0]})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise LabelError(
            f"{path}: missing column(s) {missing}; found {list(df.columns)} in the header {header.strip()!r}, "
            f"expected {','.join(required)} (comma- or tab-separated)"
        )
    for col in df.columns:
        df[col] = df[col].str.strip()
    df["img_name"] = df["img_name"].replace("", None)
    return df


def read_labels(
    csv_path: str | Path,
    image_root: str | Path,
    *,
    require_target: bool = True,
    check_files: bool = True,
) -> pd.DataFrame:
    """Read and validate a label CSV; return it with an extra `path` column.

    Raises LabelError for a missing or empty file, missing columns, duplicate names,
    targets other than 0/1, names escaping `image_root`, or images that do not exist.
    """
    import pandas as pd

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise LabelError(f"{csv_path}: no such label file")
    required = ["img_name", "target"] if require_target else ["img_name"]
    df = read_table(csv_path, required)
    if df.empty:
        raise LabelError(f"{csv_path}: no rows")
    if df["img_name"].isna().any():
        raise LabelError(f"{csv_path}: empty img_name on row(s) {_listing(df.index[df['img_name'].isna()].tolist())}")
    dupes = df["img_name"][df["img_name"].duplicated()].unique().tolist()
    if dupes:
        raise LabelError(f"{csv_path}: duplicate img_name {_listing(dupes)}")
    if "target" in df.columns:
        target = pd.to_numeric(df["target"], errors="coerce")
        bad = df["img_name"][~target.isin([0, 1])].tolist()
        if bad:
            raise LabelError(f"{csv_path}: target must be 0 or 1, not for {_listing(bad)}")
        df["target"] = target.astype(int)
    try:
        df["path"] = [str(safe_join(image_root, n)) for n in df["img_name"]]
    except LabelError as err:
        raise LabelError(f"{csv_path}: {err}") from None
    if check_files:
        absent = df["img_name"][~df["path"].map(lambda p: Path(p).is_file())].tolist()
        if absent:
            raise LabelError(f"{csv_path}: {len(absent)} image(s) not found under {image_root}: {_listing(absent)}")
    return df.reset_index(drop=True)
