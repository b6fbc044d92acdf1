#!/usr/bin/env bash
# The torch wheelhouse: build/wheelhouse/torch holds torch, torchvision and everything they need (plus pip
# and setuptools), as wheels for CPython 3.11 on Linux, at the versions of requirements/constraints.txt,
# and a constraints.txt with exactly those pins. It is the build context of the torch base image
# (services/base/Dockerfile), so the multi-GB torch install needs no download inside Docker.
#
# The host's pip downloads the wheels with the host's pip configuration (index, mirror, proxy CA, local
# find-links): on a machine whose pip finds torch on its local disk, nothing is fetched over the network.
# For an air-gapped host: run this where the index is reachable and carry build/wheelhouse/torch over.
# Up to date (the pins of the wheels present equal the constraints'): nothing to do.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${WHEELHOUSE:-build/wheelhouse/torch}
CONSTRAINTS=requirements/constraints.txt
ROOTS="pip setuptools torch torchvision"
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
say() { printf '[wheelhouse] %s\n' "$*" >&2; }

pins_for_wheels() {  # the constraints' lines for the distributions whose wheels lie in $OUT, sorted
  "$PY" - "$OUT" "$CONSTRAINTS" <<'PY'
import re, sys
from pathlib import Path
canon = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {canon(p.name.split("-")[0]) for p in Path(sys.argv[1]).glob("*.whl")}
pins = {}
for line in Path(sys.argv[2]).read_text().splitlines():
    if "==" in line and not line.startswith("#"):
        pins[canon(line.split("==")[0])] = line.strip()
missing = sorted(have - pins.keys())
if missing:
    sys.exit(f"wheels with no pin in the constraints: {missing}")
print("\n".join(sorted(pins[name] for name in have)))
PY
}

mkdir -p "$OUT"
if compgen -G "$OUT/*.whl" >/dev/null && [ -f "$OUT/constraints.txt" ] &&
  [ "$(pins_for_wheels 2>/dev/null || true)" = "$(cat "$OUT/constraints.txt")" ] &&
  grep -qx "$(grep -E '^torch==' "$CONSTRAINTS")" "$OUT/constraints.txt" &&
  grep -qx "$(grep -E '^torchvision==' "$CONSTRAINTS")" "$OUT/constraints.txt"; then
  say "up to date: $OUT ($(du -sh "$OUT" | cut -f1))"
  exit 0
fi
say "downloading $ROOTS and their requirements into $OUT with the host's pip"
rm -f "$OUT"/*.whl
# shellcheck disable=SC2086
# The platforms of python:3.11-slim (glibc 2.36): every manylinux tag up to glibc 2.28 (pip does not widen one).
platforms=(--platform "manylinux2014_$(uname -m)")
for minor in $(seq 17 28); do platforms+=(--platform "manylinux_2_${minor}_$(uname -m)"); done
"$PY" -m pip download --quiet --dest "$OUT" --only-binary=:all: --implementation cp --python-version 3.11 \
  "${platforms[@]}" -c "$CONSTRAINTS" $ROOTS 2>&1 | grep -v "^WARNING: Location 'file:" >&2 || true
compgen -G "$OUT/torch-*.whl" >/dev/null || { say "pip download failed"; exit 1; }
pins_for_wheels >"$OUT/constraints.txt.new"
mv "$OUT/constraints.txt.new" "$OUT/constraints.txt"
say "done: $(find "$OUT" -name '*.whl' | wc -l) wheels, $(du -sh "$OUT" | cut -f1)"
