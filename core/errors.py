"""The one exception tree of threadsync.

Every error threadsync raises on purpose derives from :class:`ThreadsyncError`.
Library errors (aioimaplib, aiosmtplib, httpx, msal, SQLAlchemy, ``email``) are
translated into this tree at the boundary where they occur: providers translate
network and protocol errors, the store translates database errors. Only ``cli.py``
turns these into exit codes and messages for people.

::

    ThreadsyncError
    ├── ConfigError                 config.toml or a provider option is wrong
    ├── InvalidInput                a caller's argument is unusable
    │   ├── HeaderInjection         CR, LF or NUL in a header value from the CRM
    │   └── MessageTooLarge         a CRM message over [sync] max_message_bytes
    ├── NotFound                    no such sub-account, user, connection or thread
    ├── Refused                     a rule (R1-R11) forbids the request
    │   ├── LabsDisabled            R1: the sub-account's Labs flag is off
    │   └── AlreadyConnected        R2a: use update-email instead
    ├── StoreError                  the database failed or is not initialised
    │   └── SecretsUnreadable       stored credentials do not decrypt with this key
    ├── LeaseLost                   another worker holds the work now; stop touching it
    ├── MessageParseError           a message could not be parsed at all
    └── ProviderError               a mailbox provider failed
        ├── AuthenticationFailed    credentials rejected -> connection needs_reauth
        ├── TransientProviderError  network, timeout, server busy -> retried with backoff
        │   └── DeliveryUnconfirmed the line failed after a message may have left: not resent
        ├── ProviderProtocolError   the server answered something we cannot use
        └── UnexpectedFailure       a connection's work failed in a way nobody foresaw

Messages never contain secrets (R11): callers pass addresses and host names,
never passwords or tokens.
"""

from __future__ import annotations


class ThreadsyncError(Exception):
    """Base of every error threadsync raises on purpose."""

    #: Short machine-readable kind, used in ``--json`` error output and events.
    code: str = "error"


class ConfigError(ThreadsyncError):
    """The configuration file or a provider option is missing or wrong."""

    code = "config_error"


class InvalidInput(ThreadsyncError):
    """An argument given by the CRM or the command line cannot be used."""

    code = "invalid_input"


class HeaderInjection(InvalidInput):
    """A CRM-supplied header value carries CR, LF or NUL."""

    code = "header_injection"


class MessageTooLarge(InvalidInput):
    """A CRM message is larger than ``[sync] max_message_bytes`` once encoded."""

    code = "message_too_large"


class NotFound(ThreadsyncError):
    """The named sub-account, user, connection or thread does not exist."""

    code = "not_found"


class Refused(ThreadsyncError):
    """A rule of the product forbids the request."""

    code = "refused"


class LabsDisabled(Refused):
    """R1: the sub-account's ``two_way_email_sync`` Labs flag is off."""

    code = "labs_disabled"


class AlreadyConnected(Refused):
    """R2a: the user already has a connected mailbox; use update-email."""

    code = "already_connected"


class StoreError(ThreadsyncError):
    """The database could not be reached, is not initialised, or failed."""

    code = "store_error"


class SecretsUnreadable(StoreError):
    """Stored credentials cannot be decrypted with the secret key at hand (the key
    file was replaced, or the value is damaged): that connection's problem, not
    the database's."""

    code = "secrets_unreadable"


class LeaseLost(ThreadsyncError):
    """Another worker holds the lease on this work now (an outbox entry before its
    point of no return, or a connection): this worker must stop touching it."""

    code = "lease_lost"


class MessageParseError(ThreadsyncError):
    """A message could not be parsed into anything usable."""

    code = "message_parse_error"


class ProviderError(ThreadsyncError):
    """A mailbox provider failed. Subclasses say whether retrying can help."""

    code = "provider_error"


class AuthenticationFailed(ProviderError):
    """The mailbox rejected the stored credentials; the user must re-authorise."""

    code = "authentication_failed"


class TransientProviderError(ProviderError):
    """A failure that may pass: network, timeout, throttling, server unavailable.

    ``retry_after`` (seconds), when the server said how long to wait.
    """

    code = "transient_provider_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeliveryUnconfirmed(TransientProviderError):
    """The connection failed after the end of a message was written and before
    the server's answer (SMTP after the final dot): the server may have accepted
    it. The kernel never sends it again (a duplicate is worse than a gap) and
    records the message with reason ``delivery_unconfirmed``."""

    code = "delivery_unconfirmed"


class ProviderProtocolError(ProviderError):
    """The server answered something the provider cannot use (not retried soon)."""

    code = "provider_protocol_error"


class UnexpectedFailure(ProviderError):
    """A connection's work failed in a way no provider translated: its provider
    plugin cannot be loaded, its stored credentials cannot be read, or a bug.
    Recorded like any other provider failure (``error`` with backoff), so that it
    shows wherever connections are shown; the message says what a person can do.
    """

    code = "unexpected_failure"


__all__ = [
    "AlreadyConnected",
    "AuthenticationFailed",
    "ConfigError",
    "DeliveryUnconfirmed",
    "HeaderInjection",
    "InvalidInput",
    "LabsDisabled",
    "LeaseLost",
    "MessageParseError",
    "MessageTooLarge",
    "NotFound",
    "ProviderError",
    "ProviderProtocolError",
    "Refused",
    "SecretsUnreadable",
    "StoreError",
    "ThreadsyncError",
    "TransientProviderError",
    "UnexpectedFailure",
]
