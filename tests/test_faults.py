"""Bad inputs and faults (issue 16): each names its cause and fix on one line, exits
non-zero (or warns), prints no traceback and loses nothing already computed.

A full disk is simulated by a write that raises ENOSPC (no tmpfs can be mounted here).
"""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_wsdino.cli import main
from napari_wsdino.core import fsio
from napari_wsdino.core import preprocess as pp
from napari_wsdino.core.cache import open_cache
from napari_wsdino.core.imageio import write_tiff
from napari_wsdino.core.metadata import load_metadata
from napari_wsdino.core.progress import Progress, run_to_end
from preprocess_data import write_screen

SHAPE = (32, 40)


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> Path:
    """3 plates x 3 fields x 3 channels, 32 x 40."""
    return write_screen(tmp_path_factory.mktemp("screen"), n_plates=3, fields_per_plate=3,
                        shape=SHAPE, seed=3)


def _cli(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str, *words: str) -> str:
    """The last stderr line: the error, one line, naming ``words``; no traceback."""
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("wsdino ") and ": error: " in line, line
    for w in words:
        assert w in line, (w, line)
    return line


def _preprocess_args(data, out):
    return ["preprocess", data, "--out", out, "--workers", "1", "--quiet"]


class _FullAfter:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written."""

    def __init__(self, fh, room: int):
        self.fh, self.room = fh, room

    def write(self, data):
        if len(data) > self.room:
            self.fh.write(data[: self.room])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


# ---------------------------------------------------------------- the message itself


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, ["No space left", "/x/out", "free space"]),
    (errno.EROFS, ["read-only", "/x/out", "writable"]),
    (errno.EACCES, ["Permission denied", "/x/out", "chmod"]),
    (errno.ENOTDIR, ["/x/out", "not a folder", "folder path"]),
])
def test_file_system_errors_read_as_one_line(code, words):
    exc = OSError(code, os.strerror(code), "/x/out")
    message = fsio.describe_os_error(exc)
    assert "\n" not in message
    for w in words:
        assert w in message
    # Found also behind another error (torch.save raises RuntimeError from ENOSPC).
    try:
        try:
            raise exc
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672]")
    except RuntimeError as wrapped:
        assert fsio.describe_os_error(wrapped) == message
    assert fsio.describe_os_error(ValueError("x")) is None


def test_atomic_write_removes_its_temporary_file_and_keeps_the_old(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_text("old")
    real_open = open
    monkeypatch.setattr(fsio, "open", lambda p, m: _FullAfter(real_open(p, m), 2), raising=False)
    with pytest.raises(OSError) as info:
        with fsio.atomic_write(target, "w") as fh:
            fh.write("new contents")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


# ---------------------------------------------------------------- 1: disk full, preprocess


def test_case1_disk_full_at_reservation_is_a_message_not_sigbus(screen, tmp_path, capsys, monkeypatch):
    """The arrays are reserved up front: a full disk fails there with ENOSPC (a
    memory-mapped write to it would kill the process with SIGBUS)."""
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsio.os, "posix_fallocate", full)
    out = tmp_path / "cache"
    # Arrays of 1.5 MB each: sparse when created (tiny ones fit their first blocks).
    code, _, err = _cli(_preprocess_args(screen, out) + ["--size", "256", "320"], capsys)
    assert code == 2
    _one_line_error(err, "No space left", str(out / "images_DAPI.npy"), "free space")
    assert not out.exists()  # nothing half-made left in the way of a rerun


def test_case1_disk_full_mid_run_keeps_finished_plates(screen, tmp_path, capsys, monkeypatch):
    clean = run_to_end(pp.preprocess(load_metadata(screen), tmp_path / "clean", workers=1))
    out = tmp_path / "cache"
    calls = {"n": 0}
    real_open = open

    def open_filling(path, mode):  # the 3rd state write (after plate 2) meets a full disk
        state = Path(path).name.startswith(".cache.json.")  # atomic_write's temporary file
        calls["n"] += state
        full = state and calls["n"] == 3
        return _FullAfter(real_open(path, mode), 10 if full else 10**9)

    monkeypatch.setattr(fsio, "open", open_filling, raising=False)
    code, _, err = _cli(_preprocess_args(screen, out), capsys)
    assert code == 2
    _one_line_error(err, "No space left", str(out / "cache.json"), "rerun resumes")
    assert not list(out.glob("*.tmp"))
    import json

    assert len(json.loads((out / "cache.json").read_text())["plates"]) == 1  # plate 1 kept
    monkeypatch.undo()
    code, _, err = _cli(_preprocess_args(screen, out), capsys)
    assert code == 0, err
    resumed = open_cache(out)
    for ch in clean.channels:
        assert np.array_equal(resumed.images(ch), clean.images(ch))


def test_case1_dead_worker_pool_names_the_full_disk(screen, tmp_path, capsys, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    class Broken(pp._Inline):
        def __init__(self, workers):
            pass

        def run(self, fn, tasks):
            raise BrokenProcessPool("A process in the process pool was terminated abruptly")
            yield

    monkeypatch.setattr(pp, "_Pool", Broken)
    out = tmp_path / "cache"
    args = ["preprocess", screen, "--out", out, "--workers", "2", "--quiet"]
    code, _, err = _cli(args, capsys)
    assert code == 2
    _one_line_error(err, "worker process died", "--workers")
    usage = type("Usage", (), {"free": 10 * 2**20})
    monkeypatch.setattr(pp.shutil, "disk_usage", lambda p: usage)
    code, _, err = _cli(args, capsys)
    assert code == 2
    _one_line_error(err, "No space left", str(out))


# ---------------------------------------------------------------- 2: disk full, checkpoint


def test_case2_checkpoint_on_full_disk_removes_tmp_and_keeps_the_last(tmp_path, monkeypatch):
    import torch

    from napari_wsdino.core import train

    path = tmp_path / "checkpoint.pth"
    train.save_checkpoint({"step": 1}, path)
    real_open = open
    monkeypatch.setattr(fsio, "open", lambda p, m: _FullAfter(real_open(p, m), 100), raising=False)
    with pytest.raises(Exception) as info:
        train.save_checkpoint({"step": 2, "w": torch.zeros(10_000)}, path)
    message = fsio.describe_os_error(info.value)
    assert message and "No space left" in message and str(path) in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]
    assert torch.load(path, weights_only=True)["step"] == 1


# ---------------------------------------------------------------- 3: unwritable --out


def test_case3_out_is_a_file(screen, tmp_path, capsys):
    out = tmp_path / "a_file"
    out.write_text("not a folder")
    code, _, err = _cli(_preprocess_args(screen, out), capsys)
    assert code == 2
    _one_line_error(err, str(out), "not a folder")
    code, _, err = _cli(_preprocess_args(screen, out / "cache"), capsys)
    assert code == 2
    _one_line_error(err, "not a folder")
    assert out.read_text() == "not a folder"


def test_case3_read_only_out(screen, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro" / "cache"

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(pp, "ensure_dir", read_only)
    code, _, err = _cli(_preprocess_args(screen, out), capsys)
    assert code == 2
    _one_line_error(err, str(out), "read-only", "writable")


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """16 fields of one channel, 64 x 64, four treatments over two plates."""
    import pandas as pd

    from napari_wsdino.core.cache import write_cache
    from napari_wsdino.core.metadata import treatment_name

    comps = ["DMSO", "taxol", "AZ138", "colchicine"]
    rows = [dict(plate=f"Week{1 + i // 8}_{100 + i // 8}", batch=f"Week{1 + i // 8}",
                 well=f"B{2 + i % 8:02d}", site=1, replicate=1, compound=comps[i % 4],
                 concentration=0.0 if i % 4 == 0 else 0.3,
                 treatment=treatment_name(comps[i % 4], 0.0 if i % 4 == 0 else 0.3),
                 moa="DMSO" if i % 4 == 0 else "ABC"[i % 4 - 1]) for i in range(16)]
    rng = np.random.default_rng(0)
    return write_cache(tmp_path_factory.mktemp("tiny") / "cache", pd.DataFrame(rows),
                       {"DAPI": rng.random((16, 64, 64)).astype(np.float32)})


@pytest.mark.parametrize("command", ["train", "embed", "evaluate", "synth"])
def test_case3_out_under_a_file_for_other_commands(tiny_cache, field_profiles, tmp_path, capsys,
                                                   command):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "sub"
    args = {
        "train": ["train", tiny_cache.path, "--arch", "test_vit", "--epochs", "1", "--out", out,
                  "--device", "cpu", "--quiet"],
        "embed": ["embed", tiny_cache.path, "--random", "--arch", "test_vit", "--crop", "16",
                  "--out", out / "p.parquet", "--quiet"],
        "evaluate": ["evaluate", field_profiles.write(tmp_path / "f.parquet"), "--out", out],
        "synth": ["synth", out, "--subset", "mini", "--size", "64", "80"],
    }[command]
    code, _, err = _cli(args, capsys)
    assert code == 2
    _one_line_error(err, str(blocker), "not a folder")
    assert blocker.read_text() == "x"


# ---------------------------------------------------------------- 5: odd pixel types


@pytest.mark.parametrize("dtype", ["float64", "uint8"])
def test_case5_other_pixel_type_refused_naming_the_file(tmp_path, capsys, dtype):
    root = write_screen(tmp_path / "data", n_plates=1, fields_per_plate=4, shape=SHAPE, seed=5)
    meta = load_metadata(root)
    odd = Path(meta.table.loc[1, "path_DAPI"])
    from napari_wsdino.core.imageio import read_tiff

    img = read_tiff(odd)
    write_tiff(odd, img.astype(np.float64) * 1e6 if dtype == "float64" else (img // 256).astype(np.uint8))
    code, out, err = _cli(["preprocess", root, "--out", tmp_path / "cache", "--workers", "1"], capsys)
    assert code == 0
    warning = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and str(odd) in warning[0]
    assert dtype in warning[0] and "uint16" in warning[0] and "re-export" in warning[0]
    cache = open_cache(tmp_path / "cache")
    assert len(cache) == 3 and cache.settings["failed"][0]["path"] == str(odd)
    # The plate's illumination function is the one of the three 16-bit fields.
    keep = meta.table.drop(index=1).reset_index(drop=True)
    from napari_wsdino.core import illumination as il

    raws = [read_tiff(p) for p in keep["path_DAPI"]]
    size = il.scaled_filter_size(320, SHAPE)
    fn = il.illumination_function(il.mean_image(raws), size)
    assert np.array_equal(cache.illumination(keep.plate[0], "DAPI"), fn)


# ---------------------------------------------------------------- 6: orphans


_ORPHAN_SCRIPT = """
import os, sys, time
from multiprocessing import resource_tracker
from napari_wsdino.core.preprocess import _Pool
pool = _Pool(2)
list(pool.executor.map(time.sleep, [0.3] * 4))
pids = list(pool.executor._processes) + [resource_tracker._resource_tracker._pid]
print(" ".join(str(p) for p in pids), flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            state = next(ln for ln in fh if ln.startswith("State:"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "Z" not in state.split()[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_case6_workers_end_with_a_killed_parent():
    """Two workers and the resource tracker end within seconds of a SIGKILLed parent."""
    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN_SCRIPT], stdout=subprocess.PIPE,
                            text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 3 and all(_alive(p) for p in pids)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


# ---------------------------------------------------------------- 7: changed files


def test_case7_repaired_file_is_noticed_on_rerun(tmp_path, capsys):
    root = write_screen(tmp_path / "data", n_plates=2, fields_per_plate=3, shape=SHAPE, seed=7)
    meta = load_metadata(root)
    bad = Path(meta.table.loc[4, "path_Actin"])
    good = bad.read_bytes()
    bad.write_bytes(good[:300])
    out = tmp_path / "cache"
    assert _cli(_preprocess_args(root, out), capsys)[0] == 0
    assert open_cache(out).settings["failed"][0]["path"] == str(bad)
    bad.write_bytes(good)  # repaired
    code, _, err = _cli(_preprocess_args(root, out), capsys)
    assert code == 2
    _one_line_error(err, str(bad), "changed", "delete the cache folder")
    assert len(open_cache(out)) == 5  # the cache is left as it was


def test_case7_edited_file_of_a_finished_plate_is_noticed(tmp_path, capsys):
    root = write_screen(tmp_path / "data", n_plates=2, fields_per_plate=2, shape=SHAPE, seed=8)
    meta = load_metadata(root)
    out = tmp_path / "cache"
    assert _cli(_preprocess_args(root, out), capsys)[0] == 0
    edited = Path(meta.table.loc[0, "path_DAPI"])
    edited.write_bytes(edited.read_bytes() + b"\0" * 16)
    code, _, err = _cli(_preprocess_args(root, out), capsys)
    assert code == 2
    _one_line_error(err, str(meta.table.plate[0]), "changed", "delete the cache folder")


# ---------------------------------------------------------------- 17: logs


def test_case17_progress_in_a_log_is_a_line_per_stage_not_per_step():
    from napari_wsdino.cli._common import ProgressPrinter

    log = io.StringIO()  # not a terminal
    printer = ProgressPrinter(stream=log, interval=3600)
    for stage in ("preprocess", "train"):
        for step in range(1, 1001):
            printer(Progress(stage, step, 1000, f"step {step}"))
    lines = log.getvalue().splitlines()
    assert lines == ["preprocess: 1/1000 (0%) step 1", "preprocess: 1000/1000 (100%) step 1000",
                     "train: 1/1000 (0%) step 1", "train: 1000/1000 (100%) step 1000"]
    assert "\r" not in log.getvalue()

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    bar = ProgressPrinter(stream=tty)
    bar(Progress("train", 1, 10, "x"))
    assert tty.getvalue().startswith("\r") and not tty.getvalue().endswith("\n")
    bar.close()  # an error message after an unfinished bar starts a line of its own
    assert tty.getvalue().endswith("\n")


# ---------------------------------------------------------------- 8: NaN pixels at embed


def test_case8_nan_pixels_at_embed_warn_and_keep_the_rows(tmp_path, capsys):
    import pandas as pd

    from napari_wsdino.core.cache import write_cache
    from napari_wsdino.core.profiles import ProfileTable

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"plate": ["P1"] * 4, "batch": ["B1"] * 4, "well": ["B02", "B03", "B04", "B05"],
                          "site": [1] * 4, "replicate": [1] * 4, "compound": ["DMSO", "taxol"] * 2,
                          "concentration": [0.0, 0.3] * 2, "treatment": ["DMSO@0", "taxol@0.3"] * 2,
                          "moa": ["DMSO", "Microtubule stabilizers"] * 2})
    images = {c: rng.random((4, 40, 40)).astype(np.float32) for c in ("DAPI",)}
    images["DAPI"][2, 5:9, 5:9] = np.nan
    cache = write_cache(tmp_path / "cache", table, images)
    out = tmp_path / "profiles.parquet"
    code, _, err = _cli(["embed", cache.path, "--random", "--arch", "test_vit", "--crop", "16",
                         "--out", out, "--quiet"], capsys)
    assert code == 0 and "Traceback" not in err
    (warning,) = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert "1 of 4 fields" in warning and "P1/B04/s1" in warning and "wsdino preprocess" in warning
    back = ProfileTable.read(out)
    assert len(back) == 4 and np.isnan(back.features[2]).all()
    assert np.isfinite(back.features[[0, 1, 3]]).all()


# ---------------------------------------------------------------- 9: trivial evaluations


@pytest.fixture(scope="module")
def field_profiles(bundled_dir):
    from napari_wsdino.core.profiles import simulate_profiles

    table = load_metadata(bundled_dir, check_files=False).table
    return simulate_profiles(table, 8, moa_signal=0.5, seed=4)


def test_case9_one_moa_is_flagged(field_profiles, tmp_path, capsys):
    moa = field_profiles.meta["Metadata_MoA"]
    one = field_profiles.subset(moa.isin(["DMSO", "Actin disruptors"]).to_numpy())
    path = one.write(tmp_path / "one.parquet")
    code, out, err = _cli(["evaluate", path, "--json"], capsys)
    assert code == 0 and "Traceback" not in err
    # (the default --k 5 is also above this handful of treatments: warned on its own line)
    (warning,) = [ln for ln in err.splitlines()
                  if ln.startswith("warning:") and not ln.startswith("warning: --k")]
    assert "Only one MoA (Actin disruptors)" in warning and "at least two MoAs" in warning
    import json

    assert any("Only one MoA" in n for n in json.loads(out)["notes"])


def test_case9_duplicated_rows_are_flagged(field_profiles, tmp_path, capsys):
    from napari_wsdino.core.profiles import ProfileTable, evaluation_warnings

    some = field_profiles.subset(np.arange(0, len(field_profiles), 3))
    doubled = ProfileTable.from_frame(pd_concat([some.to_frame(), some.to_frame()]))
    assert evaluation_warnings(some) == []
    (warning,) = evaluation_warnings(doubled)
    assert f"{len(some)} profile(s) repeat a field" in warning and "remove the duplicates" in warning
    path = doubled.write(tmp_path / "doubled.parquet")
    code, _, err = _cli(["evaluate", path, "--json"], capsys)
    assert code == 0 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("warning:")] == [f"warning: {warning}"]


