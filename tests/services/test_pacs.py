"""A PACS connected for real: Orthanc (/usr/sbin/Orthanc, a private configuration and storage), the stack
(Redis, a Celery inference worker with the shipped pneumonia model and its domain gate, the gateway with API
keys on) and the router following Orthanc's changes feed, all as processes.

Studies: three real Kermany paediatric chest X-rays (inside the model's domain) made into DICOM with dcmtk's
img2dcm, in one study with a copy of the real RG3 tibia as a second series; and a copy of the real RG1 chest.
Each carries a known patient name and ID. dcmtk's storescu pushes them into Orthanc; dicomweb-client calls
the gateway's STOW-RS. Checked: the SR and one heatmap SC per image appear in the study in Orthanc; dciodvfy
finds no errors in them; highdicom reads the SR's probability back as the JSON answer has it; the tibia
series is skipped with the gate's verdict in the audit log; a second push and a second store make no
duplicate; no log, Redis key or value, metric or audit line holds the patient's name or ID.
"""

from __future__ import annotations

import io
import json
import re
import secrets
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import highdicom as hd
import httpx
import pydicom
import pytest
import redis
import requests
from dicomweb_client import DICOMwebClient
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from tests.dicom_studies import TIBIA, dciodvfy, kermany_images, make_study, storescu, uncompressed
from tests.helpers import starts_processes
from tests.services.svc_helpers import RunningStack, free_port, jpeg_bytes, phantom, start_stack
from xrayfm.hospital.result import MANUFACTURER
from xrayfm_local import launcher as stack_lib
from xrayfm_training.bootstrap import install_shipped

pytestmark = [
    pytest.mark.slow,
    pytest.mark.real_data,
    pytest.mark.skipif(stack_lib.orthanc_binary() is None, reason="Orthanc is not installed"),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk (storescu, img2dcm) is not installed"),
    pytest.mark.filterwarnings('ignore:The string "ward":UserWarning'),  # RG1's referring physician
]
SHIPPED = "xrayfm/cxr-vit-tiny-mae-pneumonia-lora"
# What the study carries and nothing the stack writes may: a name and an ID found nowhere else.
PATIENT_NAME = "QUIRINIUS^ZEPHYRA"
PATIENT_ID = "PX-90417-ZQ"
API_KEY = "pacs-test-key"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from xrayfm_stack.store import promote

    folder = tmp_path_factory.mktemp("pacs-store") / "store"
    ref = install_shipped(folder, SHIPPED)
    promote(folder, ref["name"], ref["version"])
    return folder


class Pacs:
    """The test's Orthanc: REST (httpx) and DICOMweb (dicomweb-client) with its user and password."""

    def __init__(self, http_port: int, dicom_port: int, password: str, logs: Path) -> None:
        self.url, self.dicom_port, self.password = f"http://127.0.0.1:{http_port}", dicom_port, password
        self.http = httpx.Client(base_url=self.url, auth=("xrayfm", password), timeout=30)
        self.logs = logs  # Orthanc's log folder

    def push(self, files: list[Path]) -> None:
        """C-STORE the files with dcmtk's storescu."""
        storescu(files, self.dicom_port)

    def study_id(self, study_uid: str) -> str:
        [found] = self.http.post("/tools/lookup", content=study_uid).json()
        return found["ID"]

    def series(self, study_uid: str) -> list[dict]:
        study = self.http.get(f"/studies/{self.study_id(study_uid)}").json()
        return [self.http.get(f"/series/{series}").json() for series in study["Series"]]

    def results(self, study_uid: str) -> dict[str, list[str]]:
        """The stack's result instances in the study: ``SR`` the report, ``SC`` the captures."""
        found: dict[str, list[str]] = {}
        for series in self.series(study_uid):
            tags = series["MainDicomTags"]
            if tags.get("Manufacturer") == MANUFACTURER:
                found.setdefault("SR" if tags["Modality"] == "SR" else "SC", []).extend(
                    sorted(series["Instances"])
                )
        return found

    def file(self, instance: str) -> bytes:
        return self.http.get(f"/instances/{instance}/file").content


@pytest.fixture(scope="module")
@starts_processes
def pacs(tmp_path_factory) -> Pacs:
    home = tmp_path_factory.mktemp("orthanc")
    http_port, dicom_port, password = free_port(), free_port(), secrets.token_hex(8)
    launcher = stack_lib.Stack(home)
    launcher.start_orthanc(home / "orthanc", http_port, dicom_port, password, stable_age=1)
    yield Pacs(http_port, dicom_port, password, home / "logs")
    launcher.stop_all()


