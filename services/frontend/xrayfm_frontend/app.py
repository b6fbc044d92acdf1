"""The xrayfm web UI (Streamlit): upload a radiograph (or the images of one study), see the prediction, the
probability, and the attention heatmap over each image (opacity slider) next to the original; more pages (sidebar) for
training jobs and model versions (xrayfm_frontend.training_page) and the studies the PACS router answered
(xrayfm_frontend.studies_page)."""

from __future__ import annotations

import hashlib

import streamlit as st

from xrayfm.errors import XrayfmError
from xrayfm.explain.overlay import heatmap_from_base64
from xrayfm_frontend import studies_page, training_page
from xrayfm_frontend.client import GatewayClient, GatewayError
from xrayfm_frontend.render import original_for_display, overlay
from xrayfm_stack.protocol import Prediction, StudyPrediction, WorkerAnswer
from xrayfm_stack.settings import FrontendSettings

PREDICTION, TRAINING, STUDIES = "Prediction", "Training & models", "Studies"
ONE_IMAGE, STUDY = "One image", "A study (several images)"


@st.cache_resource
def gateway_client(settings: FrontendSettings) -> GatewayClient:
    """One HTTP client (connection pool) per gateway, kept across the script's re-runs."""
    return GatewayClient(settings)


st.set_page_config(page_title="xrayfm", layout="wide")
settings = FrontendSettings.from_env()
client = gateway_client(settings)

ready, detail = client.ready()
with st.sidebar:
    page = st.radio("Page", [PREDICTION, TRAINING, STUDIES])
    st.caption(f"Gateway: {settings.gateway_url}")
    if ready:
        st.success(f"Stack ready: {detail}")
    else:
        st.warning(f"Stack not ready: {detail}")
if page == TRAINING:
    training_page.render(client)
    st.stop()
if page == STUDIES:
    studies_page.render(client)
    st.stop()

st.title("xrayfm: radiograph prediction")
with st.sidebar:
    explain = st.checkbox("Attention heatmap", value=True)
    opacity = st.slider("Heatmap opacity", min_value=0.0, max_value=1.0, value=0.45, step=0.05)
    study_mode = st.radio("Upload", [ONE_IMAGE, STUDY], key="upload_mode") == STUDY

TYPES = ["png", "jpg", "jpeg", "dcm", "dicom"]
if study_mode:
    files = st.file_uploader(
        "The images of one study (PNG, JPEG or DICOM)", type=TYPES, accept_multiple_files=True
    )
else:
    one = st.file_uploader("Radiograph (PNG, JPEG or DICOM)", type=TYPES)
    files = [one] if one is not None else []
if not files:
    st.info("Upload an X-ray image to get a prediction." if not study_mode else "Upload the study's images.")
    st.stop()

images = [(f.name, f.getvalue()) for f in files]
key = (study_mode, tuple(hashlib.sha256(data).hexdigest() for _, data in images), explain)
if st.session_state.get("answer_key") != key:  # the slider re-runs the script: do not predict again
    st.session_state.pop("answer", None)
    st.session_state.pop("answer_error", None)
    st.session_state.pop("answer_refused", None)
    if not ready:
        st.session_state["answer_error"] = f"The stack is not ready, try again shortly: {detail}"
    else:
        with st.spinner("Predicting..."):
            try:
                st.session_state["answer"] = (
                    client.predict_study(images, explain=explain)
                    if study_mode
                    else client.predict(images[0][1], images[0][0], explain=explain)
                )
            except GatewayError as exc:
                st.session_state["answer_error"] = str(exc)
                st.session_state["answer_refused"] = exc.code == "out_of_domain"
    st.session_state["answer_key"] = key

if "answer_error" in st.session_state:
    if st.session_state.get("answer_refused"):  # the model cannot judge it: no prediction, say why
        st.header("Outside this model's domain")
        st.error(st.session_state["answer_error"])
        st.caption("The model was not trained on images like this one, so it gives no prediction. "
                   "Send a radiograph of the kind its card describes, or use a model made for this kind.")  # fmt: skip
    else:
        st.error(st.session_state["answer_error"])
    st.stop()
answer: Prediction | StudyPrediction = st.session_state["answer"]
model = answer.model

left, right = st.columns(2)
left.metric("Study prediction" if study_mode else "Prediction", answer.prediction)
right.metric("Study probability" if study_mode else "Probability", f"{answer.probability:.3f}")
notes = [" UNTRAINED (random weights)" if model.untrained else ""]
notes.append(" trained on SYNTHETIC data" if model.synthetic else "")
total_ms = answer.timings.total_ms or 0
threshold = (
    f"threshold {model.threshold:.3f}: {model.threshold_source}" if model.threshold is not None else ""
)
st.caption(f"Model {model.name} {model.version}{''.join(notes)}; {threshold}; {total_ms:.0f} ms")
if isinstance(answer, StudyPrediction):
    st.caption(f"{len(answer.images)} images; the study's probability is the {answer.aggregation}.")
if model.notice:
    st.warning(model.notice)
warning = answer.warning
if warning:
    st.error(f"OUTSIDE THIS MODEL'S DOMAIN: {warning}")
calibration = model.calibration_source if model.calibrated else "not calibrated to this site"
st.caption(f"Domain: {model.domain or 'not stated'}; probabilities {calibration}.")


def show_image(name: str, data: bytes, one: WorkerAnswer) -> None:
    """The original beside its heatmap overlay."""
    try:
        original = original_for_display(data)
    except XrayfmError as exc:
        st.error(f"Cannot display this image: {exc}")
        return
    col_original, col_heat = st.columns(2)
    col_original.image(original, caption=name, width="stretch", clamp=True)
    if one.attention_map:
        blended = overlay(original, heatmap_from_base64(one.attention_map), opacity)
        col_heat.image(
            blended, caption=f"Attention ({one.explain_method}), opacity {opacity:.2f}", width="stretch"
        )
    else:
        col_heat.info("Heatmap switched off.")


if isinstance(answer, StudyPrediction):
    for (name, data), one in zip(images, answer.images, strict=True):
        st.subheader(f"{name}: {one.prediction} ({one.probability:.3f})")
        show_image(name, data, one)
else:
    show_image("Original", images[0][1], answer)
st.subheader("Probabilities")
st.bar_chart(answer.probabilities, horizontal=True)

with st.expander("Feedback: was this answer right?"):
    st.caption("Stored with the model version to measure agreement and, where the deployment keeps images, "
               "to retrain. Write no names or identifiers in the comment.")  # fmt: skip
    verdict = st.radio("Verdict", ["agree", "disagree"], horizontal=True, key="fb_verdict")
    choices = [*model.labels, model.negative_label]
    label = (
        st.selectbox("Correct answer", [c for c in choices if c != answer.prediction], key="fb_label")
        if verdict == "disagree"
        else None
    )
    comment = st.text_input("Comment (optional)", max_chars=500, key="fb_comment")
    if st.button("Send feedback"):
        try:
            saved = client.feedback(answer.job_id, verdict, label, comment)
            st.success(f"Thank you: recorded ({saved.verdict}, {saved.label}).")
        except GatewayError as exc:
            st.error(f"Feedback not recorded: {exc}")
