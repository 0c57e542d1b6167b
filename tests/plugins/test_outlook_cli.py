"""``threadsync connect --provider outlook`` as a person runs it: a real
subprocess prints the Microsoft sign-in address (or the device code) on stderr,
the user consents in a browser (played by the test), and the command completes
on the redirect to its loopback listener."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from tests.fakes import FakeMicrosoft
from tests.fakes.world import MAILBOX
from threadsync.core.api import Threadsync
from threadsync.core.config import load

pytest_plugins = ["tests.fakes.fixtures"]
ROOT = Path(__file__).resolve().parent.parent.parent


def write_config(tmp_path: Path, ms: FakeMicrosoft) -> Path:
    outlook = "".join(
        f"{key} = {json.dumps(value)}\n" for key, value in ms.outlook_settings().items()
    )
    path = tmp_path / "config.toml"
    path.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "ts.db"}"\n'
        f'[security]\nsecret_key_file = "{tmp_path / "secret.key"}"\n'
        f"[outlook]\n{outlook}",
        encoding="utf-8",
    )
    settings = load(path)
    Threadsync.init(settings)
    ts = Threadsync.from_settings(settings)
    ts.labs("acme", enabled=True)
    ts.close()
    return path


async def run_connect(config: Path, ms: FakeMicrosoft, *extra: str) -> tuple[int, Any, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "cli.py"), "--config", str(config), "--json", "connect",
        "acme", "u1", "--provider", "outlook", "--email", MAILBOX, *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **ms.environ()}, cwd=config.parent,
    )
    assert proc.stderr is not None and proc.stdout is not None
    shown = ""
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
        shown += line
        url = re.search(r"https://\S+/authorize\S+", line)
        code = re.search(r"enter the code (\w+)", line)
        if url:
            assert await ms.browse(url.group(0)) == 200
            break
        if code:
            ms.identity.approve_device_code(code.group(1), MAILBOX)
            break
        if not line:
            break
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, json.loads(out or b"null"), shown + err.decode()


async def test_cli_connect_prints_the_consent_address_and_completes_on_redirect(
    ms: FakeMicrosoft, tmp_path: Path
) -> None:
    config = write_config(tmp_path, ms)
    status, result, stderr = await run_connect(config, ms)
    assert status == 0, stderr
    assert (result["provider"], result["email"], result["state"]) == (
        "outlook", MAILBOX, "connected")
    assert "Traceback" not in stderr and ms.app.secret not in stderr
    assert "fake-at-" not in stderr and "fake-rt-" not in stderr


async def test_cli_connect_with_a_device_code(ms: FakeMicrosoft, tmp_path: Path) -> None:
    config = write_config(tmp_path, ms)
    status, result, stderr = await run_connect(config, ms, "--device-code")
    assert status == 0, stderr
    assert result["state"] == "connected" and "microsoft.com/devicelogin" in stderr