@pytest.fixture(scope="module")
@starts_processes
def stack(tmp_path_factory, store: Path, pacs: Pacs) -> RunningStack:
    home = tmp_path_factory.mktemp("pacs-stack")
    running = start_stack(home, Path(""), XRAYFM_MODEL_PATH="", XRAYFM_MODEL_STORE=str(store),
                          XRAYFM_API_KEYS=API_KEY, XRAYFM_DOMAIN_POLICY="refuse")  # fmt: skip
    running.router_env = {
        "XRAYFM_ORTHANC_URL": pacs.url, "XRAYFM_ORTHANC_PASSWORD": pacs.password,
        "XRAYFM_GATEWAY_URL": running.gateway_url, "XRAYFM_ROUTER_API_KEY": API_KEY,
        "XRAYFM_ROUTER_REDIS_URL": running.redis_url, "XRAYFM_ROUTER_POLL_S": "0.3",
        "XRAYFM_ROUTER_BACKFILL": "1",
    }  # fmt: skip
    try:
        running.stack.start_router(running.router_env)
    except BaseException:
        running.stack.stop_all()
        raise
    yield running
    running.stack.stop_all()


def with_patient(ds: pydicom.Dataset) -> pydicom.Dataset:
    """`ds` of the known patient, its pixels uncompressed (storescu cannot transcode)."""
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    return uncompressed(ds)


@pytest.fixture(scope="module")
def chest_study(shared_data, tmp_path_factory) -> list[Path]:
    """Three Kermany chest X-rays (img2dcm) as one DX chest series, and a copy of the RG3 tibia as a second
    series of the same study, all of one known patient."""
    jpegs = [*kermany_images(shared_data, "PNEUMONIA")[:2], kermany_images(shared_data, "NORMAL")[0]]
    return make_study(tmp_path_factory.mktemp("chest-study"), jpegs, tibia=shared_data / TIBIA,
                      patient=(PATIENT_NAME, PATIENT_ID))  # fmt: skip


@pytest.fixture(scope="module")
def rg1_study(shared_data, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("rg1")
    paths = []
    for kind in ("UNCR", "J2KI"):
        ds = with_patient(pydicom.dcmread(shared_data / "dicom-radiographs" / f"RG1_{kind}.dcm"))
        ds.save_as(folder / f"rg1-{kind}.dcm")
        paths.append(folder / f"rg1-{kind}.dcm")
    return paths


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"no {what} within {timeout} s")


def audit_records(stack: RunningStack) -> list[dict]:
    return [json.loads(line) for line in Path(stack.env["XRAYFM_AUDIT_LOG"]).read_text().splitlines()]


def dciodvfy_errors(data: bytes, path: Path) -> list[str]:
    path.write_bytes(data)
    errors, warnings = dciodvfy(path)
    print(f"dciodvfy {path.name}:", *errors, *warnings, sep="\n  ")
    return errors


def study_probability(data: bytes) -> float:
    """The study's probability in an SR, as highdicom reads it back."""
    report = hd.sr.srread(io.BytesIO(data))
    [group] = [g for g in report.content.get_image_measurement_groups() if g.tracking_identifier == "study"]
    [measurement] = group.get_measurements(name=codes.DCM.Probability)
    return measurement.value


def redis_value(db: redis.Redis, key: bytes) -> str:
    """A key's value, whatever its type, as text to search."""
    readers = {
        b"string": db.get, b"hash": db.hgetall, b"set": db.smembers,
        b"list": lambda k: db.lrange(k, 0, -1), b"zset": lambda k: db.zrange(k, 0, -1),
    }  # fmt: skip
    return repr(readers.get(db.type(key), lambda k: b"")(key))


