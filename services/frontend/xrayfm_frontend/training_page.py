"""The "Training & models" page: submit a job (JSON spec, from an example if you like), watch the jobs (the
section refreshes itself while one is active), read a job's details (metrics, error, log), cancel it, list
the model versions (metrics, evaluations, lineage, synthetic flag), promote one or roll back. Every call needs
the admin key (XRAYFM_FRONTEND_ADMIN_KEY) when the gateway's auth is on; its refusals are shown as they are."""

from __future__ import annotations

import json
from typing import Any

import streamlit as st

from xrayfm_frontend.client import GatewayClient, GatewayError
from xrayfm_stack.protocol import JobRecord, ModelList, ModelVersion

COMPETITION_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
EXAMPLES: dict[str, dict[str, Any]] = {
    "Pre-train on CheXpert (uncertain = positive)": {
        "kind": "pretrain",
        "name": "chest-fm",
        "config": {
            "kind": "chexpert",
            "root": "/data/CheXpert-v1.0-small",
            "val_split": "valid",
            "policy": "u-ones",
            "labels": COMPETITION_LABELS,
            "frontal_only": True,
            "model": "vit_small_patch16_224",
            "size": 224,
            "epochs": 5,
            "save_every": 1000,
            "progress_bar": False,
        },
    },
    "LoRA on MURA from a stored foundation": {
        "kind": "adapt",
        "name": "bone-lora",
        "config": {
            "kind": "mura",
            "root": "/data/MURA-v1.1",
            "foundation": "store:chest-fm/1",
            "method": "lora",
            "label_fraction": 0.1,
            "epochs": 5,
            "progress_bar": False,
        },
    },
    "Evaluate a stored version": {
        "kind": "evaluate",
        "name": "bone-lora",
        "config": {"model": "store:bone-lora/1", "kind": "mura", "root": "/data/MURA-v1.1", "split": "valid"},
    },
    "Calibrate a stored version to a site": {
        "kind": "calibrate",
        "name": "bone-lora",
        "config": {"model": "store:bone-lora/1", "data": ["folder:/data/site-sample"], "method": "auto"},
    },
}
ACTIVE = ("queued", "running", "cancelling")
LOG_TAIL = 200  # log lines shown in a job's details
FLASH = "training_flash"
SPEC, EXAMPLE, DETAILS = "training_spec", "training_example", "training_details"
REFRESH = "training_refresh_s"  # the jobs section's timer as the last look at the jobs decided it


def refresh_every(jobs: list[JobRecord], refresh_s: float) -> float | None:
    """Seconds between the jobs section's automatic re-runs: `refresh_s` while a job is active, else None
    (no polling); 0 turns it off."""
    if refresh_s > 0 and any(job.status in ACTIVE for job in jobs):
        return refresh_s
    return None


def _flash(kind: str, message: str) -> None:
    """Keep a message for the next run (an action re-runs the page so the tables show its effect)."""
    st.session_state[FLASH] = (kind, message)
    st.rerun()


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "n/a" if value is None else str(value)


def _fraction(job: JobRecord) -> float | None:
    progress = job.progress or {}
    total = progress.get("total_steps")
    if not total:
        return None
    return min(max(float(progress.get("step", 0)) / float(total), 0.0), 1.0)


def _progress_text(job: JobRecord) -> str:
    p = job.progress or {}
    parts = [f"{job.name} ({job.job_id[:8]}), {job.status}"]
    if p.get("total_steps"):
        parts.append(f"step {p.get('step', 0)}/{p['total_steps']}, epoch {p.get('epoch', 0)}")
    if p.get("loss") is not None:
        parts.append(f"loss {float(p['loss']):.4f}")
    if p.get("eta_s") is not None:
        parts.append(f"ETA {float(p['eta_s']) / 60:.1f} min")
    return ", ".join(parts)


def _headline(job: JobRecord) -> tuple[str, Any] | None:
    """(metric name, value) of a finished job: its best validation metric, or an evaluate job's value."""
    result = job.result or {}
    value = result.get("value") if job.kind in ("evaluate", "calibrate") else result.get("best_metric")
    if value is None:
        return None
    return str(result.get("metric") or "metric"), value


def _synthetic_jobs(models: list[ModelVersion]) -> set[str]:
    """Ids of the jobs whose product is marked synthetic: a version trained on synthetic data, or an
    evaluation on synthetic data."""
    found = {m.job_id for m in models if m.synthetic and m.job_id}
    for m in models:
        found |= {e["job_id"] for e in m.evaluations if e.get("synthetic") and e.get("job_id")}
    return found


