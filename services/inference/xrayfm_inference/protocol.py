"""What travels through Redis: a request is grey uint8 pixels plus options, never a file or a header.

Request (JSON, one Celery task argument)::

    {"pixels": "<base64 of H*W uint8, row-major>", "height": H, "width": W,
     "explain": true, "method": "rollout", "submitted_at": <unix time>}

Result (JSON, stored in the result backend until it expires)::

    {"prediction": "Abnormal", "probability": 0.87, "probabilities": {...},
     "attention_map": "<base64 grey PNG, H x W>" | null, "model": {...}, "timings": {...}}
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import Any

import numpy as np

from xrayfm.errors import XrayfmError

PREDICT_TASK = "xrayfm.predict"
EXPLAIN_METHODS = ("rollout", "grad_rollout", "gradcam")  # xrayfm.explain.METHODS, without importing torch
MAX_SIDE = 4096  # a request larger than this on either side is refused by the worker (the gateway sends less)


class ProtocolError(XrayfmError):
    """A queued request that does not follow the protocol (not the caller's image: a client bug)."""


def encode_request(
    image: np.ndarray, *, explain: bool = True, method: str = "rollout", submitted_at: float | None = None
) -> dict[str, Any]:
    """Pack a 2-D uint8 grey image and options into the JSON request sent to the worker."""
    arr = np.ascontiguousarray(image)
    if arr.ndim != 2 or arr.dtype != np.uint8 or 0 in arr.shape:
        raise ProtocolError(f"expected a non-empty 2-D uint8 image, got {arr.dtype} {arr.shape}")
    return {
        "pixels": base64.b64encode(arr.tobytes()).decode("ascii"),
        "height": int(arr.shape[0]),
        "width": int(arr.shape[1]),
        "explain": bool(explain),
        "method": str(method),
        "submitted_at": time.time() if submitted_at is None else float(submitted_at),
    }


def decode_request(payload: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Unpack a request: (H x W uint8 image, options {explain, method, submitted_at})."""
    if not isinstance(payload, dict):
        raise ProtocolError(f"request must be a JSON object, got {type(payload).__name__}")
    try:
        height, width = int(payload["height"]), int(payload["width"])
        raw = base64.b64decode(payload["pixels"], validate=True)
    except KeyError as exc:
        raise ProtocolError(f"request lacks the field {exc.args[0]!r}") from None
    except (TypeError, ValueError, binascii.Error) as exc:
        raise ProtocolError(f"malformed request: {exc}") from None
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise ProtocolError(f"image size {width}x{height} outside 1..{MAX_SIDE}")
    if len(raw) != height * width:
        raise ProtocolError(f"pixel buffer has {len(raw)} bytes, expected {height}x{width}={height * width}")
    image = np.frombuffer(raw, dtype=np.uint8).reshape(height, width)
    options = {
        "explain": bool(payload.get("explain", True)),
        "method": str(payload.get("method", "rollout")),
        "submitted_at": float(payload.get("submitted_at") or time.time()),
    }
    return image, options


def describe_request(payload: dict[str, Any]) -> str:
    """A short, pixel-free description of a request for logs and Celery's argsrepr."""
    return f"<grey {payload.get('width')}x{payload.get('height')} explain={payload.get('explain')}>"