# -- the tests -----------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_a_pushed_study_is_answered_into_the_same_study(pacs, stack, chest_study, tmp_path):
    pacs.push(chest_study)
    study_uid = str(pydicom.dcmread(chest_study[0], stop_before_pixels=True).StudyInstanceUID)
    found = wait_for(lambda: (r := pacs.results(study_uid)).get("SR") and len(r.get("SC", [])) == 3 and r,
                     120, "SR and three captures in Orthanc")  # fmt: skip
    [sr_id] = found["SR"]
    qido = pacs.http.get(f"/dicom-web/studies/{study_uid}/series", params={"Modality": "SR"}).json()
    assert len(qido) == 1  # the README's command finds it
    sr = pydicom.dcmread(io.BytesIO(pacs.file(sr_id)))
    assert sr.StudyInstanceUID == study_uid and sr.PatientID == PATIENT_ID
    assert not dciodvfy_errors(pacs.file(sr_id), tmp_path / "sr.dcm")
    chests = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in chest_study[:3]}
    sources = set()
    for k, sc_id in enumerate(found["SC"]):
        sc = pydicom.dcmread(io.BytesIO(pacs.file(sc_id)))
        assert sc.StudyInstanceUID == study_uid and sc.Modality and sc.BurnedInAnnotation == "NO"
        sources.add(str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID))
        assert not dciodvfy_errors(pacs.file(sc_id), tmp_path / f"sc{k}.dcm")
    assert sources == chests  # one heatmap per chest image, none for the tibia

    # The JSON answer (the job the audit record names) has the probability the SR holds.
    records = audit_records(stack)
    [done] = [r for r in records if r["action"] == "study_result"]
    assert (
        done["outcome"] == "ok"
        and done["detail"]["sr"] == sr.SOPInstanceUID
        and done["detail"]["images"] == 3
    )
    with stack.client(headers={"X-API-Key": API_KEY}) as client:
        answer = client.get(f"/jobs/{done['target'].removeprefix('job:')}").json()["result"]
    label = answer["model"]["labels"][0]
    assert study_probability(pacs.file(sr_id)) == pytest.approx(answer["probabilities"][label], abs=1e-6)
    assert done["model"]["version"] == answer["model"]["version"]

    # The tibia series: skipped, with the gate's verdict.
    [skipped] = [r for r in records if r["action"] == "series_skipped"]
    assert skipped["reason"] == "out_of_domain" and skipped["detail"]["instances"] == 1
    assert skipped["detail"]["domain"]["in_domain"] is False and skipped["detail"]["domain"]["reasons"]

    # The Studies page's list (GET /studies): the study by its Orthanc id, the answer, the tibia skipped.
    study_id = pacs.study_id(study_uid)
    with stack.client(headers={"X-API-Key": API_KEY}) as client:
        [entry] = wait_for(lambda: [s for s in client.get("/studies").json()["studies"] if s["study"] == study_id],
                           30, "the study in GET /studies")  # fmt: skip
    assert entry["outcome"] == "answered" and entry["job_id"] == done["target"].removeprefix("job:")
    assert entry["prediction"] == answer["prediction"]
    assert entry["probability"] == pytest.approx(answer["probability"], abs=1e-9)
    assert entry["sr_written"] is True and entry["captures"] == 3 and entry["error"] is None
    chest_series, tibia_series = sorted(entry["series"], key=lambda s: not s["answered"])
    assert chest_series["answered"] and chest_series["instances"] == 3 and chest_series["reason"] is None
    assert not tibia_series["answered"] and tibia_series["reason"] == "out_of_domain"
    assert tibia_series["gate"] == skipped["detail"]["domain"]["reasons"]
    assert tibia_series["series"] == skipped["detail"]["series"]


def test_a_second_push_makes_no_duplicate(pacs, stack, chest_study):
    study_uid = str(pydicom.dcmread(chest_study[0], stop_before_pixels=True).StudyInstanceUID)
    before = wait_for(
        lambda: pacs.results(study_uid).get("SR") and pacs.results(study_uid), 120, "the results"
    )
    pacs.push(chest_study)
    time.sleep(3)  # the study's stable age, and the router's poll
    after = pacs.results(study_uid)
    assert after == before and len(after["SR"]) == 1 and len(after["SC"]) == 3
    router_log = (stack.stack.home / "logs" / "router.log").read_text()
    assert router_log.count("answered by job") == 1

    # The same objects stored again (STOW-RS into Orthanc): Orthanc keeps one instance per SOP Instance UID.
    client = DICOMwebClient(f"{pacs.url}/dicom-web", session=requests.Session())
    client._session.auth = ("xrayfm", pacs.password)
    again = [pydicom.dcmread(io.BytesIO(pacs.file(i))) for i in [*before["SR"], *before["SC"]]]
    client.store_instances(again)
    assert pacs.results(study_uid) == before


