"""Enrolment: a device with a token becomes a member of the fleet."""

from __future__ import annotations

from fastapi import APIRouter, status

from fleet_server.api.deps import SessionDep, StateDep
from fleet_server.errors import Unavailable
from fleet_server.schemas import EnrollBody
from fleet_server.services import devices
from protocol.enrollment import ENROLL_PATH, EnrollmentAnswer, MqttAccess

router = APIRouter(tags=["devices"])


@router.post(ENROLL_PATH, status_code=status.HTTP_201_CREATED, response_model=EnrollmentAnswer)
def enroll(body: EnrollBody, session: SessionDep, state: StateDep) -> EnrollmentAnswer:
    enrolled = devices.enroll(
        session, token=body.token, name=body.name, tags=body.tags, hardware=body.hardware
    )
    session.flush()
    address = state.settings.mqtt_address()
    # Built before the broker hears of the device: nothing the answer could refuse may
    # leave a broker login behind a rolled-back enrolment.
    answer = EnrollmentAnswer(
        device_id=enrolled.device.id,
        secret=enrolled.secret,
        mqtt=MqttAccess(
            host=address[0] if address else None,
            port=address[1] if address else None,
            username=enrolled.device.id,
            topic_prefix=state.topics.prefix,
        ),
        api_url=state.settings.resolved_public_url(),
    )
    if state.broker is not None:
        try:
            state.broker.add_device(enrolled.device.id, enrolled.secret, state.topics.prefix)
        except Exception as exc:
            # The transaction rolls back: no device exists that the broker does not know.
            raise Unavailable(f"broker refused the device: {exc}") from None
    return answer
