"""xrayfm.inference: loading a checkpoint for serving and what it says about itself."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import make_tiny_checkpoint
from xrayfm.inference import RESEARCH_USE, Predictor, load_served_model


def test_models_trained_on_phantoms_say_so(tmp_path):
    trained_on_phantoms = make_tiny_checkpoint(tmp_path / "a", ["Abnormal"], data={"synthetic": True})
    plain = make_tiny_checkpoint(tmp_path / "b", ["Abnormal"], data={"synthetic": False})
    assert load_served_model(trained_on_phantoms, device="cpu").info()["synthetic"] is True
    assert load_served_model(plain, device="cpu").info()["synthetic"] is False


def test_every_answer_carries_the_models_intended_use(tmp_path):
    default = load_served_model(make_tiny_checkpoint(tmp_path / "a", ["Abnormal"]), device="cpu")
    assert default.info()["notice"] == RESEARCH_USE and "Research use only" in RESEARCH_USE
    own = make_tiny_checkpoint(tmp_path / "b", ["Abnormal"], intended_use="Research on elbows only.")
    assert load_served_model(own, device="cpu").info()["notice"] == "Research on elbows only."


def test_binary_answer_shape(tmp_path):
    served = load_served_model(make_tiny_checkpoint(tmp_path / "m", ["Abnormal"]), device="cpu")
    image = (np.random.default_rng(0).random((80, 50)) * 255).astype(np.uint8)
    (answer,) = Predictor(served).predict([image])
    assert answer.prediction in ("Abnormal", "Normal")
    assert 0 <= answer.probability <= 1 and set(answer.probabilities) == {"Abnormal"}
    # the heatmap lies on the image's own geometry, uint8, and is not blank
    assert answer.heatmap.shape == image.shape and answer.heatmap.dtype == np.uint8
    assert answer.heatmap.max() > answer.heatmap.min() and answer.explain_method == "rollout"
    (plain,) = Predictor(served).predict([image], explain_maps=False)
    assert plain.heatmap is None and plain.explain_method is None
    # the same logits, to float rounding (rollout runs attention unfused)
    assert plain.probabilities == pytest.approx(answer.probabilities, abs=1e-5)


def test_study_decision_is_the_mean_of_its_images(tmp_path):
    from xrayfm.inference import STUDY_AGGREGATION
    from xrayfm.operating_point import write_operating_point

    folder = make_tiny_checkpoint(tmp_path / "m", ["Abnormal"])
    rng = np.random.default_rng(1)
    images = [(rng.random((70, 60)) * 255).astype(np.uint8) for _ in range(3)]
    predictor = Predictor(load_served_model(folder, device="cpu"))
    answers = predictor.predict(images, explain_maps=False)
    study = predictor.decide_study(answers)
    mean = float(np.mean([a.probabilities["Abnormal"] for a in answers]))
    assert study.probabilities == {"Abnormal": round(mean, 6)} and "mean" in STUDY_AGGREGATION
    write_operating_point(folder, {"threshold": mean + 1e-4, "source": "test"})  # just above: Normal
    predictor.served.retune(folder)
    assert predictor.decide_study(answers).prediction == "Normal"
    write_operating_point(folder, {"threshold": mean - 1e-4, "source": "test"})
    predictor.served.retune(folder)
    assert predictor.decide_study(answers).prediction == "Abnormal"


def test_drawing_later_gives_the_heatmap_predict_draws(tmp_path):
    """The worker draws each map in the request's thread (predict(draw=False), then draw): same pixels."""
    predictor = Predictor(load_served_model(make_tiny_checkpoint(tmp_path / "m", ["Abnormal"]), "cpu"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((50, 30), (24, 64))]
    drawn = predictor.predict(images)
    later = predictor.predict(images, draw=False)
    assert all(r.heatmap is None and r.model_map is not None for r in later)
    for now, pending, image in zip(drawn, later, images, strict=True):
        result = predictor.draw(pending, image.shape)
        assert result.heatmap.shape == image.shape and result.model_map is None
        np.testing.assert_array_equal(result.heatmap, now.heatmap)
        assert result.probabilities == pytest.approx(now.probabilities, abs=1e-5)
    plain = predictor.predict(images, explain_maps=False, draw=False)[0]
    assert predictor.draw(plain, images[0].shape) is plain  # nothing to draw
