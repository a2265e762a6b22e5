"""condo's whole error tree, in one place.

Lower-level errors (httpx, OS, an EDN reader's `condo.edn.EdnError`) are mapped into these exactly
once, at the module that meets them; nothing else in condo catches a foreign exception type::

    CondoError                    base; every error condo raises on purpose
    ├─ ConfigError                bad command line, environment or config file: exit 2, no traceback
    ├─ SpecError                  one spec file is unusable; a per-service state, never fatal
    ├─ StateFileError             the state file cannot be read or written
    ├─ DockerError                raised by condo.docker (and by a driver for a missing `:pull
    │                             :never` image); `transient` says whether to retry
    │   ├─ DockerUnavailable      (transient) socket missing, connection refused, daemon restarting
    │   ├─ DockerTimeout          (transient) a call took longer than its deadline
    │   ├─ EngineUnsupported      (permanent) the engine speaks no API version condo speaks
    │   └─ DockerApiError         the engine answered an error; transient iff status >= 500
    │       ├─ ImageNotFound      (permanent) pull or create of an image that does not exist
    │       ├─ ContainerNotFound  (permanent) the container is gone
    │       ├─ NameConflict       (permanent) a container of that name already exists
    │       └─ BadRequest         (permanent) the engine rejected the create body or parameters
    ├─ ConsulError                raised only by condo.consul; transient iff Consul did not answer
    │                             or answered >= 500 (an ACL refusal or a bad request is permanent)
    ├─ ProxyError                 raised only by condo.proxy.haproxy: the data plane cannot be
    │                             started, reloaded or asked (retried by the proxy's task)
    ├─ ForgetRefused              `condo forget HOST` refused: unknown, live, or Consul away
    └─ SelfDeployFailed           a successor did not take over (shown under /v1/state "self")
"""

from __future__ import annotations


class CondoError(Exception):
    """Base of every error condo raises on purpose."""


class ConfigError(CondoError):
    """The command line, environment or a config file is wrong; the message says how."""


class SpecError(CondoError):
    """A spec file cannot be used.

    Attributes:
        file: the path as given (or the service name when there is no file).
        line: 1-based line where the problem can be found, or None when it is the whole file.
        message: what is wrong, in words for the operator.
    """

    def __init__(self, file: str, message: str, line: int | None = None) -> None:
        self.file = file
        self.line = line
        self.message = message
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {message}")


class StateFileError(CondoError):
    """The state file cannot be read or written."""


class DockerError(CondoError):
    """The engine could not do what condo asked.

    `transient` errors are worth retrying with backoff; permanent ones wait for a new spec (or
    the next backoff step, in case the world changed: an image pushed later, a name freed).
    """

    transient: bool = True


class DockerUnavailable(DockerError):
    """The engine cannot be reached (no socket, connection refused, connection dropped)."""


class DockerTimeout(DockerError):
    """A Docker call did not finish before its deadline."""


class EngineUnsupported(DockerError):
    """The engine accepts no Docker API version that condo speaks (its floor is above condo's
    newest), so condo can neither see nor change anything on it until the engine changes."""

    transient = False


class DockerApiError(DockerError):
    """The engine answered with an error status.

    Attributes:
        status: the HTTP status code.
        message: the engine's own message (its `{"message": ...}` body).
    """

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        self.transient = status >= 500
        super().__init__(f"{status}: {message}")


class ImageNotFound(DockerApiError):
    """The image (or tag) does not exist, locally or in its registry."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.transient = False


class ContainerNotFound(DockerApiError):
    """The container does not exist (any more)."""


class NameConflict(DockerApiError):
    """A container with the requested name already exists (Docker's 409, Podman's 500)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.transient = False


class BadRequest(DockerApiError):
    """The engine rejected the request's body or parameters (a bad create spec, usually)."""


class ConsulError(CondoError):
    """Consul could not do what condo asked (raised only by condo.consul).

    Attributes:
        status: the HTTP status Consul answered, or None when it did not answer at all.
        transient: worth retrying soon (no answer, a timeout, a 5xx); a permanent error (403 ACL
            refusal, 400) needs an operator, but condo keeps retrying slowly anyway.
    """

    def __init__(self, message: str, *, status: int | None = None, transient: bool = True) -> None:
        self.status = status
        self.transient = transient
        super().__init__(message)


class ProxyError(CondoError):
    """The proxy's data plane (HAProxy) cannot be started, reloaded or asked."""


class ForgetRefused(CondoError):
    """A host's record cannot be forgotten; `reason` is "unknown", "live" or "unavailable"."""

    def __init__(self, message: str, *, reason: str) -> None:
        self.reason = reason
        super().__init__(message)


class SelfDeployFailed(CondoError):
    """The successor did not take over; the message says why (shown in /v1/state)."""
