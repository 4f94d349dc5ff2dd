"""Errors in Pinterest's own shape: `{"code", "message"}` with Pinterest's status."""

from __future__ import annotations

from fastapi.responses import JSONResponse

AUTHENTICATION_FAILED = "Authentication failed."
INSUFFICIENT_SCOPE = (
    "Your token does not have sufficient permissions to perform this operation. "
    "Please ensure your token is authorized with the correct set of scopes."
)


class PinterestError(Exception):
    """An error answer in Pinterest's `{"code", "message"}` shape."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)