def _job_rows(jobs: list[JobRecord], synthetic: set[str]) -> list[dict[str, Any]]:
    rows = []
    for job in jobs:
        p = job.progress or {}
        headline = _headline(job)
        rows.append({
            "job": job.job_id, "name": job.name, "kind": job.kind, "status": job.status,
            "step": f"{p.get('step', 0)}/{p['total_steps']}" if p.get("total_steps") else "",
            "metric": f"{headline[0]}={_number(headline[1])}" if headline else "",
            "attempts": job.attempts,
            "synthetic": "SYNTHETIC" if job.job_id in synthetic else "",
            "metrics": json.dumps(p.get("metrics")) if p.get("metrics") else "",
            "model": f"{job.model.name}/{job.model.version}" if job.model else "",
            "error": job.error or "",
        })  # fmt: skip
    return rows


def _lineage(row: ModelVersion) -> str:
    """The version's foundation: a store version as name/version, a stored foundation by its name (when it
    has one) and the start of its folder's sha256; '' for a model without one."""
    foundation = row.lineage.get("foundation")
    if not isinstance(foundation, dict):
        return ""
    if foundation.get("form") == "blob":
        digest = str(foundation.get("folder_sha256") or "")[:12]
        return f"{foundation.get('name') or 'foundation'} (sha256 {digest})"
    if foundation.get("name"):
        return f"{foundation['name']}/{foundation.get('version', '?')}"
    return ""


def _latest_evaluation(row: ModelVersion) -> str:
    """'metric=value on dataset/split' of the version's latest evaluation; '' when it has none."""
    evaluations = row.evaluations
    if not evaluations:
        return ""
    e = max(evaluations, key=lambda e: e.get("created") or 0)
    text = f"{e.get('metric')}={_number(e.get('value'))} on {e.get('dataset')}/{e.get('split')}"
    return text + (" (SYNTHETIC)" if e.get("synthetic") else "")


def _model_rows(models: list[ModelVersion]) -> list[dict[str, Any]]:
    return [
        {
            "model": f"{m.name}/{m.version}",
            "serving": m.serving,
            "kind": m.kind or m.format,
            "method": m.method or "",
            "synthetic": "SYNTHETIC" if m.synthetic else "",
            "metrics": json.dumps(m.metrics) if m.metrics else "",
            "evaluation": _latest_evaluation(m),
            "threshold": _threshold_text(m.operating_point),
            "domain gate": _gate_text(m.domain_gate),
            "calibration": (m.calibration or {}).get("method") or "",
            "foundation": _lineage(m),
            "job": m.job_id or "",
        }  # fmt: skip
        for m in models
    ]


def _gate_text(gate: dict[str, Any] | None) -> str:
    """The version's domain gate in a cell: its measured pass rate on in-domain images it was not set on."""
    if not gate:
        return "none (input checks only)"
    rate = gate.get("validation_pass_rate")
    return (
        f"{gate.get('method')}, passes {rate:.1%} of validation"
        if rate is not None
        else str(gate.get("method"))
    )


def _threshold_text(point: dict[str, Any] | None) -> str:
    if not point:
        return "0.5 (not calibrated)"
    if "error" in point:
        return f"unreadable: {point['error']}"
    return f"{point['threshold']:.3f} ({point['source']})"


def candidate_points(model: ModelVersion) -> dict[str, dict[str, Any]]:
    """The operating points the version's evaluations offer, by a readable name -> the PUT body."""
    found = {}
    for e in model.evaluations:
        for label, levels in (e.get("operating_points") or {}).items():
            for level, options in levels.items():
                for o in options:
                    text = (f"{o['rule']} ({level}, {label}): threshold {o['threshold']:.3f}, sensitivity "
                            f"{_number(o.get('sensitivity'))}, specificity {_number(o.get('specificity'))} "
                            f"on {e.get('dataset')}/{e.get('split')} [{e['job_id'][:8]}]")  # fmt: skip
                    found[text] = {"job_id": e["job_id"], "rule": o["rule"], "level": level, "label": label}
    return found