@pytest.mark.parametrize("unannotated", ["error", "drop"])
def test_case_i_dmso_rows_with_an_empty_moa_are_controls(field_profiles, tmp_path, capsys,
                                                         unannotated):
    """DMSO fields whose MoA cell is empty are known by their compound: evaluated as the
    labelled table is (the suggested --unannotated drop no longer leaves 0 DMSO)."""
    import json

    frame = field_profiles.to_frame()
    labelled = tmp_path / "labelled.parquet"
    field_profiles.write(labelled)
    dmso = frame["Metadata_Compound"] == "DMSO"
    frame.loc[dmso, "Metadata_MoA"] = ""
    from napari_wsdino.core.profiles import ProfileTable

    blank = ProfileTable.from_frame(frame).write(tmp_path / "blank.parquet")
    code, out, err = _cli(["evaluate", blank, "--json", "--unannotated", unannotated], capsys)
    assert code == 0, err
    got = json.loads(out)
    assert got["n_dmso_fields"] == int(dmso.sum()) > 0
    assert any(f"{int(dmso.sum())} profile(s) of compound DMSO with an empty Metadata_MoA"
               in n for n in got["notes"])
    code, out, err = _cli(["evaluate", labelled, "--json"], capsys)
    want = json.loads(out)
    assert code == 0 and (got["nsc"], got["nscb"], got["n_treatments"]) == (
        want["nsc"], want["nscb"], want["n_treatments"])


