"""The Provider interface: what a mailbox plugin implements, and nothing more.

A provider moves mail for one kind of mailbox (IMAP/SMTP, Microsoft Graph, ...).
It knows how to log in, list what changed in a folder since an opaque cursor
(headers only), fetch one whole message, send one message, file a copy in Sent and
wait for a push from the server. It never decides a rule (membership, attachment
limit, routing, Labs) and never touches the database: the kernel does that with
what the provider returns.

Lifecycle, driven by the kernel::

    account = MyProvider.prepare(email, options, credentials)  # validate, no network
    provider = MyProvider(account, settings)
    await provider.open()           # log in; AuthenticationFailed if rejected
    folders = await provider.folders()
    batch = await provider.changes(folder, cursor)           # repeat while batch.more
    raws = await provider.fetch_many(folder, refs)           # members only (R5);
                                                             # default: fetch() each
    await provider.send(mail, checkpoint)
    await provider.store_sent_copy(mail)
    await provider.wait_for_changes(timeout)
    await provider.close()

All methods are coroutines and must not block the event loop. Errors must be
translated into :mod:`threadsync.core.errors` (``AuthenticationFailed``,
``TransientProviderError``, ``ProviderProtocolError``) before they leave the
provider.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from threadsync.core.errors import ConfigError
from threadsync.core.network import NetworkPolicy

FolderRole = Literal["inbox", "sent"]

#: Awaited by a provider immediately before the step after which the message may
#: have left (the line that ends SMTP DATA, Graph ``/send``). The kernel commits
#: "transmitting" there, so that after a crash it knows whether a re-send could
#: duplicate.
Checkpoint = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class ProviderOption:
    """One option a provider takes at connect time (``--imap-host`` and so on).

    ``name`` is a Python identifier; the CLI shows it as ``--name-with-dashes``.
    ``secret_env`` marks an option whose value names an environment variable that
    holds a secret (``--password-env VAR``). The kernel resolves it before the
    provider is called: from the variable on the command line, or from the value a
    caller passed directly (the HTTP API's ``credentials``), and hands the provider
    the secret under the option's name without ``_env`` (``credentials["password"]``).
    The secret is stored encrypted, never the variable's name alone.
    """

    name: str
    help: str
    type: type = str
    required: bool = False
    default: Any = None
    choices: Sequence[str] | None = None
    secret_env: bool = False


def option_flag(opt: ProviderOption) -> str:
    """How the command line spells ``opt``: ``--password-env``."""
    return "--" + opt.name.replace("_", "-")


def option_bool(value: Any, flag: str) -> bool:
    """A yes/no option as given on the command line, in JSON or in config:
    ``true``/``yes``/``on``/``1`` or ``false``/``no``/``off``/``0`` (absent or
    empty: no). Anything else is a ``ConfigError`` naming ``flag``."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0", ""):
        return False
    raise ConfigError(f"{flag} must be true or false, not {value!r}")


def secret_name(opt: ProviderOption) -> str:
    """The name a ``secret_env`` option's value goes by once resolved: ``password``
    for ``password_env`` (also the HTTP API's ``credentials`` key)."""
    return opt.name.removesuffix("_env")


