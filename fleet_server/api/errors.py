"""The one place where a service's error becomes an HTTP answer."""

from __future__ import annotations

from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse

from fleet_server.errors import (
    Conflict,
    NotFound,
    Refused,
    Rejected,
    ServiceError,
    TooLarge,
    Unavailable,
)

# Most specific first: TooLarge is a Rejected.
STATUS: tuple[tuple[type[ServiceError], int], ...] = (
    (NotFound, status.HTTP_404_NOT_FOUND),
    (TooLarge, status.HTTP_413_CONTENT_TOO_LARGE),
    (Rejected, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (Conflict, status.HTTP_409_CONFLICT),
    (Refused, status.HTTP_403_FORBIDDEN),
    (Unavailable, status.HTTP_503_SERVICE_UNAVAILABLE),
)


def status_of(error: ServiceError) -> int:
    return next((code for kind, code in STATUS if isinstance(error, kind)), 400)


def answer_service_errors(app: FastAPI) -> None:
    """Answer every ServiceError with its status and `{"detail": message}`, as FastAPI's
    own HTTPException does."""

    async def handler(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ServiceError)
        return JSONResponse({"detail": str(error)}, status_code=status_of(error))

    app.add_exception_handler(ServiceError, handler)
