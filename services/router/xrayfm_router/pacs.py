"""Orthanc, as the router uses it: its changes feed and a study's instances (REST API, httpx) and storing
results (STOW-RS, dicomweb-client). Nothing here logs or returns patient data beyond the DICOM bytes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from pydicom.dataset import Dataset

from xrayfm.hospital.result import MANUFACTURER
from xrayfm_stack.settings import RouterSettings


class Orthanc:
    """One Orthanc server: `settings.orthanc_url`, with its user and password (HTTP basic)."""

    def __init__(self, settings: RouterSettings) -> None:
        auth = (settings.orthanc_user, settings.orthanc_password or "")
        self.http = httpx.Client(base_url=settings.orthanc_url, auth=auth, timeout=settings.timeout_s)
        session = create_session_from_user_pass(*auth)
        self.dicomweb = DICOMwebClient(f"{settings.orthanc_url}/dicom-web", session=session)
        self.dicomweb.set_http_retry_params(retry=False)
        self.timeout_s = settings.timeout_s

    def get(self, path: str, **params: Any) -> Any:
        """GET `path` of the REST API as JSON (httpx.HTTPError when Orthanc fails)."""
        response = self.http.get(path, params=params)
        response.raise_for_status()
        return response.json()

    def changes(self, since: int, limit: int = 100) -> dict[str, Any]:
        """The changes after `since`: ``{"Changes": [{"ChangeType", "ID", "Seq", ...}], "Done", "Last"}``."""
        return self.get("/changes", since=since, limit=limit)

    def last_change(self) -> int:
        """The sequence number of the latest change (where a router that starts now begins)."""
        return int(self.get("/changes", last="")["Last"])

    def source_instances(self, study_id: str) -> list[str]:
        """The Orthanc ids of a study's instances, but those of series the stack made (its results)."""
        found = []
        for series_id in self.get(f"/studies/{study_id}")["Series"]:
            series = self.get(f"/series/{series_id}")
            if series.get("MainDicomTags", {}).get("Manufacturer") != MANUFACTURER:
                found += series["Instances"]
        return sorted(found)

    def instance_file(self, instance_id: str) -> bytes:
        """An instance's DICOM file as stored."""
        response = self.http.get(f"/instances/{instance_id}/file")
        response.raise_for_status()
        return response.content

    def store(self, datasets: Sequence[Dataset]) -> Dataset:
        """STOW-RS the datasets into Orthanc (its DICOMweb plugin); the STOW-RS response."""
        return self.dicomweb.store_instances(list(datasets))

    def close(self) -> None:
        self.http.close()
