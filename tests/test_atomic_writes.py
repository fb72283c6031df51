"""One atomic writer (issue 31): every result or state file the package writes goes
through ``core.fsio`` (a temporary file renamed over the target, removed on failure), so
an interrupted write leaves the old file and no debris.

The scan lists every call in the package that writes a file by itself (``write_text``,
``to_csv(path)``, ``to_parquet``, ``savefig``, ``np.save``, ``json.dump``, ``open(.., "w")``
...) outside a ``with atomic_path(...) as tmp`` / ``atomic_write(...) as fh`` block that
writes to ``tmp`` / ``fh``. Each one left is in :data:`KNOWN` with the reason it is safe
(or whose module it is in), so the test fails on any new one, and on one that is gone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import napari_wsdino
from napari_wsdino.core import fsio

PACKAGE = Path(napari_wsdino.__file__).parent
#: Calls that write a file by themselves, by attribute name.
WRITERS = {"write_text", "write_bytes", "to_csv", "to_parquet", "savefig", "imwrite"}

#: (module, enclosing function, call): why each is not a plain write of a result or state.
KNOWN = {
    # writers that write_file_set hands a unique temporary path (renamed as a set)
    ("core/evaluate_workflow.py", "evaluation_files", "to_csv"),
    ("core/evaluate_workflow.py", "evaluation_files", "write_text"),
    # a file in a temporary folder that is renamed into place as a whole
    ("_napari/sample_data.py", "sample_replica", "write_text"),
    ("core/fetch/archive.py", "unpack_plate", "open"),
    # into memory (BytesIO), not a file
    ("core/figures.py", "png_bytes", "savefig"),
    # input images (the replica, tests), not results: written once into a new folder
    ("core/imageio.py", "write_tiff", "imwrite"),
    # an append-only log, one line per epoch
    ("core/train/checkpoint.py", "end_epoch", "open"),
    # a download's .part file, renamed once its hash is checked
    ("core/pretrained.py", "_download", "open"),
    # the embed parts: chunks to a unique temporary name renamed over the chunk
    ("core/embed/parts.py", "save_chunk", "save"),
    # the synthetic replica's design tables and records: input data written into a new
    # folder (core/synth/ is worked on elsewhere)
    ("core/synth/__init__.py", "_write_record", "write_text"),
    ("core/synth/cellpainting.py", "write_load_data", "to_csv"),
    ("core/synth/cellpainting.py", "write_load_data", "write_text"),
    ("core/synth/design.py", "write_design", "to_csv"),
}


def _safe_targets(node: ast.With) -> set[str]:
    """The names a ``with atomic_path(..) as tmp`` / ``atomic_write(..) as fh`` binds."""
    names = set()
    for item in node.items:
        call = item.context_expr
        name = getattr(getattr(call, "func", None), "id", None) or getattr(
            getattr(call, "func", None), "attr", None)
        if name in ("atomic_path", "atomic_write") and item.optional_vars is not None:
            names.add(ast.unparse(item.optional_vars))
    return names


def _write_kind(node: ast.Call, safe: set[str]) -> str | None:
    """What file-writing call ``node`` is (``None``: not one, or into a safe target)."""
    func = node.func
    args = [ast.unparse(a) for a in node.args]
    if isinstance(func, ast.Name) and func.id == "open" and len(args) > 1:
        return "open" if any(c in args[1] for c in "wax") and args[0] not in safe else None
    if not isinstance(func, ast.Attribute):
        return None
    owner = ast.unparse(func.value)
    if func.attr in ("save", "dump") and owner in ("np", "numpy", "json"):
        target = args[1] if func.attr == "dump" and len(args) > 1 else args[0] if args else ""
        return func.attr if target not in safe else None
    if func.attr not in WRITERS or (func.attr == "to_csv" and not args):
        return None  # to_csv() with no path returns the text
    target = owner if func.attr in ("write_text", "write_bytes") else (args[0] if args else "")
    return func.attr if target not in safe else None


def file_writes(root: Path = PACKAGE) -> dict[tuple[str, str, str], list[int]]:
    """Every plain file write in the package (see module docstring), outside core/fsio.py."""
    found: dict[tuple[str, str, str], list[int]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "core/fsio.py":
            continue

        def visit(node, func: str, safe: set[str]) -> None:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                func = node.name
            if isinstance(node, ast.With):
                safe = safe | _safe_targets(node)
            if isinstance(node, ast.Call):
                kind = _write_kind(node, safe)
                if kind:
                    found.setdefault((rel, func, kind), []).append(node.lineno)
            for child in ast.iter_child_nodes(node):
                visit(child, func, safe)

        visit(ast.parse(path.read_text()), "<module>", set())
    return found


def test_every_result_and_state_file_goes_through_the_atomic_writer():
    found = file_writes()
    new = {k: v for k, v in found.items() if k not in KNOWN}
    gone = KNOWN - set(found)
    assert not new, f"write through core.fsio (atomic_write_text / atomic_path): {new}"
    assert not gone, f"no longer written in place, remove from KNOWN: {sorted(gone)}"


def test_the_scan_sees_plain_writes_and_passes_atomic_ones(tmp_path):
    (tmp_path / "m.py").write_text(
        "import json\nimport numpy as np\n"
        "from napari_wsdino.core.fsio import atomic_path, atomic_write\n"
        "def plain(p, d):\n    p.write_text('x')\n    d.to_csv(p)\n    np.save(p, 1)\n"
        "    json.dump({}, open(p, 'w'))\n    d.to_csv(index=False)\n"
        "def safe(p, d):\n    with atomic_path(p) as tmp:\n        d.to_parquet(tmp)\n"
        "    with atomic_write(p, 'w') as fh:\n        json.dump({}, fh)\n")
    assert sorted(file_writes(tmp_path)) == [
        ("m.py", "plain", k) for k in ("dump", "open", "save", "to_csv", "write_text")]


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_an_interrupted_profile_write_keeps_the_old_file(tmp_path, monkeypatch, suffix):
    """Ctrl-C while ProfileTable.write writes (pandas half-way through) leaves the file
    that was there, whole, and no temporary file."""
    from napari_wsdino.core.profiles import ProfileTable

    meta = pd.DataFrame({"Metadata_Plate": ["p1", "p2"], "Metadata_MoA": ["DMSO", "A"]})
    path = ProfileTable(meta, np.ones((2, 3), np.float32), ["f0", "f1", "f2"]).write(
        tmp_path / f"profiles{suffix}")
    before = path.read_bytes()
    method = "to_parquet" if suffix == ".parquet" else "to_csv"

    def cut_short(self, target, *args, **kwargs):
        Path(target).write_bytes(b"PAR1 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, method, cut_short)
    with pytest.raises(KeyboardInterrupt):
        ProfileTable(meta, np.zeros((2, 3), np.float32), ["f0", "f1", "f2"]).write(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_an_interrupted_figure_keeps_the_old_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from napari_wsdino.core.figures import save_figure

    path = save_figure(Figure(figsize=(1, 1)), tmp_path / "per_moa.png")
    before = path.read_bytes()

    def cut_short(self, target, *args, **kwargs):
        Path(target).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", cut_short)
    with pytest.raises(KeyboardInterrupt):
        save_figure(Figure(figsize=(2, 2)), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["per_moa.png"]


def test_atomic_path_keeps_the_suffix_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "t.csv.gz"
    with fsio.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".t.csv.gz") and tmp != target
        pd.DataFrame({"a": [1]}).to_csv(tmp, index=False)  # gzip chosen by the suffix
    assert pd.read_csv(target)["a"].tolist() == [1]
    with pytest.raises(ValueError):
        with fsio.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise ValueError("failed")
    assert pd.read_csv(target)["a"].tolist() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv.gz"]
