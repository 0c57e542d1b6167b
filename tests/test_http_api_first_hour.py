"""The HTTP API where the command line and it must agree, through a real
loopback server and the CLI as a subprocess on the same database: a sub-account
threadsync has never seen is 404 on both (the CLI's exit 3)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.kernelfixtures import World, write_config
from tests.test_http_api_support import (  # noqa: F401 (fixtures)
    Api,
    api_factory_fixture,
    api_fixture,
)

ROOT = Path(__file__).resolve().parent.parent


def cli(config: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "--config", str(config), *args],
        cwd=config.parent, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def test_an_unknown_subaccount_is_not_found_on_both(api: Api, world: World, tmp_path: Path) -> None:
    config = write_config(world, tmp_path / "config.toml")
    with api.client(api.admin) as c:
        r = c.get("/v1/subaccounts/nosuchsub/threads")
        assert r.status_code == 404, r.text
        detail = r.json()["detail"]
    assert "nosuchsub" in detail and "Labs" in detail
    err = cli(config, "threads", "nosuchsub", expect=3).stderr
    assert err.strip() == f"error: {detail}"
    # A sub-account threadsync knows (its Labs flag set) and without threads: empty on both.
    cli(config, "labs", "disable", "nosuchsub")
    with api.client(api.admin) as c:
        assert c.get("/v1/subaccounts/nosuchsub/threads").json() == {"threads": []}
    assert cli(config, "threads", "nosuchsub").stdout.strip() == "no threads"
