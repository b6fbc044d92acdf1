"""The "Studies" page: what the PACS router did with the latest studies (the gateway's ``GET /studies``): when,
the answer with its probability, the gate's result (series answered, series skipped and why), whether the SR
and heatmaps were written, or what failed. With ``XRAYFM_PACS_VIEWER_URL`` set each study links to its page
in Orthanc Explorer (``{viewer}/app/explorer.html#study?uuid={orthanc id}``); other viewers' study pages
(OHIF) take a DICOM UID, which the stack does not keep, so they get no link."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import streamlit as st

from xrayfm import RESEARCH_USE
from xrayfm_frontend.client import GatewayClient, GatewayError
from xrayfm_stack.protocol import StudyRecord

LIMIT = 50  # studies shown
ORTHANC_ID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}")  # Orthanc's ids: a SHA-1 in five groups
COLUMNS = ["time (UTC)", "study", "outcome", "answer", "gate", "SR written", "model"]


def viewer_link(viewer_url: str | None, study: str) -> str | None:
    """Orthanc Explorer's page of `study` (an Orthanc id), or None without a viewer or with an odd id."""
    if not viewer_url or not ORTHANC_ID.fullmatch(study):
        return None
    return f"{viewer_url}/app/explorer.html#study?uuid={study}"


def answer_text(record: StudyRecord) -> str:
    """The decision and its probability; "none" without one."""
    if record.prediction is None:
        return "none"
    probability = f" ({record.probability:.3f})" if record.probability is not None else ""
    return f"{record.prediction}{probability}"


def gate_text(record: StudyRecord) -> str:
    """The series answered, and each series skipped with its reason and the gate's reason codes."""
    answered = [s for s in record.series if s.answered]
    parts = (
        [f"answered {len(answered)} series ({sum(s.instances for s in answered)} images)"] if answered else []
    )
    for series in record.series:
        if not series.answered:
            gate = f" ({', '.join(series.gate)})" if series.gate else ""
            parts.append(f"skipped {series.instances} image(s): {series.reason or 'unknown'}{gate}")
    return "; ".join(parts) or "none"


def sr_text(record: StudyRecord) -> str:
    """Whether the SR was written, and how many heatmap captures."""
    return f"yes, {record.captures} heatmap(s)" if record.sr_written else "no"


def study_rows(records: list[StudyRecord], viewer_url: str | None) -> list[dict[str, str]]:
    """One row of text per study, newest first; the study as a link when a viewer is configured."""
    rows = []
    for record in records:
        link = viewer_link(viewer_url, record.study)
        rows.append({
            "time (UTC)": datetime.fromtimestamp(record.time, UTC).strftime("%Y-%m-%d %H:%M:%S"),
            "study": f"[{record.study[:17]}]({link})" if link else record.study[:17],
            "outcome": f"{record.outcome}: {record.error}" if record.error else record.outcome,
            "answer": answer_text(record),
            "gate": gate_text(record),
            "SR written": sr_text(record),
            "model": record.model or "",
        })  # fmt: skip
    return rows


def markdown_table(rows: list[dict[str, str]]) -> str:
    """`rows` as a Markdown table (its links clickable, unlike a dataframe's cells)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def render(client: GatewayClient) -> None:
    """Draw the page."""
    st.title("xrayfm: studies from the PACS")
    st.warning(RESEARCH_USE)
    if st.button("Refresh"):
        st.rerun()
    viewer = client.settings.pacs_viewer_url
    st.caption(
        f"The latest {LIMIT} studies the PACS router handled, newest first. "
        + (
            f"Each study links to {viewer}."
            if viewer
            else "Set XRAYFM_PACS_VIEWER_URL to link to the viewer."
        )
    )
    try:
        records = client.studies(LIMIT)
    except GatewayError as exc:
        st.error(f"Cannot list the studies: {exc}")
        return
    if not records:
        st.info("No study from the PACS yet.")
        return
    st.markdown(markdown_table(study_rows(records, viewer)))
