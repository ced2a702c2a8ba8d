"""What the manifest of a prepared dataset must say before any of it is used: a JSON object of
this format and version, fields of the right types, the two files flowpp writes, split ranges
that are the layout it writes (train then valid in trainvalid.npy, test all of test.npy), and the
levels the folder is for. A hand-edited range or file name would otherwise train on the wrong
images under the right name."""

from __future__ import annotations

import json
import reprlib
from pathlib import Path

from .registry import find_dataset

__all__ = ["PREPARED_VERSION", "TRAINVALID", "TEST", "SPLIT_FILES", "read_manifest"]

PREPARED_VERSION = 1
TRAINVALID, TEST = "trainvalid.npy", "test.npy"
SPLIT_FILES = {"train": TRAINVALID, "valid": TRAINVALID, "train+valid": TRAINVALID, "test": TEST}


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _malformed(m) -> str | None:
    """What in manifest ``m`` (already known to be a dict of this format) has the wrong type, or None."""
    files, splits, descriptions, sources = (m.get(k) for k in ("files", "splits", "descriptions", "sources"))
    if not isinstance(files, dict) or not all(
        isinstance(info, dict)
        and isinstance(info.get("shape"), list)
        and len(info["shape"]) == 4
        and all(_is_count(d) and d >= 0 for d in info["shape"])
        and isinstance(info.get("sha256"), str)
        and isinstance(info.get("spot"), str)
        for info in files.values()
    ):
        return "files: each needs a shape of four counts, a sha256 and a spot digest"
    if not isinstance(splits, dict) or set(splits) != set(SPLIT_FILES) or not all(
        v is None or (isinstance(v, list) and len(v) == 3 and isinstance(v[0], str) and _is_count(v[1])
                      and _is_count(v[2]))
        for v in splits.values()
    ):  # fmt: skip
        return f"splits: {', '.join(SPLIT_FILES)}, each [file, first row, end row] or null"
    if not isinstance(descriptions, dict) or not all(
        isinstance(descriptions.get(s), str) for s, v in splits.items() if v is not None
    ):
        return "descriptions: one text per split"
    if not isinstance(sources, list) or not all(
        isinstance(s, dict)
        and isinstance(s.get("path"), str)
        and _is_count(s.get("mtime_ns"))
        and ((s.get("size") is None and s.get("sha256") is None)
             or (_is_count(s.get("size")) and isinstance(s.get("sha256"), str)))
        for s in sources
    ):  # fmt: skip
        return "sources: each needs a path, a size and SHA-256 (null for a folder) and an mtime_ns"
    if not _is_count(m.get("num_levels")) or not 2 <= m["num_levels"] <= 256:
        return f"num_levels: a count of levels in 2..256, not {m.get('num_levels')!r}"
    if not isinstance(m.get("name"), str) or not isinstance(m.get("missing"), (str, type(None))):
        return "name and missing: texts"
    return None


def _layout_problem(m: dict, dataset, num_levels: int | None) -> str | None:
    """Why the (well-typed) manifest ``m`` does not describe what flowpp's preparation writes, or None: the
    file names, the split ranges (train, then valid, in trainvalid.npy; test all of test.npy) and levels.
    A hand-edited range or file name would otherwise train on the wrong images under the right name."""
    files, splits = m["files"], m["splits"]
    unknown = sorted(set(files) - set(SPLIT_FILES.values()))
    if unknown or TRAINVALID not in files:
        return f"its manifest lists a file flowpp does not write ({unknown[0]!r})" if unknown else \
            f"its manifest does not list {TRAINVALID}"  # fmt: skip
    if (splits["test"] is None) != (TEST not in files):
        return f"the manifest lists {TEST} but has no test split" if splits["test"] is None else \
            f"the manifest has a test split but does not list {TEST}"  # fmt: skip
    absent = [split for split in ("train", "valid", "train+valid") if splits[split] is None]
    if absent:
        return f"the manifest has no {absent[0]} split"
    n = files[TRAINVALID]["shape"][0]
    valid_start = splits["valid"][1] if splits["valid"][0] == TRAINVALID else None
    whole = {
        "valid": ((valid_start, n), f"the last rows of {TRAINVALID}"),
        "train": ((0, valid_start), f"the rows of {TRAINVALID} before the valid split"),
        "train+valid": ((0, n), f"all of {TRAINVALID}"),
        "test": ((0, files[TEST]["shape"][0] if TEST in files else 0), f"all of {TEST}"),
    }
    for split, ((want_lo, want_hi), what) in whole.items():  # valid first: train is defined by where it starts
        if splits[split] is None:
            continue
        name, lo, hi = splits[split]
        if name != SPLIT_FILES[split]:
            return f"the {split} split must read {SPLIT_FILES[split]}, not {name!r}"
        rows = files[name]["shape"][0]
        if not 0 <= lo <= hi <= rows:
            return f"the {split} split reads rows {lo}..{hi} of {name}, which has {rows}"
        if (lo, hi) != (want_lo, want_hi):
            return f"the {split} split must be {what}, not rows {lo}..{hi}"
    spec = find_dataset(dataset)
    levels = num_levels or (spec.num_levels if spec is not None else None)
    if levels is not None and m["num_levels"] != levels:
        return f"the manifest says {m['num_levels']} levels, this preparation is for {levels}"
    return None


def read_manifest(folder: Path, dataset, num_levels: int | None) -> tuple[dict | None, str | None]:
    """(the manifest in ``folder``, None) when it is whole and describes what flowpp writes, else
    (None, why not). Checks the manifest only, not the arrays it describes."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None, "not prepared yet"
    try:
        m = json.loads(manifest.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
        return None, f"its manifest is unreadable ({e})"
    if not isinstance(m, dict):
        return None, f"its manifest is malformed (a JSON {type(m).__name__}, not an object)"
    if m.get("format") != "flowpp-prepared" or m.get("version") != PREPARED_VERSION:
        version = reprlib.repr(m.get("version"))
        return None, f"it was written in another format (version {version}, this flowpp writes {PREPARED_VERSION})"
    why = _malformed(m)
    if why is not None:
        return None, f"its manifest is malformed ({why})"
    why = _layout_problem(m, dataset, num_levels)
    return (None, why) if why is not None else (m, None)
