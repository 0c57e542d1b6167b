"""HTTP endpoints that plugins contribute (``register_routes``), described without
any web framework: a path, its methods and an async handler from a
:class:`RouteRequest` to a :class:`RouteReply`.

The HTTP API plugin serves them beside its own routes, unauthenticated (they are
for outside services such as Microsoft Graph's change notifications, which
authenticate themselves inside the request), with its body size limit and error
handling. The kernel never serves them itself; a process without the HTTP API
simply has none.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RouteRequest:
    """What a plugin route sees of a request."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class RouteReply:
    """What a plugin route answers. ``headers`` are added to the answer."""

    status: int
    content_type: str = "text/plain"
    body: str | bytes = ""
    headers: Mapping[str, str] = field(default_factory=dict)


RouteHandler = Callable[[RouteRequest], Awaitable[RouteReply]]


@dataclass(frozen=True)
class PluginRoute:
    """One endpoint: ``path`` is exact (no parameters), ``methods`` upper case."""

    path: str
    methods: tuple[str, ...]
    handler: RouteHandler
    #: Largest request body accepted; bigger ones are refused with 413.
    max_body_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        if not self.path.startswith("/") or "{" in self.path:
            raise ValueError(f"a plugin route needs an exact path, not {self.path!r}")
