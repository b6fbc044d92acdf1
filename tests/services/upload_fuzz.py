"""Fuzzing the gateway's upload path and its job specs: multipart parsing -> format detection -> decoding
(PNG, JPEG, DICOM) -> checks, in the real gateway app with in-memory queues (no Redis, no worker).

Every input must end in 200 or a 4xx with the JSON error body: never a 5xx, never an exception, with the
process's memory bounded (decompression bombs included). The seed corpus is real files from
``../shared/data`` when present (CheXpert, MURA, Kermany, NIH, PneumoniaMNIST, DICOMs), plus images made
here. test_fuzz.py runs a bounded hypothesis search in CI; run this file for a longer, coverage-guided
search with atheris, which prints the figure (inputs tried, outcomes by code):

    PYTHONPATH=tests:tests/services .venv/bin/python tests/services/upload_fuzz.py --seconds 600 \
        [--target upload|body|dicom|spec]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from gateway_fakes import FakeQueue, FakeTraining, gateway_client
from svc_helpers import dicom_bytes, jpeg_bytes, phantom, png_bytes, png_with_header_size

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("XRAYFM_SHARED_DATA", REPO.parent / "shared" / "data"))
SEED_FILES = (  # a few of each kind and format of the real data (paths relative to ../shared/data)
    "chexpert-small-valid/CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg",
    "mura-humerus-64/MURA-v1.1/valid/XR_HUMERUS/patient11186/study1_positive/image1.jpg",
    "dicom-radiographs/RG1_UNCR.dcm",
    "dicom-radiographs/RG3_J2KI.dcm",
)
SEED_GLOBS = (
    "kermany-pneumonia/chest_xray/train/NORMAL/*.jpeg",
    "nih-cxr14-1000-64/images/*.png",
    "pneumoniamnist/png/test/pneumonia/*.png",
    "dicom-radiographs/*.dcm",
)
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".dcm": "application/dicom"}


def seed_corpus(per_glob: int = 3) -> list[tuple[str, bytes]]:
    """(file name, bytes) of real files when the shared data is there, and of images made here."""

    found: list[Path] = [SHARED / p for p in SEED_FILES if (SHARED / p).is_file()]
    for pattern in SEED_GLOBS:
        found += sorted(SHARED.glob(pattern))[:per_glob]
    corpus = [(p.name, p.read_bytes()) for p in dict.fromkeys(found)]
    image = phantom(120, 90)
    corpus += [
        ("made.png", png_bytes(image)),
        ("made.jpg", jpeg_bytes(image)),
        ("made.dcm", dicom_bytes(image)),
    ]
    corpus += [("bomb.png", png_with_header_size(100_000, 100_000))]
    return corpus


class Target:
    """The gateway app, ready to be fed inputs; counts outcomes by status code."""

    def __init__(self) -> None:

        self.queue, self.training = FakeQueue(), FakeTraining()
        self.client = gateway_client(
            self.queue,
            self.training,
            max_upload_bytes=8 * 2**20,
            model_store=Path("/nonexistent-store"),
            insecure_no_auth=True,  # so that specs reach their check (closed-by-default has its own test)
            data_dirs=(Path("/data"),),
        ).__enter__()
        self.outcomes: Counter[int] = Counter()

    def close(self) -> None:
        self.client.__exit__(None, None, None)

    def _check(self, resp: Any, what: str) -> int:
        code = resp.status_code
        self.outcomes[code] += 1
        if code >= 500 or not (code == 200 or 400 <= code < 500):
            raise AssertionError(f"{what}: HTTP {code}: {resp.text[:500]}")
        if code != 200:
            body = resp.json()
            assert set(body) >= {"error", "detail"} or "detail" in body, (what, body)
        return code

    def upload(self, name: str, data: bytes) -> int:
        """POST /predict with `data` as the file (its extension and MIME type as the client says)."""
        mime = MIME.get(Path(name).suffix.lower(), "application/octet-stream")
        return self._check(self.client.post("/predict", files={"file": (name, data, mime)}), f"upload {name}")

    def body(self, data: bytes, boundary: str = "xrayfmfuzz") -> int:
        """POST /predict with `data` as the raw multipart body."""
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        return self._check(self.client.post("/predict", content=data, headers=headers), "raw body")

    def spec(self, spec: Any) -> int:
        """POST /training/jobs with `spec` as JSON."""
        return self._check(
            self.client.post(
                "/training/jobs",
                content=json.dumps(spec).encode(),
                headers={"Content-Type": "application/json"},
            ),  # fmt: skip
            "job spec",
        )


def multipart(name: str, data: bytes, boundary: str = "xrayfmfuzz") -> bytes:
    """A well-formed multipart body holding one file field (a starting point for body mutations)."""
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode()


def rss_mb() -> float:
    """This process's resident memory, MB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# -- the coverage-guided search (atheris), by hand ------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=60, help="how long to fuzz")
    parser.add_argument("--target", choices=("upload", "body", "dicom", "spec"), default="upload",
                        help="file contents, raw multipart bodies, DICOM files only, or training job specs")  # fmt: skip
    parser.add_argument(
        "--rss-limit-mb", type=int, default=3072, help="fail when the process grows past this"
    )
    parser.add_argument("--json", action="store_true", help="print the figure as JSON")
    args = parser.parse_args(argv)
    import atheris

    # Coverage feedback from the code under test; imported here so that atheris can instrument it.
    with atheris.instrument_imports(include=["xrayfm", "xrayfm_gateway", "xrayfm_stack", "PIL", "pydicom",
                                             "python_multipart", "pylibjpeg"]):  # fmt: skip
        target = Target()
        corpus = seed_corpus()
    if args.target == "dicom":
        corpus = [(n, d) for n, d in corpus if n.endswith(".dcm")]
    corpus_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"xrayfm-fuzz-{args.target}"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for i, (name, data) in enumerate(corpus):  # atheris starts from these and mutates them
        seed = multipart(name, data) if args.target == "body" else data
        (corpus_dir / f"seed-{i}{Path(name).suffix}").write_bytes(seed)
    names = [name for name, _ in corpus]

    def report() -> None:
        figure = {
            "target": args.target,
            "seconds": round(time.monotonic() - start, 1),
            "inputs": sum(target.outcomes.values()),
            "outcomes": {str(k): v for k, v in sorted(target.outcomes.items())},
            "5xx": sum(v for k, v in target.outcomes.items() if k >= 500),
            "rss_mb_start": round(rss0),
            "rss_mb_end": round(rss_mb()),
        }
        print(
            json.dumps(figure) if args.json else "\n".join(f"{k}: {v}" for k, v in figure.items()), flush=True
        )

    def one_input(data: bytes) -> None:
        if time.monotonic() - start > args.seconds:  # libFuzzer exits without Python's clean-up: report here
            report()
            os._exit(0)
        if args.target == "spec":
            fdp = atheris.FuzzedDataProvider(data)
            text = fdp.ConsumeUnicodeNoSurrogates(len(data))
            try:
                spec = json.loads(text)
            except ValueError:
                spec = {"kind": "pretrain", "name": "x", "config": {"root": text}}
            target.spec(spec)
        elif args.target == "body":
            target.body(data)
        else:
            target.upload(names[len(data) % len(names)], data)

    sys.argv = [sys.argv[0], str(corpus_dir), f"-rss_limit_mb={args.rss_limit_mb}"]
    start, rss0 = time.monotonic(), rss_mb()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()  # a failing input (5xx, exception, memory over the limit) stops here with its reproducer
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
