"""Secrets reach a provider as ``credentials``, resolved once by the kernel: given
directly (the HTTP API's body) or read from the environment variable an option
names (the command line). No caller invents environment variables."""

from __future__ import annotations

import pytest

from threadsync.core.errors import ConfigError
from threadsync.core.provider import resolve_credentials
from threadsync.plugins.imap_smtp import ImapSmtpProvider

OPTIONS = {"imap_host": "imap.example.com", "smtp_host": "smtp.example.com"}


def test_given_credentials_win_and_no_variable_is_needed() -> None:
    found = resolve_credentials(ImapSmtpProvider.options, OPTIONS, {}, {"password": "pw 1"})
    assert found == {"password": "pw 1"}
    account = ImapSmtpProvider.prepare("a@example.com", OPTIONS, found)
    assert account.secrets == {"password": "pw 1"}


def test_a_named_variable_is_read_and_a_missing_one_is_named() -> None:
    options = {**OPTIONS, "password_env": "MAILPW"}
    assert resolve_credentials(ImapSmtpProvider.options, options, {"MAILPW": "s"}) == {
        "password": "s"
    }
    with pytest.raises(ConfigError, match="MAILPW is not set"):
        resolve_credentials(ImapSmtpProvider.options, options, {})


def test_without_any_secret_the_provider_says_which_option_it_needs() -> None:
    with pytest.raises(ConfigError, match="--password-env"):
        ImapSmtpProvider.prepare("a@example.com", OPTIONS, {})
