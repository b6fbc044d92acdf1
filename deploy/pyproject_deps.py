"""Print the third-party requirements of local projects, one per line, for `pip install -c constraints -r`.

    python deploy/pyproject_deps.py 'shared[torch]' services/common services/inference
    python deploy/pyproject_deps.py --check-pinned requirements/constraints.txt
    python deploy/pyproject_deps.py --locked requirements/lock.txt REPORT.json


Each argument is a project folder (with a pyproject.toml) and optional extras. A requirement naming one of
the given projects (``xrayfm[render]``, ``xrayfm-stack``) is expanded into that project's own requirements
(with those extras) instead of being printed. The Dockerfiles use this to install the dependencies in a
layer of their own, before the code is copied, so that a code change rebuilds only the code's layer. Only
the standard library: it runs in a bare image.

``--locked`` turns what pip would install (``pip install --dry-run --report REPORT.json -c constraints -r
requirements.txt``) into the hashed lock's entries of those packages, for ``pip install --require-hashes
--no-deps -r``: every file an image installs is then checked against the lock's sha256 hashes.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*(.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(requirement: str) -> tuple[str, set[str], str]:
    """(canonical name, extras, the rest: version and markers) of a PEP 508 requirement."""
    match = REQUIREMENT.match(requirement)
    if not match:
        raise SystemExit(f"cannot parse requirement {requirement!r}")
    extras = {canonical(e) for e in (match[2] or "").split(",") if e.strip()}
    return canonical(match[1]), extras, match[3].strip()


def check_pinned(constraints: Path) -> int:
    """Every distribution installed in this environment at the version the constraints pin (the images
    run it after installing: a package the constraints do not name would have come at any version)."""
    import importlib.metadata

    pins = {}
    for line in constraints.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    wrong = []
    for dist in importlib.metadata.distributions():
        name = canonical(dist.metadata["Name"])
        if name.startswith("xrayfm"):
            continue  # the local packages
        if pins.get(name) != dist.version:
            wrong.append(f"{name}=={dist.version} (pinned: {pins.get(name, 'nothing')})")
    if wrong:
        print(f"not pinned by {constraints}: " + ", ".join(sorted(wrong)), file=sys.stderr)
        return 1
    return 0


def lock_entries(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """canonical name -> (version, ``--hash=...`` options) of a ``uv pip compile --generate-hashes`` file."""
    entries: dict[str, tuple[str, list[str]]] = {}
    hashes: list[str] | None = None
    for line in lock.read_text().splitlines():
        text = line.strip().removesuffix("\\").strip()
        if not text or text.startswith("#"):
            continue
        if not line[0].isspace():
            name, _, rest = text.partition("==")
            hashes = []
            entries[canonical(name)] = (rest.split(";")[0].strip(), hashes)
        elif text.startswith("--hash=") and hashes is not None:
            hashes.append(text)
    return entries


def locked(lock: Path, report: Path) -> int:
    """Print the lock's entry (name==version and its hashes) of every package in pip's install report;
    a package the lock does not hold, or holds at another version, is an error."""
    import json

    entries = lock_entries(lock)
    lines, wrong = [], []
    for item in json.loads(report.read_text()).get("install", []):
        name, version = canonical(item["metadata"]["name"]), item["metadata"]["version"]
        held = entries.get(name)
        if held is None or held[0] != version or not held[1]:
            wrong.append(f"{name}=={version} (lock: {held[0] if held else 'nothing'})")
            continue
        lines.append(" ".join([f"{name}=={version}", *held[1]]))
    if wrong:
        print(f"not in the hashed lock {lock}: " + ", ".join(sorted(wrong)), file=sys.stderr)
        return 1
    print("\n".join(sorted(lines)))
    return 0


def main(args: list[str]) -> int:
    if args[:1] == ["--check-pinned"]:
        return check_pinned(Path(args[1]))
    if args[:1] == ["--locked"]:
        return locked(Path(args[1]), Path(args[2]))
    projects: dict[str, dict] = {}
    wanted: list[tuple[str, set[str]]] = []
    for arg in args:
        folder, extras = re.fullmatch(r"([^\[]+)(?:\[([^\]]*)\])?", arg).groups()
        project = tomllib.loads((Path(folder) / "pyproject.toml").read_text())["project"]
        name = canonical(project["name"])
        projects[name] = project
        wanted.append((name, {canonical(e) for e in (extras or "").split(",") if e.strip()}))
    printed: list[str] = []
    seen: set[tuple[str, frozenset[str]]] = set()
    while wanted:
        name, extras = wanted.pop(0)
        if (name, frozenset(extras)) in seen:
            continue
        seen.add((name, frozenset(extras)))
        project = projects[name]
        requirements = list(project.get("dependencies", []))
        for extra in sorted(extras):
            requirements += project.get("optional-dependencies", {})[extra]
        for requirement in requirements:
            dep, dep_extras, _ = parse(requirement)
            if dep in projects:
                wanted.append((dep, dep_extras))
            elif requirement not in printed:
                printed.append(requirement)
    print("\n".join(printed))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