def test_case_i_no_controls_at_all_says_how_to_label_them(field_profiles, tmp_path, capsys):
    frame = field_profiles.to_frame()
    dmso = frame["Metadata_Compound"] == "DMSO"
    frame.loc[dmso, "Metadata_Compound"] = "vehicle"
    frame.loc[dmso, "Metadata_MoA"] = ""
    from napari_wsdino.core.profiles import ProfileTable

    path = ProfileTable.from_frame(frame).write(tmp_path / "vehicle.parquet")
    code, _, err = _cli(["evaluate", path, "--unannotated", "drop"], capsys)
    assert code == 2
    _one_line_error(err, "found 0", "Metadata_MoA (or Metadata_Compound) 'DMSO'", "--tvn none")


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------- 11: empty profile file


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_case11_profile_file_without_rows(field_profiles, tmp_path, capsys, suffix):
    empty = field_profiles.subset(np.array([], dtype=int))
    path = tmp_path / f"empty{suffix}"
    if suffix == ".csv":
        path.write_text(",".join(field_profiles.to_frame().columns) + "\n")
    else:
        empty.write(path)
    code, _, err = _cli(["evaluate", path], capsys)
    assert code == 2
    _one_line_error(err, str(path), "no profile rows", "wsdino embed")


# ---------------------------------------------------------------- 12: info counts


