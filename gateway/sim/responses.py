"""JSON responses in Stratix shapes: errors are `{"error": {"message", "code"}}`; all carry `x-request-id`."""

from __future__ import annotations

import uuid
from typing import Any

from starlette.responses import JSONResponse


def new_request_id() -> str:
    return f"sim-{uuid.uuid4().hex}"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON response with a fresh `x-request-id`, as the real API sends on every answer."""
    all_headers = {"x-request-id": new_request_id(), **(headers or {})}
    return JSONResponse(body, status_code=status, headers=all_headers)


def error_response(status: int, code: str, message: str) -> JSONResponse:
    """The error envelope the Stratix SDK unwraps (`body["error"]`)."""
    return json_response({"error": {"message": message, "code": code}}, status)