def _operating_point_form(client: GatewayClient, models: list[ModelVersion]) -> None:
    """Choose a version's decision threshold: a candidate of one of its evaluations, or typed in."""
    with st.expander("Operating point (decision threshold) of a version"):
        names = [f"{m.name}/{m.version}" for m in models]
        chosen = st.selectbox("Version", names, key="op_version")
        model = models[names.index(chosen)]
        st.caption(f"Now: {_threshold_text(model.operating_point)}")
        candidates = candidate_points(model)
        if candidates:
            pick = st.selectbox("From an evaluation of this version", list(candidates), key="op_candidate")
            if st.button("Use this point"):
                _set_point(client, chosen, candidates[pick])
        else:
            st.caption("No evaluation of this version offers candidates yet: run an evaluate job on it.")
        threshold = st.number_input("Or a threshold", 0.0, 1.0, 0.5, 0.01, format="%.3f", key="op_threshold")
        source = st.text_input(
            "Where it comes from", key="op_source", placeholder="e.g. agreed with the clinic"
        )
        left, right = st.columns(2)
        if left.button("Set this threshold"):
            _set_point(client, chosen, {"threshold": threshold, "source": source})
        if right.button("Back to 0.5 (not calibrated)"):
            _set_point(client, chosen, None)


def _set_point(client: GatewayClient, chosen: str, point: dict[str, Any] | None) -> None:
    name, version = chosen.rsplit("/", 1)
    try:
        saved = client.set_operating_point(name, version, point).operating_point
        _flash("success", f"{chosen}: threshold {_threshold_text(saved)}")
    except GatewayError as exc:
        _flash("error", f"Cannot set the operating point of {chosen}: {exc}")


