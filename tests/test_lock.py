"""The hashed lock (requirements/lock.txt) pins exactly what requirements/constraints.txt pins, every package
with at least one sha256, and `make install` installs the venv's third-party packages from it in pip's
hash-checking mode."""

from __future__ import annotations

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
