"""Finding the EWS URL of a mailbox when ``--ews-url`` is left out: exchangelib's
SOAP autodiscover (``GetUserSettings`` at ``https://<domain>/autodiscover/
autodiscover.svc``, then ``autodiscover.<domain>``, then the DNS SRV record
``_autodiscover._tcp.<domain>``), run in the EWS worker pool.
The answer is kept per process, so each address is looked up once.
"""

from __future__ import annotations

from exchangelib import Credentials
from exchangelib import errors as ews_errors
from exchangelib.autodiscover import Autodiscovery, close_connections
from exchangelib.protocol import CachingProtocol

from threadsync.plugins.exchange.ews import run_in_worker, translate, trust_ca_for

_FOUND: dict[str, str] = {}


async def discover_ews_url(email: str, username: str, password: str | None,
                           ca_file: str | None, timeout: float) -> str:
    """The EWS endpoint autodiscover names for ``email``."""
    key = email.lower()
    if key in _FOUND:
        return _FOUND[key]
    domain = email.rsplit("@", 1)[-1]
    trust_ca_for(f"https://{domain}/", ca_file)
    trust_ca_for(f"https://autodiscover.{domain}/", ca_file)

    def look_up() -> str:
        try:
            _, protocol = Autodiscovery(
                email=email, credentials=Credentials(username, password or "")).discover()
        except (ews_errors.EWSError, OSError) as exc:
            raise translate(exc, f"autodiscover of {email}") from None
        finally:
            close_connections()  # autodiscover's own HTTP sessions
        protocol.close()
        # exchangelib keeps that protocol (no EWS version, default retry policy)
        # in its cache by endpoint and credentials; the connection's own must win.
        with CachingProtocol._protocol_cache_lock:
            CachingProtocol._protocol_cache.pop(CachingProtocol._cache_key(protocol.config), None)
        return str(protocol.service_endpoint)

    url = await run_in_worker(look_up)
    _FOUND[key] = url
    return url


__all__ = ["discover_ews_url"]
