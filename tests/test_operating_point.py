"""A version's operating point: recorded beside the checkpoint, used by the served decision, stated in answers."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import make_tiny_checkpoint
from xrayfm.errors import XrayfmError
from xrayfm.inference import Predictor, load_served_model
from xrayfm.operating_point import (
    DEFAULT_SOURCE,
    check_operating_point,
    read_operating_point,
    write_operating_point,
)


@pytest.mark.parametrize(
    "point",
    [{"threshold": 1.5, "source": "x"}, {"threshold": -0.1, "source": "x"}, {"threshold": float("nan"), "source": "x"},
     {"threshold": True, "source": "x"}, {"threshold": "0.3", "source": "x"}, {"threshold": 0.3},
     {"threshold": 0.3, "source": "  "}, {"threshold": 0.3, "source": "x" * 301}],
)  # fmt: skip
def test_bad_points_are_refused(point, tmp_path):
    with pytest.raises(XrayfmError):
        check_operating_point(point)
    with pytest.raises(XrayfmError):
        write_operating_point(tmp_path, point)
    assert read_operating_point(tmp_path) is None


def test_the_served_decision_follows_the_recorded_point(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "m", ["Abnormal"])
    served = load_served_model(folder, device="cpu")
    assert (served.threshold, served.threshold_source) == (0.5, DEFAULT_SOURCE)
    assert served.info()["threshold"] == 0.5 and "not calibrated" in served.info()["threshold_source"]
    image = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    (answer,) = Predictor(served).predict([image], explain_maps=False)
    p = answer.probability

    # a threshold just above / below this image's probability flips the decision
    for threshold, expected in ((min(1.0, p + 1e-3), "Normal"), (max(0.0, p - 1e-3), "Abnormal")):
        written = write_operating_point(
            folder, {"threshold": threshold, "source": "youden on eval job 7", "rule": "youden"}
        )
        assert read_operating_point(folder)["threshold"] == threshold and written["set_at"] > 0
        served.retune(folder)  # what the worker does when the file changes
        (answer,) = Predictor(served).predict([image], explain_maps=False)
        assert answer.prediction == expected and answer.probability == p
        assert served.info()["threshold"] == threshold
        assert served.info()["threshold_source"] == "youden on eval job 7"
    assert load_served_model(folder, device="cpu").threshold == threshold  # a fresh load reads it too

    write_operating_point(folder, None)
    served.retune(folder)
    assert (served.threshold, served.threshold_source) == (0.5, DEFAULT_SOURCE)


def test_meta_threshold_and_several_labels(tmp_path):
    own = load_served_model(make_tiny_checkpoint(tmp_path / "a", ["Abnormal"], threshold=0.3), device="cpu")
    assert own.info()["threshold"] == 0.3 and own.info()["threshold_source"] == "the checkpoint's meta.json"
    several = load_served_model(make_tiny_checkpoint(tmp_path / "b", ["A", "B", "C"]), device="cpu")
    assert several.info()["threshold"] is None
    assert several.info()["threshold_source"] == "the most probable label"