def test_the_router_goes_on_where_it_stopped(pacs, stack):
    """Its place in the feed is in Redis: a new router starts there and answers nothing again."""
    db = redis.Redis.from_url(stack.redis_url)
    since = int(db.get("xrayfm:router:since"))
    assert since >= int(pacs.http.get("/changes", params={"last": ""}).json()["Last"]) - 1
    [router] = [p for p in stack.stack.procs if p.name == "router"]
    peak = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{router.pid}/status").read_text())
    print(f"router peak RSS after the studies: {int(peak[1]) / 1024:.0f} MB")  # compose limit: 1 GB
    stack.stack.stop(router)
    stack.stack.procs.remove(router)
    stack.stack.start_router(stack.router_env)
    log = stack.stack.home / "logs" / "router.log"
    wait_for(lambda: log.read_text().count("following") == 2, 30, "the new router")
    time.sleep(1.5)
    assert int(db.get("xrayfm:router:since")) >= since and log.read_text().count("answered by job") == 1


def test_stow_rs_on_the_gateway(stack, chest_study):
    """dicomweb-client as the STOW-RS client: the chest series answered, the tibia failed (0xC000); a study
    of the tibia alone is answered 409 with the tibia in Failed SOP Sequence."""
    client = DICOMwebClient(f"{stack.gateway_url}/dicomweb", headers={"X-API-Key": API_KEY})
    datasets = [pydicom.dcmread(p) for p in chest_study]
    response = client.store_instances(datasets)
    referenced = [str(i.ReferencedSOPInstanceUID) for i in response.ReferencedSOPSequence]
    assert referenced == [str(d.SOPInstanceUID) for d in datasets[:3]]
    [failed] = response.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == datasets[3].SOPInstanceUID and failed.FailureReason == 0xC000
    with stack.client(headers={"X-API-Key": API_KEY}) as http:  # the refusing job: the gate's verdict
        refusal = http.get(urlparse(str(failed.RetrieveURL)).path).json()
    assert refusal["status"] == "failed" and refusal["error"].startswith("out_of_domain")
    assert refusal["domain"]["in_domain"] is False and refusal["domain"]["reasons"]
    job_url = str(response.RetrieveURL)
    assert all(str(i.RetrieveURL) == job_url for i in response.ReferencedSOPSequence)
    with httpx.Client(headers={"X-API-Key": API_KEY}) as http:
        job = http.get(job_url).json()
        assert job["status"] == "done" and len(job["result"]["images"]) == 3
        assert all(image["attention_map"] for image in job["result"]["images"])

    # Two chest series and a report: the series answered together (one job, three images), the report not.
    two_series = [pydicom.dcmread(p) for p in chest_study[:3]]
    two_series[2].SeriesInstanceUID = generate_uid()
    report = pydicom.dcmread(chest_study[0])
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):  # fmt: skip
        delattr(report, keyword)
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = pydicom.uid.BasicTextSRStorage
    report.SeriesInstanceUID, report.Modality = generate_uid(), "SR"
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    response = client.store_instances([*two_series, report])
    assert [str(i.ReferencedSOPInstanceUID) for i in response.ReferencedSOPSequence] == [
        str(d.SOPInstanceUID) for d in two_series
    ]
    assert [int(i.FailureReason) for i in response.FailedSOPSequence] == [0x0122]
    # dicomweb-client sends a small request's Host header without the port, so ask by the URL's path
    with stack.client(headers={"X-API-Key": API_KEY}) as http:
        job_path = urlparse(str(response.RetrieveURL)).path
        job = http.get(job_path).json()
        assert len(job["result"]["images"]) == 3
        fhir = http.get(f"{job_path}/fhir")
        assert fhir.status_code == 200 and fhir.headers["content-type"].startswith("application/fhir+json")
        check_fhir(fhir.json(), job["result"], str(two_series[0].StudyInstanceUID))
        png_job = http.post("/jobs", files={"file": ("x.jpg", jpeg_bytes(phantom(64, 64)))}).json()["job_id"]
        assert http.get(f"/jobs/{png_job}/fhir").json()["error"] == "not_dicom"
    skipped = [r for r in audit_records(stack) if r["action"] == "series_skipped"]
    assert skipped[-1]["reason"] == "not_an_image" and skipped[-1]["target"] is None

    with pytest.raises(requests.HTTPError) as refused:
        client.store_instances(datasets[3:], study_instance_uid=str(datasets[3].StudyInstanceUID))
    assert refused.value.response.status_code == 409
    body = refused.value.response.json()
    for text in (response.to_json(), refused.value.response.text):  # the answers name instances by UID only
        assert PATIENT_ID not in text and "QUIRINIUS" not in text
    assert body["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000] and "00081199" not in body

    with httpx.Client(base_url=stack.gateway_url, headers={"X-API-Key": API_KEY}) as http:
        related = 'multipart/related; type="application/dicom"; boundary=b0'
        not_dicom = b"--b0\r\nContent-Type: application/dicom\r\n\r\nnot dicom\r\n--b0--\r\n"
        for content_type, body, status, code in [
            ("multipart/form-data; boundary=b0", not_dicom, 415, "unsupported_media_type"),
            ('multipart/related; type="image/png"; boundary=b0', not_dicom, 415, "unsupported_media_type"),
            (related, not_dicom, 400, "bad_dicom"),
            (related, b"--b0--\r\n", 422, "missing_file"),
        ]:
            answer = http.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type})
            assert (answer.status_code, answer.json()["error"]) == (status, code)

    unauthorised = DICOMwebClient(f"{stack.gateway_url}/dicomweb")
    with pytest.raises(requests.HTTPError) as no_key:
        unauthorised.store_instances(datasets[:1])
    assert no_key.value.response.status_code == 401


