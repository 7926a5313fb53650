"""fsspec URLs (``s3://``, ``gs://``, ``http(s)://``...) as Zarr stores.

Credentials and endpoints come from the environment, so that every Dask worker
(another process) finds them too: the usual variables of each filesystem
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for
S3-compatible servers, ``GOOGLE_APPLICATION_CREDENTIALS``), or a JSON object of
fsspec storage options in ``UNETFLOW_STORAGE_OPTIONS``, e.g.
``{"anon": true}`` for a public bucket.
"""

from __future__ import annotations

import json
import os
from typing import Any

from unetflow.errors import ConfigError

ENV = "UNETFLOW_STORAGE_OPTIONS"


def is_url(path: str) -> bool:
    """``True`` for ``scheme://...`` other than ``file://``."""
    return "://" in path and not path.startswith("file://")


def storage_options(path: str) -> dict[str, Any] | None:
    """fsspec options for *path*: ``None`` for local paths, else those of ``$UNETFLOW_STORAGE_OPTIONS``."""
    if not is_url(path):
        return None
    text = os.environ.get(ENV, "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{ENV} is not JSON ({err}); set it like '{{\"anon\": true}}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{ENV} must be a JSON object of fsspec storage options, got {text[:60]}")
    return value


def open_node(path: str, *, mode: str = "r") -> Any:
    """``zarr.open`` on a URL with the environment's storage options."""
    import zarr

    return zarr.open(store=path, mode=mode, storage_options=storage_options(path))
