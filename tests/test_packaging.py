"""The installed package: one top-level import name, ``threadsync``, with its public
names, the CLI and the contract kit; every third-party module it imports is a
declared dependency, and the extras say what the kit and the tests need.

The wheel is built from a copy of this tree, the way ``pip install .`` builds
it, and installed into a throw-away virtual environment that sees this
environment's packages (as in tests/test_example_plugin.py).
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_IGNORE = shutil.ignore_patterns(
    "build", "*.egg-info", "__pycache__", ".pytest_cache", ".venv", ".git", "var", "tests",
    "benchmarks", "examples",
)  # fmt: skip


def run(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=_IGNORE)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", tmp / "dist", source,
        cwd=tmp)  # fmt: skip
    (built,) = (tmp / "dist").glob("threadsync-*.whl")
    return built


@pytest.fixture(scope="module")
def venv_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "env"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=venv.parent)
    python = venv / "bin" / "python"
    purelib = run(
        python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=venv
    ).stdout.strip()
    outer = [
        *site.getsitepackages(),
        *([site.getusersitepackages()] if site.ENABLE_USER_SITE else []),
    ]
    Path(purelib, "outer-environment.pth").write_text(
        "".join(f"import site; site.addsitedir({path!r})\n" for path in outer), encoding="utf-8"
    )
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheel, cwd=venv)
    return python


def test_the_wheel_has_one_top_level_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert zf.read(top_level).decode().split() == ["threadsync"]
        (record,) = [n for n in names if n.endswith(".dist-info/RECORD")]
        roots = {line.split(",")[0].split("/")[0] for line in zf.read(record).decode().split()}
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entries = zf.read(entry_points).decode()
    assert {r for r in roots if not r.endswith(".dist-info")} == {"threadsync"}
    for path in ("threadsync/__init__.py", "threadsync/cli.py", "threadsync/core/rules.py",
                 "threadsync/testing/contract.py", "threadsync/plugins/imap_smtp/provider.py",
                 "threadsync/core/store/migrations/versions/0001_initial_schema.py"):  # fmt: skip
        assert path in names
    assert not any(n.startswith(("threadsync/tests/", "threadsync/benchmarks/")) for n in names)
    assert "threadsync = threadsync.cli:main" in entries
    assert "imap_smtp = threadsync.plugins.imap_smtp" in entries


def test_the_installed_package_imports_and_runs(venv_python: Path, tmp_path: Path) -> None:
    out = run(venv_python, "-c",
              "import threadsync, json; print(json.dumps([threadsync.__file__, "
              "repr(threadsync.Provider), sorted(threadsync.__all__)]))",
              cwd=tmp_path).stdout  # fmt: skip
    where, provider, names = json.loads(out)
    assert "site-packages" in where and str(ROOT) not in where
    assert provider == "<class 'threadsync.core.provider.Provider'>"
    assert {"Provider", "hookimpl", "Threadsync", "Draft", "ThreadsyncError"} <= set(names)
    script = venv_python.parent / "threadsync"
    plugins = json.loads(run(script, "--json", "plugins", cwd=tmp_path).stdout)
    assert {p["name"] for p in plugins["providers"]} >= {"imap_smtp", "outlook"}


def test_the_contract_kit_says_which_extra_it_needs(venv_python: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(venv_python), "-c",
         "import sys; sys.modules['pytest'] = None; import threadsync.testing"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "pip install 'threadsync[testing]'" in proc.stderr


# ---- dependencies tell the truth --------------------------------------------------------


def _third_party_imports(paths: Iterable[Path]) -> set[str]:
    found: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    ours = {"threadsync", "tests", "benchmarks"}
    return {n for n in found if n not in sys.stdlib_module_names and n not in ours}


def _distributions(modules: set[str]) -> set[str]:
    by_module = importlib.metadata.packages_distributions()
    return {_norm(by_module[m][0]) for m in modules}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(requirements: Iterable[str]) -> set[str]:
    return {_norm(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]) for r in requirements}


#: Declared but never imported by name: SQLAlchemy loads the PostgreSQL driver from
#: the database URL; exchangelib is the Exchange (EWS) provider's client.
_LOADED_INDIRECTLY = {"psycopg", "exchangelib"}


def test_every_import_is_declared_and_every_dependency_used() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    kit = list((ROOT / "core" / "testing").rglob("*.py"))
    package = [
        p for p in [ROOT / "__init__.py", ROOT / "cli.py", *(ROOT / "core").rglob("*.py"),
                    *(ROOT / "plugins").rglob("*.py")]
        if p not in kit
    ]  # fmt: skip
    runtime = _distributions(_third_party_imports(package))
    declared = _declared(project["dependencies"])
    assert runtime - declared == set(), "imported at runtime but not declared"
    assert declared - runtime - _LOADED_INDIRECTLY == set(), "declared but never imported"
    extras = project["optional-dependencies"]
    kit_needs = _distributions(_third_party_imports(kit)) - declared
    assert kit_needs <= _declared(extras["testing"])
    tests = _distributions(_third_party_imports((ROOT / "tests").rglob("*.py"))) - declared
    # A client library's own parts (msgraph-sdk's kiota, exchangelib's lxml) come with it.
    everything = declared | _declared(extras["test"]) | _declared(extras["testing"])
    assert tests <= _with_requirements(everything)


def _with_requirements(names: set[str]) -> set[str]:
    """``names`` and every distribution they require, as installed here."""
    found, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo.extend(_declared(r for r in requires if "extra ==" not in r))
    return found


def test_the_example_plugin_and_the_guide_use_only_public_names() -> None:
    """A plugin author needs ``threadsync`` and ``threadsync.testing`` only."""
    sources = list((ROOT / "examples").rglob("*.py"))
    guide = (ROOT / "docs" / "plugins.md").read_text()
    used = {
        node.module
        for path in sources
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("threadsync.")
    }
    public_lines = [line for line in guide.splitlines() if not line.endswith("# internal")]
    used |= set(re.findall(r"(?:from|import) (threadsync\.[\w.]+)", "\n".join(public_lines)))
    assert used <= {"threadsync.testing"}
    assert sources and "from threadsync import" in guide
