"""The example third-party plugin (examples/threadsync-maildir), installed the way a
user installs one and loaded through the real plugin path.

A wheel is built from a copy of the example's sources and installed into a
throw-away virtual environment that sees this environment's packages, so this
environment is never changed. (A ``.pth`` file adds this environment's
site-packages; ``--system-site-packages`` would not, when this environment is
itself a virtual environment.) In that environment: ``threadsync plugins``
lists the provider, the example's own test suite (threadsync's provider
contract) passes, and the CLI syncs with it.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "threadsync-maildir"
_IGNORE = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache")


def run(
    *args: str | Path, cwd: Path = ROOT, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "", **(env or {})},
    )
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def build_wheel(source: Path, out: Path) -> Path:
    """pip builds the wheel as for any package; without an index it can only use
    the build backend installed here."""
    args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out)]
    try:
        run(*args, source, timeout=300)
    except AssertionError:
        run(*args, "--no-build-isolation", source, timeout=300)
    (wheel,) = out.glob("threadsync_maildir-*.whl")
    return wheel


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(python of a venv with the example installed, the copied example sources)."""
    tmp = tmp_path_factory.mktemp("example-plugin")
    source = tmp / "src"
    shutil.copytree(EXAMPLE, source, ignore=_IGNORE)
    wheel = build_wheel(source, tmp / "dist")
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    outer = [
        *site.getsitepackages(),
        *([site.getusersitepackages()] if site.ENABLE_USER_SITE else []),
    ]
    Path(purelib.stdout.strip(), "outer-environment.pth").write_text(
        "".join(f"import site; site.addsitedir({path!r})\n" for path in outer), encoding="utf-8"
    )
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheel)
    return python, source


def plugins_json(python: Path | str) -> dict[str, dict[str, str]]:
    out = run(python, ROOT / "cli.py", "--json", "plugins").stdout
    return {p["name"]: p for p in json.loads(out)["providers"]}


def test_threadsync_plugins_lists_the_installed_example(example: tuple[Path, Path]) -> None:
    python, source = example
    found = plugins_json(python)
    assert found["maildir"]["plugin"] == "maildir"
    assert "example plugin" in found["maildir"]["title"]
    assert found["imap_smtp"]["plugin"] == "imap_smtp"
    assert "maildir" in run(python, ROOT / "cli.py", "plugins").stdout
    where = run(
        python, "-c", "import threadsync_maildir as m; print(m.__file__)", cwd=source.parent
    )
    assert "site-packages" in where.stdout and str(source) not in where.stdout
    # This environment was left alone.
    assert "maildir" not in plugins_json(sys.executable)


def test_the_example_passes_the_provider_contract(example: tuple[Path, Path]) -> None:
    python, source = example
    # Run from outside the sources, so the installed package is what gets imported.
    proc = run(
        python, "-m", "pytest", "-q", "-p", "no:cacheprovider", source / "tests", cwd=source.parent
    )
    summary = proc.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary, proc.stdout
    # Skipped, as they should be for this provider: no credentials, no push.
    assert summary.startswith("14 passed, 2 skipped"), proc.stdout


def test_the_cli_sends_through_the_example_provider(
    example: tuple[Path, Path], tmp_path: Path
) -> None:
    python, _ = example
    maildir, pickup = tmp_path / "Maildir", tmp_path / "pickup"
    for folder in (maildir, maildir / ".Sent", pickup):
        for sub in ("cur", "new", "tmp"):
            (folder / sub).mkdir(parents=True)
    config = tmp_path / "config.toml"
    config.write_text(
        '[database]\nurl = "sqlite:///ts.db"\n[security]\nsecret_key_file = "secret.key"\n',
        encoding="utf-8",
    )

    def cli(*args: str) -> dict[str, object]:
        out = run(python, ROOT / "cli.py", "--config", config, "--json", *args, cwd=tmp_path)
        result: dict[str, object] = json.loads(out.stdout)
        return result

    cli("init")
    cli("labs", "enable", "acme")
    connected = cli(
        "connect",
        "acme",
        "u1",
        "--provider",
        "maildir",
        "--email",
        "ann@example.test",
        "--maildir",
        str(maildir),
        "--pickup-dir",
        str(pickup),
    )
    assert connected["state"] == "connected" and connected["provider"] == "maildir"
    sent = cli(
        "send", "acme", "u1", "--to", "carla@example.org", "--subject", "Offer", "--text", "Hello"
    )
    assert (sent["channel"], sent["synced"], sent["status"]) == ("mailbox", True, "sent")
    (picked,) = (pickup / "new").iterdir()
    assert str(sent["message_id"]).encode() in picked.read_bytes()
    assert b"X-Envelope-To: carla@example.org" in picked.read_bytes()
    (copy,) = (maildir / ".Sent" / "cur").iterdir()
    assert copy.name.endswith(":2,S")
