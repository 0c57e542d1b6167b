"""TLS client contexts and the mapping of certificate failures, shared by every
mail protocol client of threadsync (IMAP, SMTP to a mailbox, the CRM's relay).

Verification is never disabled (R11): the context is Python's default client
context (system trust store, host name checking) plus, optionally, one extra CA
file for on-premises servers with a private CA. Plaintext is allowed only
towards loopback, which :func:`threadsync.core.config.check_security` enforces in
``prepare``.
"""

from __future__ import annotations

import ssl

from threadsync.core.errors import ConfigError, ProviderProtocolError


def client_context(ca_file: str | None) -> ssl.SSLContext:
    """A verifying client context; ``ca_file`` adds a trusted CA (PEM)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot use CA file {ca_file}: {exc}") from None
    return context


def plaintext_hint(exc: BaseException) -> str:
    """Advice to add to a TLS failure where the server answered in plain text
    (``WRONG_VERSION_NUMBER``: it did not start TLS on this port)."""
    if "WRONG_VERSION_NUMBER" in str(getattr(exc, "reason", "") or exc):
        return (
            "; the server did not start TLS on this port: try --security starttls "
            "(or none, on loopback), or the server's TLS port"
        )
    return ""


def certificate_error(exc: BaseException | None) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure in ``exc``'s cause chain, if any."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def certificate_failure(
    host: str, port: int, exc: ssl.SSLCertVerificationError
) -> ProviderProtocolError:
    """The error to raise when ``host`` presented a certificate we cannot trust.

    Not transient: retrying will not help until the server's certificate or the
    ``ca_file`` option changes.
    """
    reason = exc.verify_message or exc.reason or "verification failed"
    return ProviderProtocolError(
        f"TLS certificate of {host}:{port} is not trusted ({reason}); "
        "fix the server certificate or pass --ca-file with its CA"
    )
