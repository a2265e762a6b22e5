"""condo.docker: the only code in condo that speaks HTTP to the Docker engine.

Modules, each owning one thing:
    client   `open_docker`, `DockerClient`: endpoint, API version, calls, the error mapping
    models   the frozen values handed out (Container, ContainerEvent, ...) and their JSON parsing
    events   `run_events`: the events stream, reconnected and de-duplicated, with resync markers
    auth     `RegistryAuth`: credentials for pulls, resolved as docker-py does

Everything they raise is a `condo.errors.DockerError` (or ConfigError for a bad URL or auth
file); nothing outside this package sees httpx or the engine's JSON.
"""

from condo.docker.auth import Credentials, RegistryAuth
from condo.docker.client import MAX_API_VERSION, DockerClient, open_docker
from condo.docker.events import ACTIONS, run_events
from condo.docker.models import (
    Container,
    ContainerEvent,
    ContainerId,
    ContainerSummary,
    EventsResumed,
    published_host_ports,
)

__all__ = [
    "ACTIONS",
    "MAX_API_VERSION",
    "Container",
    "ContainerEvent",
    "ContainerId",
    "ContainerSummary",
    "Credentials",
    "DockerClient",
    "EventsResumed",
    "RegistryAuth",
    "open_docker",
    "published_host_ports",
    "run_events",
]