def resolve_credentials(
    options_of: Sequence[ProviderOption],
    options: Mapping[str, Any],
    environ: Mapping[str, str],
    given: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The values of the secret options among ``options_of``: given directly in
    ``given`` (by :func:`secret_name`), or read from the environment variable an
    option names (``--password-env VAR``). The kernel calls this before any
    provider method that takes ``credentials``."""
    found: dict[str, str] = {}
    for opt in options_of:
        if not opt.secret_env:
            continue
        key = secret_name(opt)
        if given is not None and key in given:
            found[key] = given[key]
        elif options.get(opt.name) is not None:
            var = str(options[opt.name])
            if var not in environ:
                raise ConfigError(f"environment variable {var} is not set")
            found[key] = environ[var]
    return found


@dataclass
class Account:
    """What a provider needs to reach one mailbox.

    ``settings`` holds non-secret options (hosts, ports, security, folder names);
    ``secrets`` holds passwords or tokens. The kernel stores ``secrets`` encrypted
    (R11) and hands both back on every start. A provider that refreshes a token
    updates ``secrets`` in place and sets ``secrets_changed``; the kernel then
    stores the new value.
    """

    email: str
    settings: dict[str, Any] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    secrets_changed: bool = False
    #: The network policy the hosts of this account are held to at every connect,
    #: set by the kernel when a tenant named them (:mod:`threadsync.core.network`);
    #: ``None`` when the operator did. A provider that opens sockets to hosts from
    #: ``settings`` connects through :func:`threadsync.core.network.open_socket`
    #: with it, and tells the tenant no more than that it could not connect.
    network: NetworkPolicy | None = None


@dataclass(frozen=True)
class ConsentRequest:
    """The first half of a sign-in that a browser redirect finishes (OAuth 2.0
    authorization code): where to send the user, and what the second half needs.

    ``state`` is the value the redirect carries back; the kernel finds the
    sign-in by it (it keeps only its SHA-256). ``flow`` is whatever
    :meth:`Provider.finish_consent` needs (the PKCE verifier, the nonce): JSON
    values only, stored encrypted until the redirect arrives, then deleted.
    """

    url: str
    state: str
    flow: Mapping[str, Any]
    #: How long the user has to consent.
    expires_in: float = 900.0


@dataclass(frozen=True)
class Folder:
    """A folder the kernel watches. ``name`` is the provider's own name or id."""

    name: str
    role: FolderRole


@dataclass(frozen=True)
class HeaderSummary:
    """The headers of one message, enough for the kernel to decide membership.

    ``ref`` is the provider's id for the message inside ``folder`` (an IMAP UID as a
    string, a Graph immutable id). Message-IDs are given with angle brackets, as in
    the header (``<abc@host>``); ``references`` in header order.

    Build it with its fields, or from a raw header block with
    :func:`threadsync.core.mime.summarize_headers`. Such a summary decodes ``sender``,
    ``subject`` and ``date`` only when they are first read (the kernel reads them
    only for members of synced threads) and is otherwise the same: equal to one
    built with the same values.
    """

    ref: str
    message_id: str | None
    in_reply_to: tuple[str, ...] = ()
    references: tuple[str, ...] = ()
    sender: str | None = None
    subject: str | None = None
    date: str | None = None
    size: int | None = None


@dataclass
class ChangeBatch:
    """What :meth:`Provider.changes` returns.

    ``cursor`` is JSON-serialisable and opaque to the kernel, which stores it in the
    same transaction as the messages it accepted from this batch and passes it back
    next time. ``more`` says another call right away would return more headers.
    ``reset`` says the old cursor was no longer valid (IMAP UIDVALIDITY change,
    Graph ``410 Gone``): ``headers`` then restart from the folder's beginning and the
    kernel deduplicates by Message-ID. ``vanished`` lists refs that were removed,
    when the provider knows (informational).
    """

    headers: list[HeaderSummary]
    cursor: dict[str, Any]
    more: bool = False
    reset: bool = False
    vanished: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OutgoingMail:
    """A message ready to leave: the complete RFC 5322 bytes and its envelope.

    ``raw`` already carries ``Message-ID``, ``In-Reply-To`` and ``References``; it
    never carries ``Bcc``. ``recipients`` is the SMTP envelope (To, Cc and Bcc).
    """

    raw: bytes
    message_id: str
    sender: str
    recipients: tuple[str, ...]


class Provider(ABC):
    """Base class for mailbox providers. Subclass it and register the class.

    Class attributes:

    * ``name``: unique provider name used in config and on the command line.
    * ``title``: one line for people (``threadsync plugins``).
    * ``options``: what ``connect`` accepts for this provider.
    * ``files_sent_copy``: ``True`` when the server itself files sent mail in Sent
      (Gmail, Graph); the kernel then does not call :meth:`store_sent_copy`.
    """

    name: ClassVar[str]
    title: ClassVar[str] = ""
    options: ClassVar[Sequence[ProviderOption]] = ()

    def __init__(self, account: Account, settings: Mapping[str, Any] | None = None) -> None:
        #: Mailbox address, options and secrets of this connection.
        self.account = account
        #: Kernel-wide settings for providers (timeouts, chunk sizes); may be empty.
        self.settings: Mapping[str, Any] = settings or {}
        self._woken = asyncio.Event()

    # ---- set-up -----------------------------------------------------------------

    @classmethod
    def prepare(
        cls, email: str, options: Mapping[str, Any], credentials: Mapping[str, str]
    ) -> Account:
        """Validate connect options and build the :class:`Account`; no network.

        ``credentials`` holds the values of the ``secret_env`` options, already
        resolved by the kernel, under each option's name without ``_env``. The
        default copies every other declared option into ``settings`` and those
        secrets into the account's ``secrets``. Raise
        :class:`threadsync.core.errors.ConfigError` for anything missing or unusable.
        """
        settings: dict[str, Any] = {}
        kept: dict[str, str] = {}
        for opt in cls.options:
            if opt.secret_env:
                key = secret_name(opt)
                if key in credentials:
                    kept[key] = credentials[key]
                elif opt.required:
                    raise ConfigError(f"provider {cls.name!r} needs {option_flag(opt)}")
                continue
            value = options.get(opt.name, opt.default)
            if value is None:
                if opt.required:
                    raise ConfigError(f"provider {cls.name!r} needs {option_flag(opt)}")
                continue
            if opt.choices is not None and value not in opt.choices:
                raise ConfigError(
                    f"{opt.name} must be one of {', '.join(opt.choices)}, not {value!r}"
                )
            settings[opt.name] = value
        return Account(email=email, settings=settings, secrets=kept)

    @classmethod
    async def authorize(
        cls,
        email: str,
        options: Mapping[str, Any],
        credentials: Mapping[str, str],
        notify: Callable[[str], None],
        settings: Mapping[str, Any],
    ) -> Account:
        """Obtain the credentials for ``email`` at connect / update-email time.

        May involve the user: an OAuth consent URL or a device code is shown with
        ``notify(text)`` and the call waits for the user to finish. ``settings``
        is this provider's section of config.toml (e.g. ``[outlook]``: tenant,
        client id). The default needs no interaction and returns
        :meth:`prepare`'s account.
        """
        return cls.prepare(email, options, credentials)

    @classmethod
    async def begin_consent(
        cls,
        email: str,
        options: Mapping[str, Any],
        credentials: Mapping[str, str],
        settings: Mapping[str, Any],
        redirect_uri: str,
    ) -> ConsentRequest | None:
        """Start a sign-in that the user finishes in a browser, which comes back to
        ``redirect_uri`` (the host's ``/oauth/callback``).

        Used instead of :meth:`authorize` where the caller cannot wait for the
        user (the HTTP API). Return ``None`` (the default) when these options
        need no redirect; the host then calls :meth:`authorize`. No secret may
        appear in the returned URL.
        """
        return None

    @classmethod
    async def finish_consent(
        cls,
        email: str,
        options: Mapping[str, Any],
        credentials: Mapping[str, str],
        settings: Mapping[str, Any],
        flow: Mapping[str, Any],
        params: Mapping[str, str],
    ) -> Account:
        """Finish what :meth:`begin_consent` started, with the redirect's
        parameters (``code``, ``state``, or ``error``); return the account as
        :meth:`authorize` would. Raise ``AuthenticationFailed`` when the user
        declined or the code is refused."""
        raise ConfigError(f"provider {cls.name!r} has no redirect sign-in")

    # ---- session ----------------------------------------------------------------

    @abstractmethod
    async def open(self) -> None:
        """Connect and log in. Raise ``AuthenticationFailed`` if credentials are
        rejected, ``TransientProviderError`` if the server cannot be reached."""

    @abstractmethod
    async def close(self) -> None:
        """Log out and release every socket and task. Safe to call twice."""

    async def verify(self) -> None:
        """Check that every part of the account works (e.g. IMAP *and* SMTP login).

        Called once by ``connect`` and ``update-email`` after :meth:`open`. The
        default does nothing beyond what :meth:`open` checked.
        """

    # ---- reading ----------------------------------------------------------------

    @abstractmethod
    async def folders(self) -> list[Folder]:
        """The folders to watch: exactly one ``inbox`` and one ``sent``."""

    @abstractmethod
    async def changes(
        self, folder: Folder, cursor: Mapping[str, Any] | None, limit: int = 250
    ) -> ChangeBatch:
        """Headers of messages added to ``folder`` since ``cursor``, at most ``limit``.

        With ``cursor=None`` (a new connection) return no headers and a cursor at
        the folder's current end: history before the connection is never read.
        Only headers may be read here, never bodies (R5), and the user's flags
        (``\\Seen``) must not change.
        """

    @abstractmethod
    async def fetch(self, folder: Folder, ref: str) -> bytes:
        """The complete raw message ``ref`` of ``folder``, without marking it read."""

    async def fetch_many(self, folder: Folder, refs: Sequence[str]) -> dict[str, bytes]:
        """The complete raw messages ``refs`` of ``folder`` by ref, none marked read.

        The kernel fetches the members of a batch with this, a few at a time
        (bounded by count and by their sizes). Override it where one request can
        carry several messages (IMAP ``UID FETCH 3,7,9``); the default calls
        :meth:`fetch` for each ref. Fails as :meth:`fetch` does when one is missing.
        """
        return {ref: await self.fetch(folder, ref) for ref in refs}

    async def wait_for_changes(self, timeout: float) -> bool:
        """Wait until the server reports a change (IMAP IDLE, a push) or ``timeout``.

        Return ``True`` when something changed, ``False`` on timeout or when
        :meth:`wake` was called. The default just sleeps (providers without push
        are polled), waking early on :meth:`wake`.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._woken.wait(), timeout)
        self._woken.clear()
        return False

    def wake(self) -> None:
        """Make a running :meth:`wait_for_changes` return early (``False``).

        Called by the kernel, from the event loop, when it has work for this
        connection (CRM mail queued by another process). Harmless when nothing is
        waiting. Providers that override :meth:`wait_for_changes` override this too.
        """
        self._woken.set()

    # ---- writing ----------------------------------------------------------------

    #: ``True`` if the server files sent mail in Sent by itself.
    files_sent_copy: ClassVar[bool] = False

    @abstractmethod
    async def send(self, mail: OutgoingMail, checkpoint: Checkpoint) -> None:
        """Send ``mail`` through the mailbox.

        Await ``checkpoint()`` immediately before the step after which the message
        may have left (for SMTP: inside DATA, before the line that ends it; use
        :func:`threadsync.core.outbox.smtp_data.send_data`), and not earlier: before it, a crash
        means "not sent"; after it, the kernel will look in Sent before ever
        sending again.
        """

    async def store_sent_copy(self, mail: OutgoingMail) -> None:
        """File ``mail`` in the Sent folder (IMAP APPEND). Called after :meth:`send`
        unless ``files_sent_copy`` is true. Default: nothing."""

    @abstractmethod
    async def find_sent(self, message_id: str) -> bool:
        """Whether a message with this Message-ID is in the Sent folder."""

    async def forget(self) -> None:
        """Release what the server keeps for this connection (push subscriptions),
        at disconnect and update-email (R6), before the credentials are deleted.
        Called on an opened provider; best effort. Default: nothing."""
