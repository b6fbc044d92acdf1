"""The "Training & models" page: submit a training job (JSON spec), watch and cancel jobs, list the model
versions (metrics, lineage, synthetic flag), promote one or roll back. Every call needs the admin key
(XRAYFM_FRONTEND_ADMIN_KEY) when the gateway's auth is on; the gateway's refusals are shown as they are."""

from __future__ import annotations

import json
from typing import Any

import streamlit as st

from xrayfm_frontend.client import GatewayClient, GatewayError

EXAMPLE_SPEC = {
    "kind": "pretrain",
    "name": "chest-fm",
    "config": {
        "kind": "chexpert",
        "root": "/data/CheXpert-v1.0-small",
        "labels": ["Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"],
        "model": "vit_tiny_patch16_224",
        "size": 224,
        "epochs": 1,
    },
}
ACTIVE = ("queued", "running", "cancelling")
FLASH = "training_flash"


def _flash(kind: str, message: str) -> None:
    """Keep a message for the next run (an action re-runs the page so the tables show its effect)."""
    st.session_state[FLASH] = (kind, message)
    st.rerun()


def _fraction(job: dict[str, Any]) -> float | None:
    progress = job.get("progress") or {}
    total = progress.get("total_steps")
    if not total:
        return None
    return min(max(float(progress.get("step", 0)) / float(total), 0.0), 1.0)


def _progress_text(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    parts = [f"{job.get('name')} ({job['job_id'][:8]}), {job.get('status')}"]
    if p.get("total_steps"):
        parts.append(f"step {p.get('step', 0)}/{p['total_steps']}, epoch {p.get('epoch', 0)}")
    if p.get("loss") is not None:
        parts.append(f"loss {float(p['loss']):.4f}")
    if p.get("eta_s") is not None:
        parts.append(f"ETA {float(p['eta_s']) / 60:.1f} min")
    return ", ".join(parts)


def _job_rows(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for job in jobs:
        p = job.get("progress") or {}
        model = job.get("model") or {}
        rows.append({
            "job": job["job_id"], "name": job.get("name"), "kind": job.get("kind"),
            "status": job.get("status"),
            "step": f"{p.get('step', 0)}/{p['total_steps']}" if p.get("total_steps") else "",
            "metrics": json.dumps(p.get("metrics")) if p.get("metrics") else "",
            "model": f"{model['name']}/{model['version']}" if model else "",
            "error": job.get("error") or "",
        })  # fmt: skip
    return rows


def _lineage(row: dict[str, Any]) -> str:
    foundation = (row.get("lineage") or {}).get("foundation")
    if isinstance(foundation, dict) and foundation.get("name"):
        return f"{foundation['name']}/{foundation.get('version', '?')}"
    return ""


def _model_rows(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "model": f"{m['name']}/{m['version']}",
            "serving": bool(m.get("serving")),
            "kind": m.get("kind") or m.get("format"),
            "method": m.get("method") or "",
            "synthetic": "SYNTHETIC" if m.get("synthetic") else "",
            "metrics": json.dumps(m.get("metrics")) if m.get("metrics") else "",
            "foundation": _lineage(m),
            "job": m.get("job_id") or "",
        }  # fmt: skip
        for m in models
    ]


def _submit_form(client: GatewayClient) -> None:
    st.subheader("Submit a training job")
    with st.form("submit_job"):
        spec = st.text_area("Job spec (JSON)", value=json.dumps(EXAMPLE_SPEC, indent=2), height=260)
        if st.form_submit_button("Submit job"):
            try:
                answer = client.submit_job(spec)
            except GatewayError as exc:
                st.session_state[FLASH] = ("error", f"Job refused: {exc}")
            else:
                st.session_state[FLASH] = ("success", f"Job {answer.get('job_id')} queued")
            st.rerun()


def _jobs_section(client: GatewayClient) -> None:
    st.subheader("Training jobs")
    if st.button("Refresh"):
        st.rerun()
    try:
        jobs = client.list_jobs()
    except GatewayError as exc:
        st.error(f"Cannot list the jobs: {exc}")
        return
    if not jobs:
        st.info("No training jobs yet.")
        return
    for job in jobs:
        if job.get("status") in ACTIVE:
            st.progress(_fraction(job) or 0.0, text=_progress_text(job))
    st.dataframe(_job_rows(jobs), hide_index=True)
    active = [j["job_id"] for j in jobs if j.get("status") in ACTIVE]
    if active:
        left, right = st.columns([3, 1])
        chosen = left.selectbox("Job to cancel", active)
        if right.button("Cancel job"):
            try:
                _flash("success", f"Job {chosen}: {client.cancel_job(chosen)}")
            except GatewayError as exc:
                _flash("error", f"Cannot cancel {chosen}: {exc}")


def _models_section(client: GatewayClient) -> None:
    st.subheader("Model versions")
    try:
        answer = client.list_models()
    except GatewayError as exc:
        st.error(f"Cannot list the models: {exc}")
        return
    serving = answer.get("serving")
    st.caption(f"Serving: {serving['name']}/{serving['version']}" if serving else "Serving: nothing promoted")
    models = answer.get("models") or []
    if not models:
        st.info("No model in the store yet.")
        return
    st.dataframe(_model_rows(models), hide_index=True)
    left, mid, right = st.columns([3, 1, 1])
    chosen = left.selectbox("Version to promote", [f"{m['name']}/{m['version']}" for m in models])
    if mid.button("Promote"):
        name, version = chosen.rsplit("/", 1)
        try:
            client.promote(name, version)
            _flash("success", f"Now serving {chosen}")
        except GatewayError as exc:
            _flash("error", f"Cannot promote {chosen}: {exc}")
    if right.button("Roll back"):
        try:
            back = client.rollback()["serving"]
            _flash("success", f"Rolled back: now serving {back['name']}/{back['version']}")
        except GatewayError as exc:
            _flash("error", f"Cannot roll back: {exc}")


def render(client: GatewayClient) -> None:
    """Draw the page."""
    st.title("xrayfm: training & models")
    if FLASH in st.session_state:
        kind, message = st.session_state.pop(FLASH)
        (st.error if kind == "error" else st.success)(message)
    _submit_form(client)
    _jobs_section(client)
    _models_section(client)
