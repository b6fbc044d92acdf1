"""xrayfm.utils: strict JSON, atomic writes that never leave half a file, SHA-256, the file lock."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from xrayfm.errors import XrayfmError
from xrayfm.utils import (
    LockBusy,
    atomic_dir,
    atomic_path,
    atomic_write,
    atomic_write_json,
    file_lock,
    read_json,
    sha256_bytes,
    sha256_file,
    sha256_folder,
    to_jsonable,
)


# -- JSON --------------------------------------------------------------------------------------------------
def test_to_jsonable_makes_numpy_paths_and_non_finite_values_plain() -> None:
    value = {
        "nan": float("nan"),
        "inf": np.float32("inf"),
        "f": np.float32(0.5),
        "i": np.int64(3),
        "b": np.bool_(True),
        "arr": np.array([1.0, np.nan]),
        "tuple": (1, Path("a/b")),
        "set": {2},
        7: "int key",
    }
    out = to_jsonable(value)
    assert out == {
        "nan": None,
        "inf": None,
        "f": 0.5,
        "i": 3,
        "b": True,
        "arr": [1.0, None],
        "tuple": [1, "a/b"],
        "set": [2],
        "7": "int key",
    }
    assert type(out["i"]) is int and type(out["b"]) is bool and type(out["f"]) is float
    json.dumps(out, allow_nan=False)  # strict JSON: no NaN, no numpy types left


def test_to_jsonable_lenient_mode_turns_unknown_objects_into_numbers_or_text() -> None:
    class Celsius:
        def __float__(self) -> float:
            return 21.5

    class Opaque:
        def __str__(self) -> str:
            return "opaque"

    assert to_jsonable([Celsius(), Opaque()]) == [21.5, "opaque"]


def test_to_jsonable_strict_mode_names_what_is_not_plain_data() -> None:
    with pytest.raises(XrayfmError, match=r"metadata\.extra\.fn is a builtin_function_or_method: it must be"):
        to_jsonable({"extra": {"fn": print}}, strict=True, where="metadata")
    with pytest.raises(XrayfmError, match=r"metadata has non-string keys 1"):
        to_jsonable({1: "a"}, strict=True, where="metadata")
    with pytest.raises(XrayfmError, match=r"value\.labels\[1\] is a object"):
        to_jsonable({"labels": ["a", object()]}, strict=True)
    # plain data passes unchanged, NaN still becomes null
    assert to_jsonable({"a": [1, 2.5, None, math.nan]}, strict=True) == {"a": [1, 2.5, None, None]}


def test_read_json_default_and_errors(tmp_path: Path) -> None:
    assert read_json(tmp_path / "absent.json", default={}) == {}
    with pytest.raises(XrayfmError, match="file not found"):
        read_json(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"secret": "s3cr3t",')
    with pytest.raises(XrayfmError, match=r"not valid JSON \(line 1, column") as info:
        read_json(broken)
    assert "s3cr3t" not in str(info.value)  # the error never quotes the file's content


# -- atomic writes -----------------------------------------------------------------------------------------
def test_atomic_write_replaces_and_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.txt"
    atomic_write(target, "old")
    atomic_write(target, b"new")
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half a fi")
        raise RuntimeError("disk full")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.txt"], "temporary file left behind"


def test_atomic_write_json_is_strict_json_with_a_newline(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    atomic_write_json(target, {"auroc": float("nan"), "n": np.int32(4)})
    text = target.read_text()
    assert text.endswith("\n") and json.loads(text) == {"auroc": None, "n": 4}


def test_atomic_dir_swaps_whole_folders_and_keeps_the_old_one_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(ValueError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("2")
        raise ValueError("failed half-way")
    assert (out / "a.txt").read_text() == "1"
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "temporary folders left behind"


# -- SHA-256 -----------------------------------------------------------------------------------------------
def test_sha256_helpers(tmp_path: Path) -> None:
    assert sha256_bytes("ab", "c") != sha256_bytes("a", "bc")  # parts are separated
    assert sha256_bytes("ab") == sha256_bytes(b"ab")
    file = tmp_path / "w.bin"
    file.write_bytes(b"\x00\x01")
    expected = "b413f47d13ee2fe6c845b2ee141af81de858df4ec549a58b7970bb96645bc8d2"  # from sha256sum
    assert sha256_file(file) == expected
    with pytest.raises(XrayfmError, match="file not found"):
        sha256_file(tmp_path / "nope")


def test_folder_hash_changes_when_one_byte_or_one_name_changes(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    (folder / "adapter").mkdir(parents=True)
    (folder / "meta.json").write_text("{}")
    (folder / "adapter" / "weights.bin").write_bytes(bytes(range(256)) * 4)
    first = sha256_folder(folder)
    assert sha256_folder(folder) == first
    data = bytearray((folder / "adapter" / "weights.bin").read_bytes())
    data[700] ^= 1
    (folder / "adapter" / "weights.bin").write_bytes(bytes(data))
    changed = sha256_folder(folder)
    assert changed != first
    (folder / "meta.json").rename(folder / "meta2.json")
    assert sha256_folder(folder) != changed
    assert sha256_folder(folder / "meta2.json") == sha256_file(folder / "meta2.json")


# -- file lock ---------------------------------------------------------------------------------------------
def _try_lock_in_another_process(lock: Path) -> str:
    code = textwrap.dedent(
        f"""
        from xrayfm.utils import LockBusy, file_lock
        try:
            with file_lock({str(lock)!r}, wait=False):
                print("got it")
        except LockBusy as exc:
            print("busy:", exc)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.slow  # starts a process
def test_lock_is_busy_for_another_process_until_released(tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "cache.lock"
    with file_lock(lock):
        answer = _try_lock_in_another_process(lock)
        assert answer.startswith("busy:") and str(lock) in answer
    assert _try_lock_in_another_process(lock) == "got it"


def test_lock_busy_is_an_xrayfm_error_and_the_lock_is_released_on_exceptions(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    assert issubclass(LockBusy, XrayfmError)
    with pytest.raises(KeyError), file_lock(lock, wait=False):
        raise KeyError("inside")
    with file_lock(lock, wait=False):  # released: taken again at once
        pass
