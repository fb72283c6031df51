"""Packaging: the manifest ships in the wheel, napari finds the plugin, core stays Qt-free."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_core_imports_no_gui():
    code = (
        "import sys, importlib, pkgutil, napari_wsdino.core as c\n"
        "for m in pkgutil.walk_packages(c.__path__, 'napari_wsdino.core.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in ('napari', 'qtpy', 'magicgui', 'superqt', 'PyQt5') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_cli_help_lists_commands():
    res = subprocess.run([sys.executable, "-m", "napari_wsdino.cli", "--help"],
                         capture_output=True, text=True)
    assert res.returncode == 0
    assert "info" in res.stdout


def test_every_subcommand_module_registers_a_command():
    import importlib

    from napari_wsdino import cli

    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    for name in cli.SUBCOMMANDS:
        module = importlib.import_module(f"napari_wsdino.cli.{name}")
        registered = {n for n, p in sub.choices.items()
                      if p.get_default("func") is getattr(module, "run", None)}
        assert registered, f"napari_wsdino.cli.{name} registers no command with func=run"


def test_missing_subcommand_module_is_an_error(monkeypatch):
    """A name in SUBCOMMANDS without its module is a packaging bug: an error that
    names the module and the fix, not a command silently missing from --help."""
    from napari_wsdino import cli

    monkeypatch.setattr(cli, "SUBCOMMANDS", (*cli.SUBCOMMANDS, "no_such_command"))
    with pytest.raises(ImportError, match=r"'no_such_command'.*is missing.*Reinstall") as info:
        cli.build_parser()
    assert info.value.name == "napari_wsdino.cli.no_such_command"
    assert not isinstance(info.value, ModuleNotFoundError)


def test_subcommand_with_a_missing_dependency_reraises_that_error(monkeypatch):
    """A module the subcommand imports being missing is reported as itself (its name
    tells the user what to install), not as a missing subcommand."""
    import importlib

    from napari_wsdino import cli

    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name == "napari_wsdino.cli.needs_dep":
            raise ModuleNotFoundError("No module named 'some_extra'", name="some_extra")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(cli.importlib, "import_module", fake)
    monkeypatch.setattr(cli, "SUBCOMMANDS", ("info", "needs_dep"))
    with pytest.raises(ModuleNotFoundError) as info:
        cli.build_parser()
    assert info.value.name == "some_extra"


def test_installed_manifest_validates():
    """`npe2 validate` on the installed (editable) distribution."""
    res = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-wsdino"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "valid" in (res.stdout + res.stderr).lower()


def test_one_manifest_file():
    """The package's napari.yaml is the only real manifest; the top-level napari.yaml (the
    project layout asks for one) is a relative link to it, so the two cannot drift."""
    real, link = ROOT / "napari_wsdino" / "napari.yaml", ROOT / "napari.yaml"
    assert real.is_file() and not real.is_symlink()
    assert link.is_symlink() and os.readlink(link) == "napari_wsdino/napari.yaml"
    assert link.resolve() == real.resolve()


@pytest.mark.slow
def test_wheel_ships_manifest(tmp_path):
    """The wheel holds napari.yaml (a real file, the package's) and the entry point napari
    uses to find it."""
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    (wheel,) = tmp_path.glob("napari_wsdino-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = zf.getinfo("napari_wsdino/napari.yaml")
        assert (info.external_attr >> 16) & 0o170000 != 0o120000  # not stored as a link
        assert zf.read(info) == (ROOT / "napari_wsdino" / "napari.yaml").read_bytes()
        eps = next(n for n in names if n.endswith("entry_points.txt"))
        text = zf.read(eps).decode()
        assert "napari.manifest" in text and "napari_wsdino:napari.yaml" in text
        assert "napari_wsdino/data/BBBC021_v1_image.csv" in names
        from napari_wsdino.core.pretrained import BUNDLED      # the cpu preset's init

        for bundled in BUNDLED.values():
            assert f"napari_wsdino/weights/{bundled.file}" in names
        assert not any(n.startswith("tests/") for n in names)
    # The manifest validates from the unpacked wheel too.
    from npe2 import PluginManifest

    out = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(out)
    manifest = PluginManifest.from_file(out / "napari_wsdino" / "napari.yaml")
    assert manifest.name == "napari-wsdino"
    # Installed from the wheel (ahead of the editable copy on sys.path), napari finds it.
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                          "--target", str(target), str(wheel)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    # cwd outside the checkout, so that only the wheel's copy is importable first.
    res = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-wsdino"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    code = ("import importlib.metadata as md, napari_wsdino; "
            "print(napari_wsdino.__file__, md.distribution('napari-wsdino')._path)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    pkg_file, dist_path = res.stdout.split()
    assert pkg_file.startswith(str(target)) and dist_path.startswith(str(target)), res.stdout


#: Issue 17's limits: rooms small enough to read in one sitting.
MAX_MODULE_LINES, MAX_CORE_FUNCTION_LINES = 500, 80


def test_no_module_over_500_lines_and_no_core_function_over_80():
    import ast

    package = ROOT / "napari_wsdino"
    too_long = [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted(package.rglob("*.py"))
                if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    for path in sorted((package / "core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_CORE_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, "split these by job (docs/ARCHITECTURE.md): " + "; ".join(too_long)

