"""Errors: one exception class per error code of docs/PROTOCOL.md §6, and the client's own."""

from __future__ import annotations


class RosterError(Exception):
    """Any error of this client. `code` is the protocol's error code (0: a local error)."""

    code: int = 0
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        leader: str | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        #: For `NotLeader`: the node believed to lead, when the server knows it.
        self.leader = leader
        #: For `SlotMoving`: when to try again.
        self.retry_after_ms = retry_after_ms


class ConnectionLost(RosterError):
    """No session server could be reached, or the connection broke; the client keeps trying."""

    retryable = True


class Timeout(RosterError):
    """A request or a wait did not complete in time."""

    retryable = True


class ConfigError(RosterError):
    """The client configuration is missing or wrong."""


class Internal(RosterError):
    code = 1


class BadFrame(RosterError):
    code = 2


class FrameTooLarge(RosterError):
    code = 3


class UnexpectedMessage(RosterError):
    code = 4


class UnsupportedVersion(RosterError):
    code = 5


class Unauthenticated(RosterError):
    code = 6


class InvalidArgument(RosterError):
    code = 7


class LimitExceeded(RosterError):
    code = 8


class NotFound(RosterError):
    code = 9


class NotLeader(RosterError):
    code = 10
    retryable = True


class SlotMoving(RosterError):
    code = 11
    retryable = True


class NoQuorum(RosterError):
    code = 12
    retryable = True


class Overloaded(RosterError):
    code = 13
    retryable = True


class Unavailable(RosterError):
    code = 14
    retryable = True


class ClusterMismatch(RosterError):
    code = 15


class UnknownMember(RosterError):
    code = 16


class ShuttingDown(RosterError):
    code = 17
    retryable = True


class HelloRequired(RosterError):
    code = 18


class PermissionDenied(RosterError):
    code = 19


_BY_CODE: dict[int, type[RosterError]] = {
    cls.code: cls
    for cls in (
        Internal,
        BadFrame,
        FrameTooLarge,
        UnexpectedMessage,
        UnsupportedVersion,
        Unauthenticated,
        InvalidArgument,
        LimitExceeded,
        NotFound,
        NotLeader,
        SlotMoving,
        NoQuorum,
        Overloaded,
        Unavailable,
        ClusterMismatch,
        UnknownMember,
        ShuttingDown,
        HelloRequired,
        PermissionDenied,
    )
}


def from_wire(
    code: int, message: str, leader: str | None = None, retry_after_ms: int | None = None
) -> RosterError:
    """The exception for an error reply; a code this client does not know keeps its number."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return RosterError(
            f"error {code}: {message}", code=code, leader=leader, retry_after_ms=retry_after_ms
        )
    return cls(message, leader=leader, retry_after_ms=retry_after_ms)
