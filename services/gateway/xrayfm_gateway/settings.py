"""Gateway settings, read from the environment in one place (``XRAYFM_*``; see services/README.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from xrayfm.errors import XrayfmError
from xrayfm_inference.config import QueueSettings, env_number, env_str
from xrayfm_inference.protocol import EXPLAIN_METHODS, MAX_SIDE


@dataclass(frozen=True)
class GatewaySettings:
    """What the gateway accepts and how long it waits."""

    queue: QueueSettings = field(default_factory=QueueSettings)
    api_keys: frozenset[str] = frozenset()  # XRAYFM_API_KEYS (comma-separated); empty = auth off
    max_upload_bytes: int = 64 * 1024 * 1024  # XRAYFM_MAX_UPLOAD_MB
    max_pixels: int = 60_000_000  # XRAYFM_MAX_PIXELS: larger images are refused before decoding
    max_image_side: int = 20_000  # XRAYFM_MAX_IMAGE_SIDE: absurd dimensions are refused
    min_image_side: int = 8  # XRAYFM_MIN_IMAGE_SIDE
    transport_side: int = 512  # XRAYFM_TRANSPORT_SIDE: longest side of the pixels sent to the worker
    predict_timeout_s: float = 60.0  # XRAYFM_PREDICT_TIMEOUT: /predict waits this long, then 504 + job id
    explain_method: str = "rollout"  # XRAYFM_EXPLAIN_METHOD: the default heatmap method
    decode_concurrency: int = 4  # XRAYFM_DECODE_CONCURRENCY: uploads decoded at the same time
    admin_keys: frozenset[str] = frozenset()  # XRAYFM_ADMIN_KEYS: training and model-store endpoints
    model_store: Path = Path("runs/model-store")  # XRAYFM_MODEL_STORE: listed, promoted, rolled back

    @property
    def auth_enabled(self) -> bool:
        """True when at least one API key is configured."""
        return bool(self.api_keys)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        """Read the gateway's variables (plus the queue settings shared with the workers)."""
        env = os.environ if env is None else env
        keys = frozenset(k.strip() for k in env.get("XRAYFM_API_KEYS", "").split(",") if k.strip())
        admin = frozenset(k.strip() for k in env.get("XRAYFM_ADMIN_KEYS", "").split(",") if k.strip())
        method = env_str(env, "XRAYFM_EXPLAIN_METHOD", cls.explain_method)
        if method not in EXPLAIN_METHODS:
            raise XrayfmError(f"XRAYFM_EXPLAIN_METHOD must be one of {EXPLAIN_METHODS}, got {method!r}")
        settings = cls(
            queue=QueueSettings.from_env(env),
            api_keys=keys,
            max_upload_bytes=int(env_number(env, "XRAYFM_MAX_UPLOAD_MB", 64, float, 0.001) * 1024 * 1024),
            max_pixels=int(env_number(env, "XRAYFM_MAX_PIXELS", cls.max_pixels, int, 1)),
            max_image_side=int(env_number(env, "XRAYFM_MAX_IMAGE_SIDE", cls.max_image_side, int, 1)),
            min_image_side=int(env_number(env, "XRAYFM_MIN_IMAGE_SIDE", cls.min_image_side, int, 1)),
            transport_side=int(env_number(env, "XRAYFM_TRANSPORT_SIDE", cls.transport_side, int, 16)),
            predict_timeout_s=env_number(env, "XRAYFM_PREDICT_TIMEOUT", cls.predict_timeout_s, float, 0.1),
            explain_method=method,
            decode_concurrency=int(
                env_number(env, "XRAYFM_DECODE_CONCURRENCY", cls.decode_concurrency, int, 1)
            ),
            admin_keys=admin,
            model_store=Path(env_str(env, "XRAYFM_MODEL_STORE", str(cls.model_store))),
        )
        if settings.transport_side > MAX_SIDE:
            raise XrayfmError(f"XRAYFM_TRANSPORT_SIDE must be <= {MAX_SIDE}, got {settings.transport_side}")
        return settings