def test_case12_info_counts_unannotated_fields_and_odd_images(tmp_path, capsys):
    import json

    import pandas as pd

    from napari_wsdino.core.metadata import IMAGE_CSV

    root = write_screen(tmp_path / "data", n_plates=1, fields_per_plate=6, shape=SHAPE, seed=12)
    meta = load_metadata(root)
    # One field's compound gets a name the MoA table lacks.
    csv = pd.read_csv(root / IMAGE_CSV)
    csv.loc[0, "Image_Metadata_Compound"] = "unknown-compound"
    csv.to_csv(root / IMAGE_CSV, index=False)
    rgb, small = Path(meta.table.loc[2, "path_DAPI"]), Path(meta.table.loc[3, "path_Actin"])
    write_tiff(rgb, np.zeros(SHAPE + (3,), np.uint16))
    write_tiff(small, np.zeros((16, 20), np.uint16))
    code, out, err = _cli(["info", root, "--json"], capsys)
    assert code == 0 and "Traceback" not in err
    summary = json.loads(out)
    assert summary["unannotated_fields"] == 1 and summary["fields"] == 5
    assert summary["unreadable_files"] == 2
    code, out, _ = _cli(["info", root], capsys)
    assert "fields without MoA" in out and "no MoA row" in out
    assert f"unreadable: {rgb} (expected one 2-D plane" in out
    assert f"unreadable: {small} (image is 16x20, most images are 32x40)" in out


# ---------------------------------------------------------------- 13: reader, empty CSV


def test_case13_reader_on_a_header_only_csv(tmp_path):
    from napari_wsdino._napari.reader import get_reader
    from napari_wsdino.core.metadata import IMAGE_CSV, MOA_CSV, DataError, bundled_metadata_dir

    src = bundled_metadata_dir()
    header = (src / IMAGE_CSV).read_text().splitlines()[0]
    (tmp_path / IMAGE_CSV).write_text(header + "\n")
    (tmp_path / MOA_CSV).write_bytes((src / MOA_CSV).read_bytes())
    reader = get_reader(str(tmp_path))
    assert reader is not None
    with pytest.raises(DataError, match="lists no fields") as info:
        reader(str(tmp_path))
    assert "none of the 0" not in str(info.value)


# ---------------------------------------------------------------- 14: CSV encodings


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_case14_csv_in_another_encoding_says_save_as_utf8(tmp_path, capsys, encoding):
    from napari_wsdino.core.metadata import IMAGE_CSV, MOA_CSV, bundled_metadata_dir

    src = bundled_metadata_dir()
    lines = (src / IMAGE_CSV).read_text().splitlines()[:4]
    lines[1] = lines[1].replace("DMSO", "DMSO-é", 1)  # a byte Latin-1 writes differently
    (tmp_path / IMAGE_CSV).write_bytes(("\n".join(lines) + "\n").encode(encoding))
    (tmp_path / MOA_CSV).write_bytes((src / MOA_CSV).read_bytes())
    code, _, err = _cli(["info", tmp_path, "--no-check"], capsys)
    assert code == 2
    _one_line_error(err, str(tmp_path / IMAGE_CSV), "UTF-16" if encoding == "utf-16" else "not UTF-8",
                    "save it as UTF-8")


# ---------------------------------------------------------------- 15: stalled size request


def test_case15_stalled_size_request_is_an_error_not_an_estimate():
    import socket
    import threading

    from napari_wsdino.core.fetch import FetchError, remote_size

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # accepts, never answers
    stop = threading.Event()

    def hold():
        conn, _ = server.accept()
        stop.wait(5)
        conn.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/BBBC021_v1_images_Week1_22123.zip"
    try:
        with pytest.raises(FetchError, match="did not answer a size request") as info:
            remote_size(url, timeout=0.3)
    finally:
        stop.set()
        thread.join(5)
        server.close()
    message = str(info.value)
    assert url in message and "--timeout" in message and "\n" not in message


# ---------------------------------------------------------------- 16: gpu preset, no GPU