def _metric_rows(metrics: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """Metrics as table rows (nested dicts flattened to 'a/b'); lists and text left out."""
    rows: list[dict[str, Any]] = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            rows += _metric_rows(value, f"{prefix}{key}/")
        elif value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            rows.append({"metric": f"{prefix}{key}", "value": value})
    return rows


def _use_example() -> None:
    """Fill the spec box with the chosen example (runs before the page, so the box shows it)."""
    st.session_state[SPEC] = json.dumps(EXAMPLES[st.session_state[EXAMPLE]], indent=2)


def _submit_form(client: GatewayClient) -> None:
    st.subheader("Submit a training job")
    if SPEC not in st.session_state:
        st.session_state[SPEC] = json.dumps(next(iter(EXAMPLES.values())), indent=2)
    st.selectbox("Start from an example", list(EXAMPLES), key=EXAMPLE, on_change=_use_example)
    with st.form("submit_job"):
        spec = st.text_area("Job spec (JSON)", key=SPEC, height=300)
        if st.form_submit_button("Submit job"):
            try:
                answer = client.submit_job(spec)
            except GatewayError as exc:
                st.session_state[FLASH] = ("error", f"Job refused: {exc}")
            else:
                st.session_state[FLASH] = ("success", f"Job {answer.job_id} queued")
            st.rerun()


def _job_details(client: GatewayClient, jobs: list[JobRecord], synthetic: set[str]) -> None:
    """The chosen job: status, attempts, error, metrics, model, spec and the last lines of its log."""
    # no status in the labels: options that change under a refresh would make Streamlit reset the choice
    labels = {j.job_id: f"{j.name} ({j.job_id[:8]}), {j.kind}" for j in jobs}
    chosen = st.selectbox(
        "Job details", list(labels), format_func=lambda job_id: labels.get(job_id, job_id), key=DETAILS
    )
    try:
        job = client.get_job(chosen)
        lines = client.job_log(chosen, LOG_TAIL)
    except GatewayError as exc:
        st.error(f"Cannot read job {chosen}: {exc}")
        return
    status = job.status
    st.markdown(f"**{job.name}** ({job.kind}): **{status}**")
    attempts, resumed, requeued = st.columns(3)
    attempts.metric("Attempts", job.attempts)
    resumed.metric("Resumed from a checkpoint", "yes" if job.resumed else "no")
    requeued.metric("Re-queued (worker lost)", job.requeued or 0)
    if chosen in synthetic:
        st.warning("Built from SYNTHETIC data (phantoms, not medical images).")
    if job.error:
        st.error(f"Job failed: {job.error}")
    result = job.result or {}
    headline = _headline(job)
    if headline:
        st.metric(
            f"Best {headline[0]}" if job.kind not in ("evaluate", "calibrate") else headline[0],
            _number(headline[1]),
        )
    metrics = result.get("metrics") if status == "done" else (job.progress or {}).get("metrics")
    rows = _metric_rows(metrics) if isinstance(metrics, dict) else []
    if rows:
        st.caption("Metrics of the published model" if status == "done" else "Last validation metrics")
        st.dataframe(rows, hide_index=True)
    if job.model:
        what = "Evaluated" if job.kind == "evaluate" else "Published"
        st.caption(f"{what} model: {job.model.name}/{job.model.version}")
    if isinstance(result.get("report"), dict):
        with st.expander("Report"):
            st.json(result["report"], expanded=False)
    if job.spec:
        with st.expander("Spec"):
            st.json(job.spec.model_dump(mode="json"), expanded=False)
    st.caption(f"Log (its last {LOG_TAIL} lines at most)" if lines else "Log: no lines yet")
    if lines:
        st.code("\n".join(lines), language=None)


def _jobs_section(client: GatewayClient, jobs: list[JobRecord], synthetic: set[str]) -> None:
    if not jobs:
        st.info("No training jobs yet.")
        return
    for job in jobs:
        if job.status in ACTIVE:
            st.progress(_fraction(job) or 0.0, text=_progress_text(job))
    st.dataframe(_job_rows(jobs, synthetic), hide_index=True)
    active = [j.job_id for j in jobs if j.status in ACTIVE]
    if active:
        left, right = st.columns([3, 1])
        chosen = left.selectbox("Job to cancel", active)
        if right.button("Cancel job"):
            try:
                _flash("success", f"Job {chosen}: {client.cancel_job(chosen)}")
            except GatewayError as exc:
                _flash("error", f"Cannot cancel {chosen}: {exc}")
    _job_details(client, jobs, synthetic)


def _models_section(client: GatewayClient, answer: ModelList) -> None:
    serving = answer.serving
    st.caption(f"Serving: {serving.name}/{serving.version}" if serving else "Serving: nothing promoted")
    models = answer.models
    if not models:
        st.info("No model in the store yet.")
        return
    st.dataframe(_model_rows(models), hide_index=True)
    left, mid, right = st.columns([3, 1, 1])
    chosen = left.selectbox("Version to promote", [f"{m.name}/{m.version}" for m in models])
    if mid.button("Promote"):
        name, version = chosen.rsplit("/", 1)
        try:
            client.promote(name, version)
            _flash("success", f"Now serving {chosen}")
        except GatewayError as exc:
            _flash("error", f"Cannot promote {chosen}: {exc}")
    if right.button("Roll back"):
        try:
            back = client.rollback().serving
            _flash("success", f"Rolled back: now serving {back.name}/{back.version}")
        except GatewayError as exc:
            _flash("error", f"Cannot roll back: {exc}")
    _operating_point_form(client, models)


def _live(client: GatewayClient, interval: float | None) -> None:
    """Jobs and models; a fragment that re-runs itself every `interval` seconds (None: only on demand)."""
    st.subheader("Training jobs")
    if st.button("Refresh"):
        st.rerun()
    try:
        jobs, jobs_error = client.list_jobs(), None
    except GatewayError as exc:
        jobs, jobs_error = [], exc
    try:
        models, models_error = client.list_models(), None
    except GatewayError as exc:
        models, models_error = ModelList(serving=None, models=[]), exc
    wanted = refresh_every(jobs, client.settings.refresh_s)
    if wanted != interval:  # a job became active, or none is any more: register the timer anew
        st.session_state[REFRESH] = wanted
        st.rerun()
    if interval:
        st.caption(f"Refreshing every {interval:g} s while a job is active.")
    synthetic = _synthetic_jobs(models.models)
    if jobs_error is not None:
        st.error(f"Cannot list the jobs: {jobs_error}")
    else:
        _jobs_section(client, jobs, synthetic)
    st.subheader("Model versions")
    if models_error is not None:
        st.error(f"Cannot list the models: {models_error}")
    else:
        _models_section(client, models)


def render(client: GatewayClient) -> None:
    """Draw the page."""
    st.title("xrayfm: training & models")
    if FLASH in st.session_state:
        kind, message = st.session_state[FLASH]
        (st.error if kind == "error" else st.success)(message)
    _submit_form(client)
    interval = st.session_state.get(REFRESH)
    st.fragment(_live, run_every=interval)(client, interval)
    st.session_state.pop(FLASH, None)  # shown: dropped only now, as the fragment may re-run the page first
