"""The hashed lock (requirements/lock.txt) pins exactly what requirements/constraints.txt pins, every package
with at least one sha256, and `make install` installs the venv's third-party packages from it in pip's
hash-checking mode."""

from __future__ import annotations

import json
import re

from tests.helpers import REPO

PIN = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;\\]+)")


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()


def pins(text: str) -> dict[str, str]:
    return {normal(m[1]): m[2] for line in text.splitlines() if (m := PIN.match(line))}


def test_the_lock_pins_what_the_constraints_pin_each_with_hashes() -> None:
    constraints = pins((REPO / "requirements/constraints.txt").read_text())
    lock_text = (REPO / "requirements/lock.txt").read_text()
    assert pins(lock_text) == constraints
    blocks = re.split(r"\n(?=[A-Za-z0-9])", lock_text)
    unhashed = [b.split()[0] for b in blocks if b.strip() and "--hash=sha256:" not in b]
    assert not unhashed, unhashed


def test_make_install_takes_third_party_packages_from_the_lock_in_hash_checking_mode() -> None:
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert "install --require-hashes --no-deps -r $(LOCK)" in recipe
    project = [line for line in recipe.splitlines() if "-e " in line]
    assert project and all("--no-deps" in line for line in project)  # nothing resolved past the lock
    assert "pip check" in recipe.replace("$(PIP)", "pip")


def _pyproject_deps():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pyproject_deps", REPO / "deploy/pyproject_deps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_image_installs_what_pip_resolved_only_from_the_locks_hashed_entries(tmp_path, capsys) -> None:
    deps = _pyproject_deps()
    lock = REPO / "requirements/lock.txt"
    held = deps.lock_entries(lock)
    redis = held["redis"][0]
    report = tmp_path / "resolved.json"
    install = [
        {"metadata": {"name": "Redis", "version": redis}},
        {"metadata": {"name": "async_timeout", "version": held["async-timeout"][0]}},
    ]
    report.write_text(json.dumps({"install": install}))
    assert deps.locked(lock, report) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [
        f"async-timeout=={held['async-timeout'][0]}",
        f"redis=={redis}",
    ]
    assert all(part.startswith("--hash=sha256:") for line in lines for part in line.split()[1:])
    assert lines[1].split()[1:] == held["redis"][1]

    install += [
        {"metadata": {"name": "redis", "version": "0.0.1"}},
        {"metadata": {"name": "left-pad", "version": "1.0"}},
    ]
    report.write_text(json.dumps({"install": install}))
    assert deps.locked(lock, report) == 1
    error = capsys.readouterr().err
    assert "left-pad==1.0 (lock: nothing)" in error and f"redis==0.0.1 (lock: {redis})" in error


def test_every_image_installs_its_third_party_packages_in_hash_checking_mode() -> None:
    dockerfiles = sorted(REPO.glob("services/*/Dockerfile*"))
    dockerfiles = [d for d in dockerfiles if not d.name.endswith(".dockerignore") and d.parent.name != "base"]
    assert len(dockerfiles) == 6, dockerfiles
    assert "!requirements/lock.txt" in (REPO / ".dockerignore").read_text()  # the legacy builder's
    for dockerfile in dockerfiles:
        text = dockerfile.read_text()
        assert (
            "--locked requirements/lock.txt" in text
            and "--require-hashes --no-deps -r requirements.locked" in text
        ), dockerfile
        assert "-c requirements/constraints.txt -r requirements.txt\n" not in text, (
            dockerfile
        )  # no unhashed install
        ignore = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text()
        assert "!requirements/lock.txt" in ignore, dockerfile