def check_fhir(bundle: dict, answer: dict, study_uid: str) -> None:
    """The FHIR Bundle validates (fhir.resources R4B), reports on the study by its UID, and its probability
    is the JSON answer's."""
    from fhir.resources.R4B.bundle import Bundle

    Bundle.model_validate(bundle)
    resources = {
        e["resource"]["resourceType"]: e["resource"]
        for e in bundle["entry"]
        if "valueQuantity" not in e["resource"]
    }
    report = resources["DiagnosticReport"]
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study_uid}"
    assert "subject" not in report  # the gateway keeps no patient data
    [probability] = [e["resource"] for e in bundle["entry"] if "valueQuantity" in e["resource"]]
    label = answer["model"]["labels"][0]
    assert probability["valueQuantity"]["value"] == pytest.approx(answer["probabilities"][label], abs=1e-9)


def test_rg1_goes_through_the_whole_path(pacs, stack, rg1_study):
    """The real RG1 CR chest (an adult film, two instances): answered into the study, or skipped with the
    gate's verdict; either way the router is done with it."""
    pacs.push(rg1_study)
    study_uid = str(pydicom.dcmread(rg1_study[0], stop_before_pixels=True).StudyInstanceUID)
    sr_uids = {r["detail"]["sr"] for r in audit_records(stack) if r["action"] == "study_result"}

    def done():
        records = audit_records(stack)
        results = [r for r in records if r["action"] == "study_result" and r["detail"]["sr"] not in sr_uids]
        skips = [r for r in records if r["action"] == "series_skipped" and r["detail"]["instances"] == 2]
        return results or skips

    [record] = wait_for(done, 120, "an answer or a skip for RG1")
    if record["action"] == "study_result":
        assert wait_for(lambda: pacs.results(study_uid).get("SR"), 30, "the SR of RG1")


def test_no_patient_data_in_logs_redis_metrics_or_audit(pacs, stack, chest_study, rg1_study):
    """After the tests above sent both studies through every path: the name and the ID are nowhere."""
    secrets_ = [PATIENT_ID, *[part for part in PATIENT_NAME.split("^")]]
    texts = {str(p): p.read_text(errors="replace") for p in (stack.stack.home / "logs").glob("*.log")}
    texts |= {str(p): p.read_text(errors="replace") for p in pacs.logs.glob("*.log")}
    texts["audit"] = Path(stack.env["XRAYFM_AUDIT_LOG"]).read_text()
    with stack.client(headers={"X-API-Key": API_KEY}) as client:
        texts["metrics"] = client.get("/metrics").text
    db = redis.Redis.from_url(stack.redis_url)
    for key in db.scan_iter(count=1000):
        texts[f"redis {key!r}"] = repr(key) + redis_value(db, key)
    assert any("router" in name for name in texts) and len(texts) > 5
    leaks = [(name, s) for name, text in texts.items() for s in secrets_ if s.lower() in text.lower()]
    assert not leaks, leaks
