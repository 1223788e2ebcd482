"""The one error shape of the HTTP API: ``{"error": {"status", "code", "message"}}``."""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError", "error_body"]


class ApiError(Exception):
    """An error answered to the client with ``status`` and :func:`error_body`."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.code, self.message)


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    """``{"error": {"status": 422, "code": "not_media", "message": "..."}}``."""
    return {"error": {"status": int(status), "code": code, "message": message}}
