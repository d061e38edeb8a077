"""The REST API against a real database, with real bundles made by edge-convert."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from sqlalchemy import func, select

from fleet_server.auth import Role, secret_hash
from fleet_server.db import transaction
from fleet_server.tables import AuditEvent, DesiredState, EnrollmentToken, ModelVersion
from protocol.manifest import parse_manifest
from tests.bundles import Bundle
from tests.fleet_server.server.conftest import Server

# -- authentication and roles --------------------------------------------------------------


def test_missing_or_wrong_token_is_401(server: Server) -> None:
    assert server.client.get("/api/v1/devices").status_code == 401
    wrong = {"Authorization": "Bearer efa_not-a-real-token"}
    response = server.client.get("/api/v1/devices", headers=wrong)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_wrong_role_is_403(server: Server, bundle: Bundle) -> None:
    viewer = server.token(Role.viewer)
    body = {"name": "ci", "public_key": bundle.public_key.read_text()}
    response = server.client.post("/api/v1/keys", json=body, headers=viewer)
    assert response.status_code == 403
    assert "needs the admin role" in response.json()["detail"]
    assert server.client.get("/api/v1/keys", headers=viewer).json() == []


def test_revoked_token_is_401(server: Server) -> None:
    headers = server.token(Role.admin, "soon-gone")
    assert server.client.get("/api/v1/devices", headers=headers).status_code == 200
    from fleet_server.tables import ApiToken

    with transaction(server.state.sessions) as session:
        row = session.scalar(select(ApiToken).where(ApiToken.name == "soon-gone"))
        assert row is not None
        row.revoked_at = dt.datetime.now(dt.UTC)
    assert server.client.get("/api/v1/devices", headers=headers).status_code == 401


# -- enrolment and the registry -------------------------------------------------------------


def test_enrolment_gives_a_device_its_credentials(server: Server) -> None:
    token = server.enrollment(tags=["lab"])
    enrolled = server.enroll(token=token, name="pi-01", tags=["cam"], hardware={"soc": "bcm2712"})
    assert enrolled["device_id"].startswith("dev-")
    assert len(enrolled["secret"]) >= 40
    assert enrolled["mqtt"]["username"] == enrolled["device_id"]  # type: ignore[index]
    device = server.client.get(
        f"/api/v1/devices/{enrolled['device_id']}", headers=server.token(Role.viewer)
    ).json()
    assert device["name"] == "pi-01"
    assert device["tags"] == ["cam", "lab"]
    assert device["hardware"] == {"soc": "bcm2712"}
    assert device["status"] == "offline"


def test_enrolment_token_is_single_use_and_its_secret_is_stored_hashed(server: Server) -> None:
    token = server.enrollment(uses=1)
    server.enroll(token=token)
    again = server.client.post("/api/v1/enroll", json={"token": token})
    assert again.status_code == 403
    assert again.json()["detail"] == "enrollment token has been used up"
    with transaction(server.state.sessions) as session:
        row = session.scalar(select(EnrollmentToken))
        assert row is not None
        assert row.token_hash == secret_hash(token)
        assert token not in json.dumps([row.token_hash, row.tags])


def test_expired_and_unknown_enrolment_tokens_are_refused(server: Server) -> None:
    token = server.enrollment(uses=5)
    with transaction(server.state.sessions) as session:
        row = session.scalar(select(EnrollmentToken))
        assert row is not None
        row.expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    response = server.client.post("/api/v1/enroll", json={"token": token})
    assert (response.status_code, response.json()["detail"]) == (
        403,
        "enrollment token has expired",
    )
    response = server.client.post("/api/v1/enroll", json={"token": "efe_nope"})
    assert (response.status_code, response.json()["detail"]) == (403, "unknown enrollment token")
    response = server.client.post("/api/v1/enroll", json={"name": "no token"})
    assert response.status_code == 422


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"tags": ["t"] * 33}, "at most 32 tags"),
        ({"name": "n" * 129}, "name must be 1-128 characters"),
        ({"serial": "123"}, "Unexpected keyword argument"),
    ],
)
def test_an_enrolment_off_the_wire_contract_is_refused_and_uses_no_token(
    server: Server, extra: dict[str, object], message: str
) -> None:
    token = server.enrollment(uses=1)
    response = server.client.post("/api/v1/enroll", json={"token": token, **extra})
    assert response.status_code == 422
    assert message in response.text
    server.enroll(token=token)  # the token's one use is still there


def test_device_list_filters_and_pages(server: Server) -> None:
    lab = server.enrollment(tags=["lab"], uses=3)
    ids = [server.enroll(token=lab)["device_id"] for _ in range(3)]
    field = server.enroll()["device_id"]
    viewer = server.token(Role.viewer)
    page = server.client.get("/api/v1/devices?tag=lab&limit=2", headers=viewer).json()
    assert (page["total"], len(page["items"])) == (3, 2)
    rest = server.client.get("/api/v1/devices?tag=lab&limit=2&offset=2", headers=viewer).json()
    assert {d["id"] for d in page["items"] + rest["items"]} == set(ids)
    everyone = server.client.get("/api/v1/devices?status=offline", headers=viewer).json()
    assert everyone["total"] == 4
    assert field in {d["id"] for d in everyone["items"]}
    assert server.client.get("/api/v1/devices?status=on", headers=viewer).status_code == 422
    assert server.client.get("/api/v1/devices?limit=0", headers=viewer).status_code == 422


def test_patch_tags_and_bad_tags_change_nothing(server: Server) -> None:
    device_id = server.enroll(tags=["a"])["device_id"]
    operator = server.token(Role.operator)
    url = f"/api/v1/devices/{device_id}"
    response = server.client.patch(url, json={"tags": ["b", "c"]}, headers=operator)
    assert response.json()["tags"] == ["b", "c"]
    bad = server.client.patch(url, json={"tags": ["ok", "not ok!"]}, headers=operator)
    assert bad.status_code == 422
    assert server.client.get(url, headers=operator).json()["tags"] == ["b", "c"]
    assert (
        server.client.patch(
            url, json={"tags": ["x"]}, headers=server.token(Role.viewer)
        ).status_code
        == 403
    )


def test_unknown_ids_are_404(server: Server) -> None:
    operator = server.token(Role.operator)
    for method, url in (
        ("GET", "/api/v1/devices/dev-nope"),
        ("PATCH", "/api/v1/devices/dev-nope"),
        ("DELETE", "/api/v1/devices/dev-nope"),
        ("GET", "/api/v1/models/nope/1.0.0"),
    ):
        body: dict[str, list[str]] | None = {"tags": []} if method == "PATCH" else None
        response = server.client.request(method, url, json=body, headers=operator)
        assert response.status_code == 404, (method, url)


# -- keys and models -------------------------------------------------------------------------


def _trust(server: Server, bundle: Bundle) -> dict[str, str]:
    admin = server.token(Role.admin)
    body = {"name": "release", "public_key": bundle.public_key.read_text()}
    response = server.client.post("/api/v1/keys", json=body, headers=admin)
    assert response.status_code == 201, response.text
    return admin


def _models_stored(server: Server) -> tuple[int, int]:
    with transaction(server.state.sessions) as session:
        rows = session.scalar(select(func.count()).select_from(ModelVersion)) or 0
    blobs = server.settings.blob_dir()
    files = [p for p in blobs.rglob("*") if p.is_file()] if blobs.exists() else []
    return rows, len(files)


def test_keys_are_checked_and_unique(server: Server, bundle: Bundle) -> None:
    admin = _trust(server, bundle)
    again = {"name": "other", "public_key": bundle.public_key.read_text()}
    assert server.client.post("/api/v1/keys", json=again, headers=admin).status_code == 409
    junk = {"name": "junk", "public_key": "-----BEGIN PUBLIC KEY-----\nAAAA\n"}
    response = server.client.post("/api/v1/keys", json=junk, headers=admin)
    assert response.status_code == 422
    assert "not a PEM public key" in response.json()["detail"]
    keys = server.client.get("/api/v1/keys", headers=admin).json()
    assert [k["name"] for k in keys] == ["release"]


def test_a_signed_bundle_is_registered(server: Server, bundle: Bundle) -> None:
    operator = _trust(server, bundle)
    response = server.client.post("/api/v1/models", files=bundle.files(), headers=operator)
    assert response.status_code == 201, response.text
    model = response.json()
    manifest = parse_manifest((bundle.folder / "manifest.json").read_bytes()).manifest
    assert (model["name"], model["version"], model["sha256"]) == (
        "tabular",
        "1.0.0",
        manifest.model.sha256,
    )
    detail = server.client.get("/api/v1/models/tabular/1.0.0", headers=operator).json()
    assert detail["manifest"] == json.loads((bundle.folder / "manifest.json").read_text())
    assert [m["version"] for m in server.client.get("/api/v1/models", headers=operator).json()] == [
        "1.0.0"
    ]
    duplicate = server.client.post("/api/v1/models", files=bundle.files(), headers=operator)
    assert duplicate.status_code == 409
    assert _models_stored(server) == (1, 1)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("model", "sha256 does not match the manifest"),
        ("manifest", "does not verify"),
        ("unsigned", "manifest is not signed"),
        ("malformed", "manifest is not valid JSON"),
        ("schema", "does not fit the schema"),
    ],
)
def test_bad_bundles_are_refused_and_leave_nothing(
    server: Server, bundle: Bundle, tamper: str, reason: str
) -> None:
    operator = _trust(server, bundle)
    files = bundle.files()
    manifest = json.loads(files["manifest"][1])
    if tamper == "model":
        model = bytearray(files["model"][1])
        model[len(model) // 2] ^= 1
        files["model"] = ("model.tflite", bytes(model))
    elif tamper == "manifest":
        manifest["manifest"]["version"] = "9.9.9"
    elif tamper == "unsigned":
        manifest["signatures"] = []
    elif tamper == "schema":
        manifest["manifest"]["model"]["size"] = "big"
    if tamper != "model":
        raw = b"{not json" if tamper == "malformed" else json.dumps(manifest).encode()
        files["manifest"] = ("manifest.json", raw)
    response = server.client.post("/api/v1/models", files=files, headers=operator)
    assert response.status_code == 422, response.text
    assert reason in response.json()["detail"]
    assert _models_stored(server) == (0, 0)


def test_a_bundle_from_an_untrusted_key_is_refused(server: Server, bundle: Bundle) -> None:
    operator = server.token(Role.operator)
    response = server.client.post("/api/v1/models", files=bundle.files(), headers=operator)
    assert response.status_code == 422
    assert "none of which is trusted" in response.json()["detail"]


def test_an_oversized_upload_is_413(server: Server, bundle: Bundle) -> None:
    operator = _trust(server, bundle)
    files = bundle.files()
    files["model"] = ("model.tflite", b"\0" * (3 * 2**20))
    response = server.client.post("/api/v1/models", files=files, headers=operator)
    assert response.status_code == 413
    assert _models_stored(server) == (0, 0)


# -- artifacts ---------------------------------------------------------------------------------


def _deployed(server: Server, bundle: Bundle) -> tuple[dict[str, str], bytes]:
    operator = _trust(server, bundle)
    assert (
        server.client.post("/api/v1/models", files=bundle.files(), headers=operator).status_code
        == 201
    )
    device = server.enroll()
    body = {"name": "tabular", "version": "1.0.0"}
    response = server.client.put(
        f"/api/v1/devices/{device['device_id']}/desired", json=body, headers=operator
    )
    assert response.status_code == 200, response.text
    assert response.json()["seq"] == 1
    return device, (bundle.folder / "model.tflite").read_bytes()


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"rollback": True}, 422, "rollback needs a model to roll back to"),
        ({"mode": "shadow"}, 422, "mode 'shadow' needs a model to run as the candidate"),
        ({"name": "tabular"}, 422, "give both name and version"),
        ({"name": "tabular", "version": "9.9.9"}, 404, "no model tabular 9.9.9"),
    ],
)
def test_a_desired_state_that_cannot_be_sent_is_refused_and_nothing_stored(
    server: Server, body: dict[str, object], status: int, detail: str
) -> None:
    operator = server.token(Role.operator)
    device = server.enroll()
    url = f"/api/v1/devices/{device['device_id']}/desired"
    response = server.client.put(url, json=body, headers=operator)
    assert (response.status_code, response.json()["detail"]) == (status, detail)
    with server.state.sessions() as session:
        assert session.get(DesiredState, device["device_id"]) is None
    unknown = server.client.put("/api/v1/devices/dev-nope/desired", json={}, headers=operator)
    assert (unknown.status_code, unknown.json()["detail"]) == (404, "no device 'dev-nope'")


def _artifact_url(bundle: Bundle) -> str:
    manifest = parse_manifest((bundle.folder / "manifest.json").read_bytes()).manifest
    return f"/api/v1/artifacts/{manifest.model.sha256}"


def test_a_device_downloads_its_artifact_resumably(server: Server, bundle: Bundle) -> None:
    device, model = _deployed(server, bundle)
    auth = (device["device_id"], device["secret"])
    url = _artifact_url(bundle)
    full = server.client.get(url, auth=auth)
    assert full.status_code == 200
    assert full.content == model
    etag = full.headers["etag"]
    partial = server.client.get(url, auth=auth, headers={"Range": "bytes=100-"})
    assert partial.status_code == 206
    assert partial.content == model[100:]
    assert partial.headers["content-range"] == f"bytes 100-{len(model) - 1}/{len(model)}"
    cached = server.client.get(url, auth=auth, headers={"If-None-Match": etag})
    assert cached.status_code == 304


def test_artifacts_need_the_devices_own_credentials(server: Server, bundle: Bundle) -> None:
    device, _ = _deployed(server, bundle)
    other = server.enroll()
    url = _artifact_url(bundle)
    assert server.client.get(url).status_code == 401
    assert server.client.get(url, auth=(device["device_id"], "wrong")).status_code == 401
    # Another enrolled device may not fetch what was not sent to it.
    assert server.client.get(url, auth=(other["device_id"], other["secret"])).status_code == 404


def test_decommission_revokes_the_credential_at_once(server: Server, bundle: Bundle) -> None:
    device, _ = _deployed(server, bundle)
    auth = (device["device_id"], device["secret"])
    url = _artifact_url(bundle)
    assert server.client.get(url, auth=auth).status_code == 200
    operator = server.token(Role.operator)
    response = server.client.delete(f"/api/v1/devices/{device['device_id']}", headers=operator)
    assert response.status_code == 204
    assert server.client.get(url, auth=auth).status_code == 401
    assert (
        server.client.get(f"/api/v1/devices/{device['device_id']}", headers=operator).status_code
        == 404
    )


# -- system --------------------------------------------------------------------------------------


def test_admins_list_and_revoke_tokens(server: Server) -> None:
    admin = server.token(Role.admin, "root")
    operator = server.token(Role.operator, "ci")
    listed = server.client.get("/api/v1/tokens", headers=admin)
    assert listed.status_code == 200
    rows = {row["name"]: row for row in listed.json()}
    assert set(rows) == {"root", "ci"}
    assert all("token" not in key and "hash" not in key for key in rows["ci"])
    assert server.client.get("/api/v1/tokens", headers=operator).status_code == 403
    ci = rows["ci"]["id"]
    assert server.client.delete(f"/api/v1/tokens/{ci}", headers=operator).status_code == 403

    assert server.client.delete(f"/api/v1/tokens/{ci}", headers=admin).status_code == 204
    assert server.client.get("/api/v1/devices", headers=operator).status_code == 401
    again = server.client.get("/api/v1/tokens", headers=admin).json()
    assert [row["revoked_at"] is not None for row in again] == [False, True]
    missing = server.client.delete("/api/v1/tokens/999", headers=admin)
    assert missing.status_code == 404
    assert "no API token with id 999" in missing.text
    actions = [e["action"] for e in server.client.get("/api/v1/audit", headers=admin).json()]
    assert actions.count("token.revoke") == 1


def test_healthz_metrics_and_audit(server: Server, bundle: Bundle) -> None:
    assert server.client.get("/healthz").json() == {
        "status": "ok",
        "database": "ok",
        "mqtt": "disabled",
    }
    device, _ = _deployed(server, bundle)
    metrics = server.client.get("/metrics").text
    assert 'edgefleet_devices{status="offline"} 1.0' in metrics
    assert "edgefleet_models 1.0" in metrics
    assert (
        'edgefleet_http_requests_total{method="POST",route="/api/v1/models",status="201"}'
        in metrics
    )
    admin = server.token(Role.admin, "auditor")
    assert (
        server.client.get("/api/v1/audit", headers=server.token(Role.operator)).status_code == 403
    )
    events = server.client.get("/api/v1/audit", headers=admin).json()
    actions = [e["action"] for e in events]
    for action in ("key.add", "model.register", "device.enroll", "device.desired", "token.create"):
        assert action in actions
    desired = next(e for e in events if e["action"] == "device.desired")
    assert desired["target"] == device["device_id"]
    assert desired["details"]["model"] == "tabular/1.0.0"
    with transaction(server.state.sessions) as session:
        assert (session.scalar(select(func.count()).select_from(AuditEvent)) or 0) == len(events)


def test_openapi_is_served(server: Server) -> None:
    schema = server.client.get("/openapi.json").json()
    assert "/api/v1/enroll" in schema["paths"]
    assert server.client.get("/docs").status_code == 200


def test_a_stream_past_the_limit_is_refused_while_it_is_copied(server: Server) -> None:
    """What stops an upload whose headers gave no length: the copy itself counts."""
    import io

    from fleet_server.blobs import BlobStore
    from fleet_server.errors import TooLarge

    store = BlobStore(server.settings.blob_dir())
    with pytest.raises(TooLarge):
        store.put(io.BytesIO(b"\0" * 5000), "ab" * 32, max_bytes=4096)
    assert not store.exists("ab" * 32)
    assert list(store.root.rglob("*.upload-*")) == []


def test_models_and_migrations_agree(database_url: str) -> None:
    """The schema comes from migrations only; they must describe exactly the models."""
    from alembic import command

    from fleet_server.migrate import alembic_config, upgrade

    upgrade(database_url)
    command.check(alembic_config(database_url))  # raises if autogenerate finds a difference