def test_case16_gpu_demo_without_cuda_refuses_before_writing(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "demo"
    code, _, err = _cli(["demo", out, "--gpu", "--init", "random"], capsys)
    assert code == 2
    _one_line_error(err, "gpu preset", "no", "days", "--device cpu")
    assert not out.exists()
    code, _, err = _cli(["demo", out, "--device", "cuda", "--preset", "test"], capsys)
    assert code == 2
    _one_line_error(err, "no CUDA GPU", "--device cpu")
    assert not out.exists()


# ---------------------------------------------------------------- 1 on a real small disk


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of ``size`` at ``tmp_path/disk`` (skipped where mounting is not allowed)."""
    mounted = []

    def mount(size: str) -> Path:
        point = tmp_path / "disk"
        point.mkdir(exist_ok=True)
        opts = f"size={size}" if not mounted else f"remount,size={size}"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)],
                              capture_output=True)
        if done.returncode != 0:
            pytest.skip("cannot mount a tmpfs here: " + done.stderr.decode().strip())
        mounted.append(point)
        return point

    yield mount
    if mounted:
        subprocess.run(["umount", str(mounted[0])], capture_output=True)


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                    reason="mounts a tmpfs (root on Linux)")
@pytest.mark.parametrize("workers, size", [("1", "1m"), ("2", "1m"), ("1", "1800k"), ("2", "1800k")])
def test_case1_full_tmpfs(tmp_path, capsys, small_disk, workers, size):
    """256 x 320 fields into a cache of about 1.5 MB: a 1 MB disk fails when the arrays
    are reserved, a 1.8 MB one when a plate's illumination function is written. Either way
    one line, no SIGBUS, no temporary files; with room made, the rerun finishes."""
    root = write_screen(tmp_path / "data", n_plates=2, fields_per_plate=6, shape=(256, 320),
                        seed=1)
    disk = small_disk(size)
    out = disk / "cache"
    args = ["preprocess", root, "--out", out, "--workers", workers, "--quiet"]
    code, _, err = _cli(args, capsys)
    assert code == 2, err
    _one_line_error(err, "No space left", str(out), "free space")
    assert not list(disk.rglob("*.tmp"))
    small_disk("8m")
    code, _, err = _cli(args, capsys)
    assert code == 0, err
    clean = run_to_end(pp.preprocess(load_metadata(root), tmp_path / "clean", workers=1))
    for ch in clean.channels:
        assert np.array_equal(open_cache(out).images(ch), clean.images(ch))


# ---------------------------------------------------------------- 10: damaged checkpoint


def test_case10_damaged_checkpoint_is_not_called_unsafe(tiny_cache, tmp_path, capsys):
    import torch

    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(1000)}, good)
    damaged = {"random": os.urandom(4000), "truncated": good.read_bytes()[:600], "empty": b""}
    for name, data in damaged.items():
        path = tmp_path / f"{name}.pth"
        path.write_bytes(data)
        code, _, err = _cli(["embed", tiny_cache.path, "--init-only", path, "--arch", "test_vit",
                             "--crop", "16", "--out", tmp_path / "p.parquet", "--quiet"], capsys)
        assert code == 2
        line = _one_line_error(err, str(path), "damaged or not a PyTorch checkpoint", "again")
        assert "weights_only=False" not in line and "pickled" not in line


# ---------------------------------------------------------------- 4: weights of another width


@pytest.mark.parametrize("command", ["embed --model", "embed --init-only", "train --init"])
def test_case4_weights_of_another_width(tiny_cache, tmp_path, capsys, command):
    import timm
    import torch

    wide = tmp_path / "wide.pth"
    torch.save(timm.create_model("test_vit", embed_dim=96, num_classes=0).state_dict(), wide)
    run = tmp_path / "run"
    args = {
        "embed --model": ["embed", tiny_cache.path, "--model", f"DAPI={wide}"],
        "embed --init-only": ["embed", tiny_cache.path, "--init-only", wide],
        "train --init": ["train", tiny_cache.path, "--init", wide, "--epochs", "1",
                         "--batch-size", "4", "--out", run, "--device", "cpu", "--quiet"],
    }[command]
    if command.startswith("embed"):
        args += ["--crop", "16", "--out", tmp_path / "p.parquet", "--quiet"]
    code, _, err = _cli(args + ["--arch", "test_vit"], capsys)
    assert code == 2
    _one_line_error(err, "another architecture", "--arch")
    assert not run.exists()  # no empty RUN/DAPI/ left behind
    assert not (tmp_path / "p.parquet").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                    reason="mounts a tmpfs (root on Linux)")
def test_case1_fetch_onto_a_full_disk_names_the_partial_file(tmp_path, small_disk):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from napari_wsdino.core.fetch import FetchError, FetchOptions, download

    served = tmp_path / "site"
    served.mkdir()
    (served / "a.zip").write_bytes(os.urandom(400_000))
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    disk = small_disk("200k")
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/a.zip"
        with pytest.raises(FetchError) as info:  # at once: no retries against a full disk
            run_to_end(download(url, disk / "a.zip", options=FetchOptions(retries=5, timeout=5,
                                                                          retry_wait=30)))
    finally:
        server.shutdown()
        server.server_close()
    message = str(info.value)
    assert str(disk / "a.zip.part") in message and "No space left" in message
    assert "free space" in message and "\n" not in message
    assert (disk / "a.zip.part").exists()  # kept: a rerun resumes the download


# ------------------------------------------------------------ issue 30: third round


@pytest.mark.parametrize("argv, words", [
    (["--lr", "-1"], ["lr must be 0 or more", "from --lr"]),
    (["--set", "global_scale=5"], ["global_scale must be two numbers", "from --set global_scale"]),
    (["--epochs", "1000000000"], ["epochs must be at most", "from --epochs"]),
    (["--set", "device=tpu"], ["auto, cpu, cuda", "'tpu'"]),
    (["--set", "seed=ten"], ["seed must be a whole number", "from --set seed"]),
    (["--lr", "nan"], ["lr must be a finite number"]),
    (["--min-lr", "0.1"], ["min_lr (0.1) must not exceed the peak lr", "--min-lr"]),
])
def test_case_a_bad_training_settings_are_refused_before_work(tmp_path, capsys, argv, words):
    run = tmp_path / "run"
    code, _, err = _cli(["train", tmp_path / "no-cache-yet", "--out", run, *argv], capsys)
    assert code == 2
    _one_line_error(err, "Invalid training config", *words)
    assert not run.exists()  # refused before the cache is even opened


def test_case_a_bad_value_in_a_config_file_names_the_file(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("[train]\nlr = -0.001\n")
    code, _, err = _cli(["train", tmp_path / "cache", "--config", config], capsys)
    assert code == 2
    _one_line_error(err, "lr must be 0 or more, not -0.001", f"from config file {config}")


def _copy_cache(cache, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(cache.path, dest))


@pytest.mark.parametrize("damage, words", [
    ("truncate_images", ["images_DAPI.npy", "is truncated", "rerun 'wsdino preprocess"]),
    ("reshape_images", ["images_DAPI.npy", "shape (8, 64, 64), not (16, 64, 64)"]),
    ("not_npy", ["images_DAPI.npy", "is not a readable .npy array"]),
    ("missing_images", ["images_DAPI.npy", "is missing"]),
    ("truncate_json", ["cache.json is damaged (not valid JSON", "rerun 'wsdino preprocess"]),
    ("missing_index", ["lacks its field table index.parquet", "rerun 'wsdino preprocess"]),
])
@pytest.mark.parametrize("command", ["train", "embed", "attention"])
def test_case_c_damaged_cache_is_named_on_open(tiny_cache, tmp_path, capsys, damage, words,
                                               command):
    cache = _copy_cache(tiny_cache, tmp_path / "cache")
    images, settings = cache / "images_DAPI.npy", cache / "cache.json"
    if damage == "truncate_images":
        images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    elif damage == "reshape_images":
        np.save(images, np.zeros((8, 64, 64), np.float16))
    elif damage == "not_npy":
        images.write_bytes(b"garbage" * 100)
    elif damage == "missing_images":
        images.unlink()
    elif damage == "truncate_json":
        settings.write_text(settings.read_text()[:40])
    else:
        (cache / "index.parquet").unlink()
    args = {"train": ["train", cache, "--arch", "test_vit", "--epochs", "1", "--device", "cpu",
                      "--out", tmp_path / "run", "--quiet"],
            "embed": ["embed", cache, "--random", "--arch", "test_vit", "--crop", "16",
                      "--out", tmp_path / "p.parquet", "--quiet"],
            "attention": ["attention", cache, "--model", tmp_path / "run", "--index", "0",
                          "--out", tmp_path / "a.png"]}[command]
    code, _, err = _cli(args, capsys)
    assert code == 2
    _one_line_error(err, str(cache), *words)
    assert not (tmp_path / "run").exists() and not (tmp_path / "p.parquet").exists()
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("content, words", [
    ('[1, 2]', ["must be a JSON object of ScreenLayout fields, not a list", "plate_column"]),
    ('"bbbc021"', ["not a string"]),
    ('{"plate_column": 3}', ["plate_column must be a string, not 3"]),
    ('{"file_columns": {"DNA": "FileName_DNA"}}', ["file_columns['DNA'] must be [file name"]),
    ('{"file_columns": []}', ["file_columns must be an object"]),
    ('{"channels": "DNA"}', ["channels must be a list of channel names"]),
    ('{"default_concentration": "ten"}', ["default_concentration must be a number"]),
    ('{"plate_column": ', ["Cannot read layout file"]),
])
def test_case_d_layout_file_of_the_wrong_shape(screen, tmp_path, capsys, content, words):
    layout = tmp_path / "layout.json"
    layout.write_text(content)
    code, _, err = _cli(["info", screen, "--layout", layout], capsys)
    assert code == 2
    _one_line_error(err, str(layout), *words)


def _wsdino(*argv, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "napari_wsdino.cli", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock and signals")
def test_case_f_two_trainings_on_one_run_folder(tiny_cache, tmp_path):
    """Two real processes: the second is refused naming the first, whose run is intact."""
    import json as _json

    from napari_wsdino.core.train import TrainConfig, load_checkpoint

    run = tmp_path / "run"
    tiny = ["--arch", "test_vit", "--batch-size", "4", "--global-size", "32", "--local-size",
            "16", "--local-crops", "2", "--out-dim", "64", "--device", "cpu", "--set",
            "hidden_dim=16", "--set", "bottleneck_dim=8", "--warmup-epochs", "0",
            "--checkpoint-every", "1", "--out", run]
    first = _wsdino("train", tiny_cache.path, *tiny, "--epochs", "500", "--seed", "5")
    try:
        lock = run / "DAPI" / fsio.LOCK_FILE
        deadline = time.monotonic() + 120
        while not (run / "DAPI" / "config.toml").exists() and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        assert lock.exists()
        # the dangerous one: a resume of the same run while it trains
        second = _wsdino("train", tiny_cache.path, *tiny, "--epochs", "3", "--seed", "5",
                         "--resume")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2 and "Traceback" not in err, err
        line = err.strip().splitlines()[-1]
        assert f"is being written by process {first.pid}" in line and "another folder" in line
        assert first.poll() is None  # the first goes on
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 130
    folder = run / "DAPI"
    ckpt = load_checkpoint(folder / "checkpoint.pth")
    saved = TrainConfig.load(folder / "config.toml")
    assert saved.seed == 5 and saved.epochs == 500 and ckpt["config"]["seed"] == 5
    epochs = [_json.loads(line)["epoch"] for line in (folder / "log.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, len(epochs) + 1))  # one run's lines, in order
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pth", "config.toml",
                                                        "log.jsonl"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock and signals")
def test_case_f_a_killed_holder_leaves_a_lock_that_is_taken_over(tmp_path):
    folder = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from napari_wsdino.core.fsio import "
         "output_lock\nwith output_lock(sys.argv[1]):\n print('held', flush=True); "
         "time.sleep(60)", str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(fsio.OutputLockedError, match=f"process {holder.pid} on "):
            with fsio.output_lock(folder):
                pass
    finally:
        holder.kill()  # no cleanup: its lock file stays, with its (now dead) pid
        holder.wait()
    assert str(holder.pid) in (folder / fsio.LOCK_FILE).read_text()
    with fsio.output_lock(folder) as lock:  # stale: taken over
        assert str(os.getpid()) in lock.read_text()
    assert list(folder.iterdir()) == []


def test_case_f_temporary_files_are_unique(tmp_path):
    target = tmp_path / "checkpoint.pth"
    with fsio.atomic_write(target) as a, fsio.atomic_write(target) as b:
        assert a.name != b.name and Path(a.name).parent == tmp_path
        a.write(b"first")
        b.write(b"second")
    assert target.read_bytes() == b"first"  # the last rename wins; no error, no debris
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("out", ["profiles", "folder", "profiles.xlsx"])
def test_case_e_embed_out_without_a_profile_suffix_is_refused_first(tiny_cache, tmp_path, capsys,
                                                                     out):
    target = tmp_path / out
    if out == "folder":
        target.mkdir()
    code, _, err = _cli(["embed", tiny_cache.path, "--random", "--arch", "test_vit", "--crop",
                         "16", "--out", target, "--quiet"], capsys)
    assert code == 2
    line = _one_line_error(err, f"--out {target}", ".parquet, .pq, .csv, .csv.gz, .tsv")
    assert ("is a folder" in line) == (out == "folder")
    assert "Models" not in err  # refused before the models were even built
    assert sorted(p.name for p in tmp_path.iterdir()) == (["folder"] if out == "folder" else [])


def test_case_e_profile_and_chunk_temporaries_are_unique(tmp_path, field_profiles):
    from napari_wsdino.core.embed.parts import save_chunk, write_profiles

    write_profiles(field_profiles, tmp_path / "p.csv.gz")
    save_chunk(tmp_path, 0, np.zeros((2, 3), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk_00000.npy", "p.csv.gz"]


def test_case_h_workers_are_clamped_to_the_cores(screen, tmp_path, capsys, monkeypatch):
    from napari_wsdino.cli import preprocess as cli_pp

    monkeypatch.setattr(cli_pp, "usable_cores", lambda: 1)
    code, _, err = _cli(["preprocess", screen, "--out", tmp_path / "cache", "--workers", "1000",
                         "--quiet"], capsys)
    assert code == 0
    assert "note: --workers 1000 is more than the 1 usable cores; using 1." in err
    code, _, err = _cli(["preprocess", screen, "--out", tmp_path / "c2", "--workers", "0"], capsys)
    assert code == 2
    _one_line_error(err, "--workers must be at least 1")


def test_case_h_attention_channel_in_another_case(tiny_cache, tmp_path, capsys):
    code, _, err = _cli(["attention", tiny_cache.path, "--model", tmp_path / "no-run",
                         "--channel", "dapi", "--index", "0", "--out", tmp_path / "a.png"], capsys)
    assert code == 2
    line = _one_line_error(err, "--channel 'dapi' is not a channel of", "use --channel DAPI")
    assert "--model" not in line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock")
@pytest.mark.parametrize("command", ["embed", "preprocess"])
def test_case_f_second_writer_of_a_cache_or_profiles_is_refused(screen, tiny_cache, tmp_path,
                                                                capsys, command):
    out = tmp_path / ("p.parquet" if command == "embed" else "cache")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from napari_wsdino.core.fsio import "
         "writing\nwith writing(sys.argv[1], 'x'):\n print('held', flush=True); "
         "time.sleep(60)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = {"embed": ["embed", tiny_cache.path, "--random", "--arch", "test_vit", "--crop",
                          "16", "--out", out, "--quiet"],
                "preprocess": _preprocess_args(screen, out)}[command]
        code, _, err = _cli(args, capsys)
        assert code == 2
        _one_line_error(err, f"{out} is being written by process {holder.pid}")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    code, _, err = _cli(args, capsys)  # the holder gone, its stale lock is taken over
    assert code == 0, err
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == (["p.json", "p.parquet"] if command == "embed" else ["cache"])  # no lock


def test_case_h_embed_crop_zero(tiny_cache, tmp_path, capsys):
    code, _, err = _cli(["embed", tiny_cache.path, "--random", "--arch", "test_vit", "--crop",
                         "0", "--out", tmp_path / "p.parquet", "--quiet"], capsys)
    assert code == 2
    _one_line_error(err, "--crop is a side in pixels, at least 1")


def test_case_h_preprocess_size_too_small(screen, tmp_path, capsys):
    code, _, err = _cli(_preprocess_args(screen, tmp_path / "c") + ["--size", "1", "1"], capsys)
    assert code == 2
    _one_line_error(err, "--size 1 1 is too small", "at least 16 px")
    assert not (tmp_path / "c").exists()


def _cache_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*"))
            if p.name.startswith("images_") or p.name == "index.parquet"}


@pytest.mark.parametrize("damage, words", [
    ("truncate", ["images_DAPI.npy is truncated", "recomputing its images"]),
    ("reshape", ["images_Actin.npy holds an array of shape (4, 16, 20), not (9, 16, 20)",
                 "recomputing its images"]),
    ("missing", ["images_Tubulin.npy is missing", "recomputing its images"]),
    ("index", ["index.parquet is damaged", "index.parquet written again"]),
])
def test_case_c_rerunning_preprocess_repairs_a_damaged_cache(screen, tmp_path, capsys, damage,
                                                             words):
    """The obvious repair works: preprocess over a cache with a damaged file recomputes
    what is broken (says so on one line) and gives the same bytes; readers name the file."""
    out = tmp_path / "cache"
    assert _cli(_preprocess_args(screen, out), capsys)[0] == 0
    before = _cache_bytes(out)
    if damage == "truncate":
        images = out / "images_DAPI.npy"
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "reshape":
        np.save(out / "images_Actin.npy", np.zeros((4, 16, 20), np.float16))
    elif damage == "missing":
        (out / "images_Tubulin.npy").unlink()
    else:
        (out / "index.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(Exception, match="rerun 'wsdino preprocess DATA"):
        open_cache(out)
    code, _, err = _cli(_preprocess_args(screen, out), capsys)
    assert code == 0, err
    note = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(note) == 1 and all(w in note[0] for w in words), (note, words)
    assert str(out) in note[0] and "Traceback" not in err
    assert _cache_bytes(out) == before  # the repaired cache is the one first made
    assert len(open_cache(out)) == 9


def test_case_c_interrupted_cache_with_a_truncated_array_starts_again(screen, tmp_path, capsys):
    """A cache cut short mid-run whose reserved array was truncated too (a copy of an
    unfinished cache) is begun again on resume, not a memory-map crash."""
    out = tmp_path / "cache"
    gen = pp.preprocess(load_metadata(screen), out, workers=1)
    for event in gen:
        if event.info.get("phase") == "plate done":
            break
    gen.close()
    images = out / "images_DAPI.npy"
    images.write_bytes(images.read_bytes()[:200])
    code, _, err = _cli(_preprocess_args(screen, out), capsys)
    assert code == 0, err
    assert "images_DAPI.npy is truncated" in err and "1 plate done before" in err
    fresh = tmp_path / "fresh"
    assert _cli(_preprocess_args(screen, fresh), capsys)[0] == 0
    assert _cache_bytes(out) == _cache_bytes(fresh)


def test_case_c_damaged_merged_cache_names_the_way_to_repair_it(screen, tmp_path, capsys):
    """Its shards are gone once merged: --merge says how to repair; one run repairs."""
    out = tmp_path / "cache"
    for extra in (["--shard", "1/2"], ["--shard", "2/2"], ["--merge"]):
        assert _cli(_preprocess_args(screen, out) + extra, capsys)[0] == 0
    before = _cache_bytes(out)
    images = out / "images_DAPI.npy"
    images.write_bytes(images.read_bytes()[:-100])
    code, _, err = _cli(_preprocess_args(screen, out) + ["--merge"], capsys)
    assert code == 2
    _one_line_error(err, "images_DAPI.npy is truncated", "shards were removed once merged",
                    "without --shard, to repair it")
    assert _cli(_preprocess_args(screen, out), capsys)[0] == 0
    assert _cache_bytes(out) == before


# ---------------------------------------------------------------- content, not mtimes


def test_case_g_copied_data_and_cache_with_new_mtimes_are_accepted(screen, tmp_path, capsys):
    """Plates are stamped by size and sampled content: a copy of the data (and of the
    cache) with new modification times (cp -r, touch) is the same data."""
    import shutil

    out = tmp_path / "cache"
    assert _cli(_preprocess_args(screen, out), capsys)[0] == 0
    before = _cache_bytes(out)
    data = Path(shutil.copytree(screen, tmp_path / "data", copy_function=shutil.copyfile))
    copy = Path(shutil.copytree(out, tmp_path / "copy", copy_function=shutil.copyfile))
    later = time.time() + 3600
    for f in [*data.rglob("*"), *copy.rglob("*")]:
        os.utime(f, (later, later))  # touch
    for cache in (out, copy):
        code, _, err = _cli(_preprocess_args(data, cache), capsys)
        assert code == 0, err
        assert _cache_bytes(cache) == before
        assert not [line for line in err.splitlines() if line.startswith("note: ")]


def test_case_g_a_cache_with_the_older_mtime_stamps_is_still_accepted(tmp_path, capsys):
    """Caches made before content stamps recorded sizes and modification times: checked
    as before, so an unchanged one is not refused after an upgrade."""
    import json

    from napari_wsdino.core.preprocess.state import _legacy_stamp

    root = write_screen(tmp_path / "data", n_plates=2, fields_per_plate=2, shape=SHAPE, seed=10)
    out = tmp_path / "cache"
    assert _cli(_preprocess_args(root, out), capsys)[0] == 0
    table = load_metadata(root).table
    state = json.loads((out / "cache.json").read_text())
    for plate, done in state["plates"].items():
        rows = table[table.plate == plate][[f"path_{c}" for c in ("DAPI", "Tubulin", "Actin")]]
        assert done["stamp"].startswith("c1:")
        done["stamp"] = _legacy_stamp(rows.astype(str).to_numpy().ravel())
    (out / "cache.json").write_text(json.dumps(state, indent=2))
    assert _cli(_preprocess_args(root, out), capsys)[0] == 0
    edited = Path(table.loc[0, "path_DAPI"])
    os.utime(edited, (time.time() + 60, time.time() + 60))
    code, _, err = _cli(_preprocess_args(root, out), capsys)
    assert code == 2
    _one_line_error(err, "changed", "delete the cache folder")


def test_case_g_changed_content_of_the_same_size_and_mtime_is_noticed(tmp_path, capsys):
    root = write_screen(tmp_path / "data", n_plates=2, fields_per_plate=2, shape=SHAPE, seed=9)
    out = tmp_path / "cache"
    assert _cli(_preprocess_args(root, out), capsys)[0] == 0
    edited = Path(load_metadata(root).table.loc[3, "path_Tubulin"])
    st = edited.stat()
    raw = bytearray(edited.read_bytes())
    raw[-50:-40] = bytes(10)  # pixels changed, size kept
    edited.write_bytes(bytes(raw))
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime kept
    code, _, err = _cli(_preprocess_args(root, out), capsys)
    assert code == 2
    _one_line_error(err, "changed (size or content)", "delete the cache folder")


def test_case_f_a_file_system_without_locks_runs_unlocked_and_says_so(tmp_path, monkeypatch,
                                                                       field_profiles):
    """flock failing with ENOLCK (an NFS mount without its lock daemon): the command runs
    and finishes, with one warning line saying a second writer would not be refused."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    folder = tmp_path / "out"
    with pytest.warns(RuntimeWarning, match="does not support locks .No locks available.: a "
                                            "second run writing the same output"):
        with fsio.output_lock(folder):
            (folder / "result.txt").write_text("done")
    assert [p.name for p in folder.iterdir()] == ["result.txt"]  # no lock file left behind
    # Through the CLI (a process of its own: pytest records warnings in-process), the
    # warning is one line, no file or code: wsdino evaluate --out locks its folder.
    path = field_profiles.write(tmp_path / "f.parquet")
    code = ("import errno, fcntl, sys\n"
            "def no_locks(fd, op): raise OSError(errno.ENOLCK, 'No locks available')\n"
            "fcntl.flock = no_locks\n"
            "from napari_wsdino.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "evaluate", str(path), "--out",
                           str(tmp_path / "ev")], capture_output=True, text=True, timeout=300)
    err = proc.stderr
    assert proc.returncode == 0 and (tmp_path / "ev" / fsio.COMPLETE_FILE).exists(), err
    warning = [line for line in err.splitlines() if "does not support locks" in line]
    assert len(warning) == 1 and warning[0].startswith("wsdino: warning: ") and ".py:" not in err


