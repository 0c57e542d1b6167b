"""Finding the EWS URL of a mailbox when ``--ews-url`` is left out: exchangelib's
autodiscover (POX ``autodiscover.xml`` at the address's domain and at
``autodiscover.<domain>``, then the DNS SRV record), run in the EWS worker pool.
The answer is kept per process, so each address is looked up once.
"""

from __future__ import annotations

from exchangelib import Credentials
from exchangelib import errors as ews_errors
from exchangelib.autodiscover import Autodiscovery

from threadsync.core.errors import ProviderError
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
        return str(protocol.service_endpoint)

    try:
        url = await run_in_worker(look_up)
    except ProviderError:
        raise
    _FOUND[key] = url
    return url


__all__ = ["discover_ews_url"]
