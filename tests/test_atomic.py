"""Atomic writes and the JSON flowpp writes (summary.json, eval results, model cards)."""

import json
import math

import pytest

from flowpp.atomic import atomic_write, atomic_write_text, json_text, write_json
from flowpp.runs import RunDir


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"not standard JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_json_is_standard_even_for_nan_and_infinities(tmp_path):
    obj = {"bpd": float("nan"), "nested": [1.5, float("inf"), {"x": -math.inf}], "path": tmp_path}
    assert _strict(json_text(obj)) == {"bpd": None, "nested": [1.5, None, {"x": None}], "path": str(tmp_path)}
    # A summary of a run whose last evaluation was NaN, as `flowpp train` writes it:
    run = RunDir(tmp_path / "run")
    run.write_summary({"final_valid_bpd": float("nan"), "steps": 3})
    assert _strict(run.summary_file.read_text()) == {"final_valid_bpd": None, "steps": 3}
    write_json(tmp_path / "e.json", {"bpd": float("-inf")})
    assert _strict((tmp_path / "e.json").read_text()) == {"bpd": None}


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_text(target, "old")

    def half_then_fail(f):
        f.write(b"new, half written")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_written_files_get_the_usual_permissions_not_mkstemps_private_ones(tmp_path):
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    path = atomic_write_text(tmp_path / "card.json", "{}")
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