@pytest.mark.parametrize("sep", [";", "\t"])
def test_case_w_profile_csv_with_another_separator_is_named_with_the_fix(field_profiles,
                                                                         tmp_path, capsys, sep):
    """A profile table saved with ';' (a European spreadsheet) or tabs under a .csv name:
    one line naming the separator and the command that rewrites it, not "no feature
    columns"; the rewritten file then evaluates."""
    import pandas as pd

    good = field_profiles.write(tmp_path / "good.csv")
    semi = tmp_path / "semi.csv"
    pd.read_csv(good).to_csv(semi, sep=sep, index=False)
    code, _, err = _cli(["evaluate", semi, "--json"], capsys)
    assert code == 2
    line = _one_line_error(err, f"is separated by {sep!r}", "Save it comma-separated",
                           f"sep={sep!r}).to_csv(")
    assert "no feature columns" not in line
    pd.read_csv(semi, sep=sep).to_csv(semi, index=False)  # the fix the message gives
    code, out, _ = _cli(["evaluate", semi, "--json"], capsys)
    assert code == 0 and "nsc" in out


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--chunk-size", "-1")])
def test_case_w_embed_batch_and_chunk_sizes_below_one_are_refused(tiny_cache, tmp_path, capsys,
                                                                  flag, value):
    out = tmp_path / "p.parquet"
    code, _, err = _cli(["embed", tiny_cache.path, "--random", "--arch", "test_vit", "--crop",
                         "16", flag, value, "--out", out, "--quiet"], capsys)
    assert code == 2
    _one_line_error(err, f"{flag} is a number of fields, at least 1, not {value}")
    assert not out.exists()


