"""The domain gate: input checks, the feature score and its threshold, files, and the features themselves
(from torch and the ONNX graph alike)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import make_tiny_checkpoint
from xrayfm.data.images import read_image
from xrayfm.data.synth.nonradiographs import KINDS, non_radiograph
from xrayfm.domain import DeclaredDomain, DomainGate, InputFacts, input_reasons
from xrayfm.domain.checks import colourfulness, neighbour_correlation, upload_facts
from xrayfm.domain.drift import psi
from xrayfm.domain.gate import GATE_JSON, GATE_TENSORS, reference_bins
from xrayfm.errors import XrayfmError


def smooth_image(seed: int = 0, shape: tuple[int, int] = (96, 80)) -> np.ndarray:
    """A grey picture with structure (blurred blobs), like a radiograph as far as the input checks go."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 5)).astype(np.float32)
    from PIL import Image

    return np.asarray(Image.fromarray(small.astype(np.uint8)).resize(shape[::-1], Image.Resampling.BICUBIC))


# -- input checks -----------------------------------------------------------------------------------------
def test_the_input_checks_name_colour_blank_noise_and_header_mismatches():
    chest = DeclaredDomain("chests", ("CR", "DX"), ("CHEST",), ("AP", "PA"))
    picture = smooth_image()
    assert input_reasons(picture, InputFacts(), chest) == []
    assert [r.code for r in input_reasons(picture, InputFacts(colourfulness=40.0), chest)] == ["colour"]
    assert [r.code for r in input_reasons(np.full((64, 64), 90, np.uint8), InputFacts(), chest)] == ["blank"]
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    assert [r.code for r in input_reasons(noise, InputFacts(), chest)] == ["noise"]
    tibia = InputFacts(modality="CR", body_part="EXTREMITY", view="AP")
    [reason] = input_reasons(picture, tibia, chest)
    assert reason.code == "body_part" and "EXTREMITY" in reason.message and "CHEST" in reason.message
    ct = InputFacts(modality="CT", body_part="CHEST", view="LL")
    assert {r.code for r in input_reasons(picture, ct, chest)} == {"modality", "view"}
    assert input_reasons(picture, tibia, DeclaredDomain()) == []  # a domain that names no body part: any


def test_colourfulness_and_correlation_tell_grey_pictures_from_colour_and_noise():
    grey = np.repeat(smooth_image()[..., None], 3, axis=2)
    assert colourfulness(grey) == 0.0
    colour = grey.copy()
    colour[..., 0] = 255 - colour[..., 0]
    assert colourfulness(colour) > 50
    assert neighbour_correlation(smooth_image()) > 0.9
    assert (
        abs(neighbour_correlation(np.random.default_rng(1).integers(0, 256, (128, 128)).astype(np.uint8)))
        < 0.1
    )


@pytest.mark.parametrize("kind", KINDS)
def test_upload_facts_read_colour_from_the_file_itself(kind):
    data = non_radiograph(kind, seed=3, fmt="JPEG")
    facts = upload_facts(data)
    if kind in ("photo", "screenshot"):
        assert facts.colourfulness is not None and facts.colourfulness > 12
    else:  # grey files: nothing to measure
        assert facts.colourfulness is None
    reasons = {r.code for r in input_reasons(read_image(data), facts, DeclaredDomain())}
    expected = {"photo": {"colour"}, "screenshot": {"colour"}, "document": set(), "noise": {"noise"},
                "blank": {"blank"}, "constant": {"blank"}}[kind]  # fmt: skip
    assert reasons == expected  # a grey document passes the cheap checks: the feature score's job


def test_input_facts_round_trip_and_normalise_header_values():
    facts = InputFacts.from_dict({"colourfulness": 3, "modality": " cr ", "body_part": "chest", "view": ""})
    assert facts == InputFacts(colourfulness=3.0, modality="CR", body_part="CHEST", view=None)
    assert InputFacts.from_dict(facts.to_dict()) == facts
    assert InputFacts.from_dict(None) == InputFacts()


