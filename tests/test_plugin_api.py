"""The plugin API and the contract around it: hooks documented and exercised,
providers registered through one hook with duplicate names refused, misspelt hooks
failing loudly, the error tree complete, the public exports importable."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import threadsync
from threadsync.core import errors, hookspecs
from threadsync.core.errors import ConfigError
from threadsync.core.hookspecs import hookimpl
from threadsync.core.provider import Provider
from threadsync.core.registry import get_plugin_manager, providers

TESTS = Path(__file__).parent


def hook_names() -> list[str]:
    return [
        name
        for name, fn in vars(hookspecs).items()
        if callable(fn) and hasattr(fn, "threadsync_spec")
    ]


def test_every_hook_is_typed_documented_and_exercised_by_a_test() -> None:
    names = hook_names()
    assert set(names) == {
        "register_providers",
        "config_sections",
        "register_commands",
        "register_routes",
        "daemon_services",
        "message_synced",
        "message_skipped",
        "connection_state_changed",
        "thread_stopped",
    }
    corpus = "\n".join(p.read_text(encoding="utf-8") for p in TESTS.rglob("*.py"))
    for name in names:
        fn = getattr(hookspecs, name)
        assert inspect.getdoc(fn), f"hook {name} has no docstring"
        sig = inspect.signature(fn)
        assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values())
        assert f"def {name}(" in corpus, f"no test implements hook {name}"


def test_builtin_provider_comes_through_the_entry_point_group() -> None:
    found = providers(get_plugin_manager())
    assert "imap_smtp" in found
    assert issubclass(found["imap_smtp"].cls, Provider)
    assert found["imap_smtp"].plugin == "imap_smtp"


class _Dup(Provider):
    name = "imap_smtp"

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def folders(self):  # type: ignore[no-untyped-def]
        return []

    async def changes(self, folder, cursor, limit=250):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    async def fetch(self, folder, ref):  # type: ignore[no-untyped-def]
        return b""

    async def send(self, mail, checkpoint):  # type: ignore[no-untyped-def]
        return None

    async def find_sent(self, message_id):  # type: ignore[no-untyped-def]
        return False


class DuplicatePlugin:
    @hookimpl
    def register_providers(self, register):  # type: ignore[no-untyped-def]
        register(_Dup)


class NotAProviderPlugin:
    @hookimpl
    def register_providers(self, register):  # type: ignore[no-untyped-def]
        register(object)


class MisspeltPlugin:
    @hookimpl
    def message_synched(self, payload):  # type: ignore[no-untyped-def]
        pass


def test_duplicate_provider_names_are_an_error() -> None:
    with pytest.raises(ConfigError, match="registered twice"):
        providers(get_plugin_manager([DuplicatePlugin()]))


def test_registering_something_else_is_an_error() -> None:
    with pytest.raises(ConfigError, match="not a Provider"):
        providers(get_plugin_manager([NotAProviderPlugin()], load_entry_points=False))


def test_a_misspelt_hook_fails_loudly() -> None:
    with pytest.raises(ConfigError, match="unknown hook"):
        get_plugin_manager([MisspeltPlugin()], load_entry_points=False)


def test_each_plugin_manager_is_fresh() -> None:
    a, b = get_plugin_manager(), get_plugin_manager()
    assert a is not b
    a.register(DuplicatePlugin())
    assert len(b.get_plugins()) < len(a.get_plugins())


def test_error_tree_is_documented_with_unique_codes() -> None:
    classes = [
        c
        for c in vars(errors).values()
        if inspect.isclass(c) and issubclass(c, errors.ThreadsyncError)
    ]
    assert set(errors.__all__) == {c.__name__ for c in classes}
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes))
    for c in classes:
        assert inspect.getdoc(c), c
        assert c.__name__ in (errors.__doc__ or ""), f"{c.__name__} missing from the tree"
        assert not issubclass(c, (LookupError, OSError, ValueError)), "no shadowed builtins"


def test_public_exports_resolve() -> None:
    for name in threadsync.__all__:
        assert getattr(threadsync, name) is not None
    with pytest.raises(AttributeError):
        threadsync.no_such_name  # noqa: B018


def test_a_package_installed_twice_on_the_path_counts_once(tmp_path: Path) -> None:
    """A virtual environment over the system's site-packages can see two installs of
    one package; the one that imports first wins, like its modules."""
    import subprocess
    import sys

    # The older install elsewhere on the path still names a plugin module that the
    # newer one no longer has.
    for folder, entries in (("first", "dup = json"), ("second", "gone = no_such_module_here")):
        info = tmp_path / folder / "threadsync_dup-1.0.dist-info"
        info.mkdir(parents=True)
        metadata = "Metadata-Version: 2.1\nName: threadsync-dup\nVersion: 1.0\n"
        (info / "METADATA").write_text(metadata)
        (info / "entry_points.txt").write_text(f"[threadsync]\n{entries}\n")
    code = (
        "import sys; sys.path[:0] = sys.argv[1:]\n"
        "from threadsync.core.registry import get_plugin_manager\n"
        "print(get_plugin_manager().get_plugin('dup').__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "first"), str(tmp_path / "second")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (out.returncode, out.stdout.strip()) == (0, "json"), out.stderr
