"""The error a fleet service answers with on a ``.../rejected`` topic.

A `Rejection` is raised by the pure protocol logic and turned into the AWS Fleet Provisioning
rejected payload (``statusCode``, ``errorCode``, ``errorMessage``) by whoever publishes the reply.
Messages are for the device's operator: they name what was wrong, never echo a secret such as a
certificate ownership token.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rejection(Exception):
    """A request refused with an AWS-style status code, error code and message."""

    status_code: int
    error_code: str
    error_message: str

    def __post_init__(self) -> None:
        # Exception.__init__ stores args at C level, so it works on a frozen dataclass; args in
        # field order also keep the exception picklable and copyable.
        Exception.__init__(self, self.status_code, self.error_code, self.error_message)

    def __reduce__(self) -> tuple[type[Rejection], tuple[int, str, str]]:
        # BaseException would restore __dict__ with setattr, which a frozen dataclass refuses.
        return (type(self), (self.status_code, self.error_code, self.error_message))

    def __str__(self) -> str:
        return f"{self.status_code} {self.error_code}: {self.error_message}"

    def document(self) -> dict[str, object]:
        """The rejected payload, as AWS IoT Fleet Provisioning sends it."""
        return {
            "statusCode": self.status_code,
            "errorCode": self.error_code,
            "errorMessage": self.error_message,
        }


def invalid_payload(message: str) -> Rejection:
    return Rejection(400, "InvalidPayload", message)


def invalid_parameters(message: str) -> Rejection:
    return Rejection(400, "InvalidParameters", message)


def invalid_csr(message: str) -> Rejection:
    return Rejection(400, "InvalidCSR", message)


def invalid_token(message: str) -> Rejection:
    return Rejection(400, "InvalidCertificateOwnershipToken", message)


def access_denied(message: str) -> Rejection:
    return Rejection(403, "AccessDenied", message)


def not_found(message: str) -> Rejection:
    return Rejection(404, "ResourceNotFound", message)


def conflict(message: str) -> Rejection:
    return Rejection(409, "ResourceConflictsException", message)


def too_large(message: str) -> Rejection:
    return Rejection(413, "PayloadTooLarge", message)


def throttled(message: str) -> Rejection:
    return Rejection(429, "Throttling", message)


def internal(message: str) -> Rejection:
    return Rejection(500, "InternalFailure", message)
