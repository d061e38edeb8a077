"""Model downloads for devices: resumable (Range), cacheable (ETag), and only their own."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.responses import FileResponse

from fleet_server.api.deps import DeviceDep, SessionDep, StateDep
from fleet_server.tables import DesiredState

router = APIRouter(prefix="/api/v1", tags=["artifacts"])


@router.get("/artifacts/{sha256}", response_class=FileResponse)
def download(
    sha256: str, request: Request, device: DeviceDep, session: SessionDep, state: StateDep
) -> Response:
    desired = session.get(DesiredState, device.id)
    # 404 rather than 403: a device learns nothing about artifacts that are not its own.
    if desired is None or desired.model_sha256 != sha256:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such artifact for this device")
    path = state.blobs.path(sha256)
    if not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, "artifact is missing from storage")
    # The content never changes for a digest, so the digest is the ETag.
    headers = {"ETag": f'"{sha256}"', "Cache-Control": "private, max-age=31536000, immutable"}
    if headers["ETag"] in request.headers.get("if-none-match", ""):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return FileResponse(path, media_type="application/octet-stream", headers=headers)
