"""The gateway draws each worker's model map into the caller's ``attention_map``, with the library's one
drawing path (:func:`xrayfm.explain.overlay.heatmap_to_base64`, torch- and matplotlib-free)."""

from __future__ import annotations

import time

from xrayfm.errors import XrayfmError
from xrayfm.explain.overlay import heatmap_to_base64
from xrayfm_stack.protocol import ImageAnswer, ModelMap, ProtocolError, WorkerAnswer


def draw_map(model_map: ModelMap) -> str:
    """A worker's map drawn on the image's geometry: a base64 8-bit grey PNG (ProtocolError, naming what
    is wrong and never the data, when the map is malformed)."""
    heat = model_map.array()
    shape = (model_map.out_height, model_map.out_width)
    try:  # its own checks (the fitting mode) name what is wrong
        return heatmap_to_base64(heat, shape, model_map.input_size, model_map.mode)
    except XrayfmError as exc:
        raise ProtocolError(f"malformed model map: {exc}") from None


def drawn(answer: WorkerAnswer) -> ImageAnswer:
    """The caller's answer to a worker's: its model map drawn into ``attention_map`` (the time in
    ``timings.render_ms``); an answer without a map (explain=false) has none."""
    if answer.model_map is None:
        return answer.answer(None)
    started = time.perf_counter()
    png = draw_map(answer.model_map)
    return answer.answer(png, 1000 * (time.perf_counter() - started))
