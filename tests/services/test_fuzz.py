"""Bounded fuzzing of the gateway's upload path, DICOM decoding and job specs (hypothesis): every input ends
in 200 or a 4xx, never a 5xx or an exception, and memory stays bounded. The longer, coverage-guided run is
by hand: tests/services/upload_fuzz.py (atheris). XRAYFM_FUZZ_EXAMPLES scales the CI budget."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from svc_helpers import png_with_header_size
from upload_fuzz import Target, multipart, rss_mb, seed_corpus

EXAMPLES = int(os.environ.get("XRAYFM_FUZZ_EXAMPLES", "150"))
CORPUS = seed_corpus()
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def target():
    fuzz_target = Target()
    yield fuzz_target
    fuzz_target.close()


@st.composite
def mutated(draw, corpus=CORPUS) -> tuple[str, bytes]:
    """A real (or made-here) file, then a few byte-level mutations: flips, cuts, splices, overwrites."""
    name, data = draw(st.sampled_from(corpus))
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite", "header"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(max_size=64))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(chunk)] = chunk
        else:  # the first bytes decide the format and hold the size fields: hit them often
            at = draw(st.integers(0, min(len(data), 400)))
            data[at : at + 4] = draw(st.binary(min_size=4, max_size=4))
    suffix = draw(st.sampled_from([name, "x.png", "x.jpg", "x.dcm", "x.txt", "noext"]))
    return suffix, bytes(data)


@FUZZ
@given(case=mutated())
def test_uploads_end_in_200_or_4xx(target, case):
    target.upload(*case)


@FUZZ
@given(data=st.binary(max_size=2048), name=st.sampled_from(["x.png", "x.jpg", "x.dcm", "x"]))
def test_random_bytes_end_in_4xx(target, data, name):
    assert target.upload(name, data) >= 400 or data[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0")


@FUZZ
@given(case=mutated([(n, d) for n, d in CORPUS if n.endswith(".dcm")]))
def test_dicom_mutations(target, case):
    target.upload(*case)


@FUZZ
@given(case=mutated(), cut=st.integers(0, 400), junk=st.binary(max_size=64))
def test_multipart_bodies(target, case, cut, junk):
    body = multipart(*case)
    target.body(body[:cut] + junk + body[cut:])


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
PATHS = st.sampled_from(["/proc/self/environ", "/etc/passwd", "../../etc", "/data/../etc", "", "store:x/1"])


@FUZZ
@given(
    spec=st.one_of(
        JSON,
        st.fixed_dictionaries(
            {
                "kind": st.sampled_from(["pretrain", "adapt", "evaluate", "x"]),
                "config": st.dictionaries(
                    st.sampled_from(
                        ["kind", "root", "cache", "foundation", "model", "epochs", "model_kwargs", "out"]
                    ),
                    JSON | PATHS,
                    max_size=5,
                ),
            },  # fmt: skip
            optional={"name": st.text(max_size=12)},
        ),
    )
)
def test_job_specs_end_in_202_or_4xx(target, spec):
    target.spec(spec)


def test_decompression_bombs_are_refused_with_bounded_memory(target):
    before = rss_mb()
    for side in (30_000, 100_000, 2**31 - 1):
        assert target.upload("bomb.png", png_with_header_size(side, side)) == 422
    assert rss_mb() - before < 200  # refused from the header: the pixels were never allocated


def test_the_search_met_no_5xx(target):
    """Runs last in this module: the figure of this CI run (printed with -s)."""
    print({"inputs": sum(target.outcomes.values()), "outcomes": dict(sorted(target.outcomes.items()))})
    assert not [code for code in target.outcomes if code >= 500]
