"""Pinterest's error shape, shared by the sandbox's modules."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class PinterestError(Exception):
    """An error answer in Pinterest's `{"code", "message"}` shape."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)
