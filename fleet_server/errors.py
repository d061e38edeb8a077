"""What a service raises when a request cannot be carried out, the message one line saying
why. The API turns each kind into its HTTP status in one place (`api/errors.py`); the
command line prints the message; services never speak HTTP."""

from __future__ import annotations


class ServiceError(Exception):
    """A request that cannot be carried out as asked."""


class NotFound(ServiceError, LookupError):
    """What the request names does not exist."""


class Rejected(ServiceError, ValueError):
    """The request is well-formed but cannot be carried out as asked."""


class TooLarge(Rejected):
    """An upload over its limit."""


class Conflict(ServiceError):
    """The request clashes with the current state (a duplicate, a rollout's state)."""


class Refused(ServiceError):
    """The caller may not do this (an enrolment token unknown, expired or used up)."""


class Unavailable(ServiceError):
    """Something the request needs (the broker) did not answer or refused."""