def test_case_w_evaluate_k_zero_names_the_flag(field_profiles, tmp_path, capsys):
    path = field_profiles.write(tmp_path / "f.parquet")
    code, _, err = _cli(["evaluate", path, "--k", "1", "0", "--json"], capsys)
    assert code == 2
    _one_line_error(err, "--k takes neighbour counts of at least 1", "not 0")


def test_case_w_embed_crop_above_the_field_size_is_noted(tiny_cache, tmp_path, capsys):
    """--crop far above the field: one note saying the crops are cut to fit, and the
    profiles record the side used."""
    import json as _json

    out = tmp_path / "p.parquet"
    code, _, err = _cli(["embed", tiny_cache.path, "--random", "--arch", "test_vit", "--crop",
                         "100000", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    h, w = tiny_cache.shape
    assert f"note: --crop 100000 is larger than the cache's {h} x {w} px fields" in err
    provenance = _json.loads(out.with_suffix(".json").read_text())
    assert max(provenance["crop"].values()) <= min(h, w)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock")
def test_case_f_second_evaluate_on_one_out_is_refused_before_it_computes(field_profiles,
                                                                         tmp_path, capsys):
    """A real process holds the evaluation folder's lock: `wsdino evaluate --out` is refused
    at once, naming it, and the holder's files are left as they were."""
    out = tmp_path / "ev"
    path = field_profiles.write(tmp_path / "f.parquet")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path\n"
         "from napari_wsdino.core.fsio import output_lock\n"
         "with output_lock(sys.argv[1], 'this evaluation'):\n"
         " Path(sys.argv[1], 'metrics.json').write_text('{}')\n"
         " print('held', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out_text, err = _cli(["evaluate", path, "--out", out], capsys)
        assert code == 2 and "NSC" not in out_text  # nothing evaluated
        _one_line_error(err, f"is being written by process {holder.pid}", "another folder")
        assert (out / "metrics.json").read_text() == "{}"
    finally:
        holder.kill()
        holder.wait()
    code, _, _ = _cli(["evaluate", path, "--out", out], capsys)  # the holder gone: it runs
    assert code == 0 and (out / "complete.json").exists()
