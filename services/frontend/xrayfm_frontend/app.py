"""The xrayfm web UI (Streamlit): upload a radiograph, see the prediction, the probability, and the
attention heatmap over the image (opacity slider) next to the original; a second page (sidebar) for
training jobs and model versions (xrayfm_frontend.training_page)."""

from __future__ import annotations

import hashlib

import streamlit as st

from xrayfm.errors import XrayfmError
from xrayfm_frontend import training_page
from xrayfm_frontend.client import GatewayClient, GatewayError
from xrayfm_frontend.render import heatmap_from_base64, original_for_display, overlay
from xrayfm_stack.protocol import Prediction
from xrayfm_stack.settings import FrontendSettings

PREDICTION, TRAINING = "Prediction", "Training & models"


@st.cache_resource
def gateway_client(settings: FrontendSettings) -> GatewayClient:
    """One HTTP client (connection pool) per gateway, kept across the script's re-runs."""
    return GatewayClient(settings)


st.set_page_config(page_title="xrayfm", layout="wide")
settings = FrontendSettings.from_env()
client = gateway_client(settings)

ready, detail = client.ready()
with st.sidebar:
    page = st.radio("Page", [PREDICTION, TRAINING])
    st.caption(f"Gateway: {settings.gateway_url}")
    if ready:
        st.success(f"Stack ready: {detail}")
    else:
        st.warning(f"Stack not ready: {detail}")
if page == TRAINING:
    training_page.render(client)
    st.stop()

st.title("xrayfm: radiograph prediction")
with st.sidebar:
    explain = st.checkbox("Attention heatmap", value=True)
    opacity = st.slider("Heatmap opacity", min_value=0.0, max_value=1.0, value=0.45, step=0.05)

uploaded = st.file_uploader("Radiograph (PNG, JPEG or DICOM)", type=["png", "jpg", "jpeg", "dcm", "dicom"])
if uploaded is None:
    st.info("Upload an X-ray image to get a prediction.")
    st.stop()

data = uploaded.getvalue()
key = (hashlib.sha256(data).hexdigest(), explain)
if st.session_state.get("answer_key") != key:  # the slider re-runs the script: do not predict again
    st.session_state.pop("answer", None)
    st.session_state.pop("answer_error", None)
    if not ready:
        st.session_state["answer_error"] = f"The stack is not ready, try again shortly: {detail}"
    else:
        with st.spinner("Predicting..."):
            try:
                st.session_state["answer"] = client.predict(data, uploaded.name, explain=explain)
            except GatewayError as exc:
                st.session_state["answer_error"] = str(exc)
    st.session_state["answer_key"] = key

if "answer_error" in st.session_state:
    st.error(st.session_state["answer_error"])
    st.stop()
answer: Prediction = st.session_state["answer"]
model = answer.model

left, right = st.columns(2)
left.metric("Prediction", answer.prediction)
right.metric("Probability", f"{answer.probability:.3f}")
notes = [" UNTRAINED (random weights)" if model.untrained else ""]
notes.append(" trained on SYNTHETIC data" if model.synthetic else "")
total_ms = answer.timings.total_ms or 0
st.caption(f"Model {model.name} {model.version}{''.join(notes)}; {total_ms:.0f} ms")
if model.notice:
    st.warning(model.notice)

try:
    original = original_for_display(data)
except XrayfmError as exc:
    st.error(f"Cannot display this image: {exc}")
    st.stop()
col_original, col_heat = st.columns(2)
col_original.image(original, caption="Original", width="stretch", clamp=True)
if answer.attention_map:
    blended = overlay(original, heatmap_from_base64(answer.attention_map), opacity)
    col_heat.image(
        blended,
        caption=f"Attention ({answer.explain_method}), opacity {opacity:.2f}",
        width="stretch",
    )
else:
    col_heat.info("Heatmap switched off.")
st.subheader("Probabilities")
st.bar_chart(answer.probabilities, horizontal=True)
