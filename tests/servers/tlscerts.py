"""Throwaway TLS material for the test mail servers.

``make_test_ca`` creates a private certificate authority and one server
certificate valid for ``127.0.0.1``, ``::1`` and ``localhost``, signed by that
CA, all written as PEM files into a directory. Clients verify the servers with
:meth:`TestCA.client_context`, which trusts only this CA, so a test that
passes proves real certificate verification (hostname included) took place.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from threadsync.plugins.localmail.tls import ensure_certificate

__all__ = ["TestCA", "make_test_ca"]


@dataclass
class TestCA:
    """A test CA and the server certificate it issued (PEM file paths)."""

    __test__ = False  # not a pytest test class despite the name

    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA and checks host names."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def server_context(self) -> ssl.SSLContext:
        """A server context presenting the server certificate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context


def make_test_ca(directory: Path) -> TestCA:
    """Create ``ca.pem``, ``server.pem`` and ``server.key`` in *directory*.

    The same material the local mail system makes for itself
    (:func:`threadsync.plugins.localmail.tls.ensure_certificate`): a private CA and a
    server certificate for ``localhost``, ``127.0.0.1`` and ``::1``. The files
    are world-readable except the key (mode 0600, owned by the caller); servers
    that drop privileges read the key before doing so.
    """
    made = ensure_certificate(directory)
    return TestCA(ca_file=made.ca_file, cert_file=made.cert_file, key_file=made.key_file)
