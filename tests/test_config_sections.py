"""config.toml is checked against what the kernel and the plugins declare: a
misspelt key or section is a clear error (exit 2) naming the closest valid one,
never a silently ignored setting; plugins declare their sections with the
``config_sections`` hook and may not claim another plugin's section."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Collection, Mapping
from pathlib import Path

import pytest

from threadsync.core.config import check_sections, from_mapping
from threadsync.core.errors import ConfigError
from threadsync.core.hookspecs import hookimpl
from threadsync.core.registry import config_sections, get_plugin_manager

ROOT = Path(__file__).resolve().parent.parent


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "--config", str(config), *args],
        capture_output=True, text=True, timeout=60, cwd=config.parent,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("toml", "named", "closest"),
    [
        ("[sync]\npoll_intervall_seconds = 30\n", "poll_intervall_seconds", "poll_interval"),
        ("[outbound.default]\nhots = 'x'\n", "hots", "host"),
        ("[htpp]\nlisten = '127.0.0.1:8080'\n", "[htpp]", "http"),
        ("[http]\nlisen = '127.0.0.1:8080'\n", "lisen", "listen"),
        ("[webhooks]\nallowed_network = []\n", "allowed_network", "allowed_networks"),
        ("[outlook]\nclient_idd = 'x'\n", "client_idd", "client_id"),
        ("[mailserver]\ndatadir = 'mail'\n", "datadir", "data_dir"),
        ("sync = 3\n", "[sync]", "table"),
        ("sinc = 3\n", "'sinc'", "sync"),
    ],
)
def test_an_unknown_key_or_section_is_refused_naming_the_closest(
    tmp_path: Path, toml: str, named: str, closest: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(toml, encoding="utf-8")
    for command in (("status", "acme"), ("mailserver", "--list-outside")):
        out = cli(config, *command)
        assert out.returncode == 2, (command, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr
        assert named in out.stderr and closest in out.stderr, out.stderr


def test_the_embedded_config_and_every_documented_section_pass(tmp_path: Path) -> None:
    settings = from_mapping(
        {
            "http": {"listen": "127.0.0.1:8080", "idempotency_hours": 24},
            "webhooks": {"allowed_networks": [], "dead_retention_days": 30},
            "outlook": {"client_id": "x", "client_secret_env": "S"},
            "mailserver": {"data_dir": "mail", "smtp_port": 2525},
        },
        base=tmp_path,
    )
    check_sections(settings, config_sections(get_plugin_manager()))
    out = cli(ROOT / "config.toml", "--help")
    assert out.returncode == 0, out.stderr


class Claims:
    def __init__(self, sections: Mapping[str, Collection[str]]) -> None:
        self.sections = sections

    @hookimpl
    def config_sections(self) -> Mapping[str, Collection[str]]:
        return self.sections


def test_a_plugin_declares_its_section_and_cannot_take_anothers(tmp_path: Path) -> None:
    settings = from_mapping({"crm_bridge": {"endpoint": "https://crm.example"}}, base=tmp_path)
    with pytest.raises(ConfigError, match=r"unknown section \[crm_bridge\]"):
        check_sections(settings, config_sections(get_plugin_manager()))
    pm = get_plugin_manager([Claims({"crm_bridge": ["endpoint"]})])
    check_sections(settings, config_sections(pm))
    with pytest.raises(ConfigError, match=r"\[http\] is claimed by"):
        config_sections(get_plugin_manager([Claims({"http": ["listen"]})]))