# -- the feature score ---------------------------------------------------------------------------------------
def gaussian(n: int, shift: float = 0.0, seed: int = 0, dim: int = 16) -> np.ndarray:
    """Features of one 'domain'; `shift` moves them along the first four (narrow) dimensions."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(0.5, 2.0, dim)
    offset = np.zeros(dim)
    offset[:4] = shift
    return (rng.normal(size=(n, dim)) * scales + offset).astype(np.float32)


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_the_threshold_passes_the_stated_share_of_new_in_domain_images(method):
    gate = DomainGate.fit(gaussian(3000), gaussian(600, seed=1), method=method, pass_rate=0.95)
    fresh = gaussian(4000, seed=2)
    assert abs(gate.pass_rate_of(fresh) - 0.95) < 0.025
    assert gate.facts["held_out_pass_rate"] >= 0.95
    shifted = gaussian(500, shift=6.0, seed=3)
    assert gate.pass_rate_of(shifted) < 0.2
    assert gate.score(shifted).mean() > gate.score(fresh).mean()


def test_mahalanobis_uses_the_covariance_not_just_the_distance():
    ref = gaussian(3000)  # wide on the last dimensions, narrow on the first ones
    gate = DomainGate.fit(ref, gaussian(300, seed=1))
    along_wide, along_narrow = np.zeros((1, 16), np.float32), np.zeros((1, 16), np.float32)
    along_wide[0, -1], along_narrow[0, 0] = 3.0, 3.0
    assert gate.score(along_narrow)[0] > 2 * gate.score(along_wide)[0]


def test_a_gate_is_stored_as_safetensors_and_json_and_loads_back(tmp_path):
    domain = DeclaredDomain("test chests", body_parts=("CHEST",))
    gate = DomainGate.fit(gaussian(500), gaussian(100, seed=1), domain=domain,
                          held_out_probabilities=np.random.default_rng(0).random(100))  # fmt: skip
    gate.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {GATE_JSON, GATE_TENSORS}
    assert gate.arrays["held_out"].shape == (100, 16)  # kept for extend()
    info = json.loads((tmp_path / GATE_JSON).read_text())
    assert info["method"] == "mahalanobis" and info["domain"]["body_parts"] == ["CHEST"]
    assert set(info["reference"]) == {"score_ratio", "probability"}
    loaded = DomainGate.load(tmp_path)
    probe = gaussian(50, seed=9)
    np.testing.assert_allclose(loaded.score(probe), gate.score(probe), rtol=1e-5)
    assert loaded.threshold == gate.threshold and loaded.domain == domain
    assert DomainGate.load(tmp_path / "nothing") is None
    (tmp_path / GATE_TENSORS).write_bytes(b"not safetensors")
    with pytest.raises(XrayfmError, match="unreadable"):
        DomainGate.load(tmp_path)


def test_gate_inputs_are_checked():
    with pytest.raises(XrayfmError, match="at least 20"):
        DomainGate.fit(gaussian(100), gaussian(10))
    with pytest.raises(XrayfmError, match="unknown domain gate method"):
        DomainGate.fit(gaussian(100), gaussian(30), method="energy")
    gate = DomainGate.fit(gaussian(100), gaussian(30))
    with pytest.raises(XrayfmError, match="dimensions"):
        gate.score(np.zeros((2, 3)))
    with pytest.raises(XrayfmError, match="finite"):
        gate.score(np.full((1, 16), np.nan))


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_extending_a_gate_with_a_site_admits_the_site(method):
    gate = DomainGate.fit(gaussian(2000), gaussian(300, seed=1), method=method)
    site = gaussian(1200, shift=6.0, seed=5)
    assert gate.pass_rate_of(site[600:]) < 0.5
    extended = gate.extend(site[:400], np.concatenate([site[400:600], gaussian(200, seed=6)]), "site sample")
    assert extended.pass_rate_of(site[600:]) > 0.85
    assert extended.pass_rate_of(gaussian(500, seed=7)) > 0.85
    assert extended.facts["reference_images"] == 2400 and "added: site sample" in extended.facts["sources"]


def test_psi_is_small_for_the_reference_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    reference = reference_bins(rng.normal(size=2000))
    assert psi(reference, rng.normal(size=500)) < 0.05
    assert psi(reference, rng.normal(1.0, 1.0, size=500)) > 0.25


# -- features from the served model -------------------------------------------------------------------------
def test_features_are_the_head_input_and_the_onnx_graph_gives_the_same(tmp_path):
    pytest.importorskip("onnxruntime")
    import torch

    from xrayfm.inference import Predictor, load_served_model
    from xrayfm.inference.runtime import make_predictor

    served = load_served_model(make_tiny_checkpoint(tmp_path / "m", ["Finding"]), "cpu")
    predictor = Predictor(served)
    images = [smooth_image(seed) for seed in range(3)]
    batch = predictor.preprocess(images)
    logits, _, _, features = predictor.run(batch, True, "rollout")
    head = served.model.get_classifier()
    torch.testing.assert_close(head(torch.as_tensor(features)), torch.as_tensor(logits), rtol=1e-4, atol=1e-5)
    onnx = make_predictor(served, "onnxruntime", cache_dir=tmp_path / "onnx")
    _, _, runtime, onnx_features = onnx.run(batch, True, "rollout")
    assert runtime == "onnxruntime"
    np.testing.assert_allclose(onnx_features, features, rtol=1e-4, atol=1e-5)
    [answer] = predictor.predict(images[:1], explain_maps=False)
    assert answer.domain is not None and answer.domain.gate is None  # no gate: the input checks alone
    assert answer.domain.in_domain
