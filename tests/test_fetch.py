"""Fetching BBBC021 against a local HTTP server on 127.0.0.1 (never the internet).

The server serves two tiny plates zipped in the official layout
(``BBBC021_v1_images_<plate>.zip`` -> ``<plate>/<file>.tif``, named after real rows
of the bundled metadata) and the metadata tables, supports ``Range``, and can be
told to misbehave per file: truncate a response, stall mid-file, serve a damaged zip.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_wsdino.cli import main
from napari_wsdino.core import fetch as F
from napari_wsdino.core.metadata import IMAGE_CSV, MOA_CSV, load_metadata
from napari_wsdino.core.progress import run_to_end

PLATES = ("Week1_22123", "Week10_40111")
FIELDS_PER_PLATE = 3
PREFIX = "/bbbc/BBBC021/"  # the mirror's folder on the test server
CHANNEL_FILES = ("Image_FileName_DAPI", "Image_FileName_Tubulin", "Image_FileName_Actin")


# --------------------------------------------------------------------------- server


class Site:
    """Files served by the test server, the faults to inject, and a request log."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.types: dict[str, str] = {}  # name -> Content-Type to send
        self.faults: dict[str, dict] = {}  # name -> {"mode": ..., "times": n, "at": bytes}
        self.log: list[tuple[str, str, str | None]] = []  # (method, name, Range)
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def take_fault(self, name: str) -> dict | None:
        with self.lock:
            fault = self.faults.get(name)
            if fault is None:
                return None
            if fault.get("times") is not None:
                if fault["times"] <= 0:
                    return None
                fault["times"] -= 1
            return fault

    def gets(self, name: str) -> list[str | None]:
        return [r for m, n, r in self.log if m == "GET" and n == name]


def make_handler(site: Site):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def _lookup(self):
            path = self.path.split("?")[0]
            name = path[len(PREFIX):] if path.startswith(PREFIX) else path
            return name, site.files.get(name) if path.startswith(PREFIX) else None

        def do_HEAD(self):
            name, body = self._lookup()
            site.log.append(("HEAD", name, None))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

        def do_GET(self):
            name, body = self._lookup()
            rng = self.headers.get("Range")
            site.log.append(("GET", name, rng))
            if body is None:
                self.send_error(404)
                return
            start = 0
            if rng:
                start = int(rng.split("=")[1].split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            if name in site.types:
                self.send_header("Content-Type", site.types[name])
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Connection", "close")
            self.end_headers()
            fault = site.take_fault(name)
            if fault is None:
                self.wfile.write(payload)
                return
            # Send up to byte `at` of the file (at least one byte less than promised).
            cut = max(0, min(fault["at"] - start, len(payload) - 1))
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            if fault["mode"] == "stall":
                # A dead connection: nothing more arrives until the client gives up.
                site.stop.wait(3.0)
            self.close_connection = True

    return Handler


@pytest.fixture
def serve():
    """Start a server for a Site on 127.0.0.1:0; everything is shut down after the test."""
    started = []

    def start(site: Site) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(site))
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True)
        thread.start()
        started.append((server, thread, site))
        return f"http://127.0.0.1:{server.server_address[1]}{PREFIX}"

    yield start
    for server, thread, site in started:
        site.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------- data


def _rows(bundled_dir: Path) -> pd.DataFrame:
    table = pd.read_csv(bundled_dir / IMAGE_CSV)
    picked = [table[table.Image_Metadata_Plate_DAPI == p].head(FIELDS_PER_PLATE) for p in PLATES]
    return pd.concat(picked, ignore_index=True)


def _zip_plate(plate: str, rows: pd.DataFrame, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        names = rows.loc[rows.Image_Metadata_Plate_DAPI == plate, list(CHANNEL_FILES)]
        for name in names.to_numpy().ravel():
            tif = io.BytesIO()
            tifffile.imwrite(tif, rng.integers(0, 4096, size=(16, 20), dtype=np.uint16))
            zf.writestr(f"{plate}/{name}", tif.getvalue())
    return buf.getvalue()


@pytest.fixture
def official(bundled_dir) -> dict[str, bytes]:
    """The files of the official layout, for two tiny plates."""
    rows = _rows(bundled_dir)
    files = {
        IMAGE_CSV: rows.to_csv(index=False).encode(),
        MOA_CSV: (bundled_dir / MOA_CSV).read_bytes(),
        F.COMPOUND_CSV: b"compound,smiles\ntaxol,C\n",
    }
    for i, plate in enumerate(PLATES):
        files[F.archive_name(plate)] = _zip_plate(plate, rows, seed=i)
    return files


def _damage(data: bytes) -> bytes:
    """Flip bytes inside the first member's data: same size, CRC check fails."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    info = zf.infolist()[0]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 8
    out = bytearray(data)
    for k in range(start, start + 16):
        out[k] ^= 0xFF
    return bytes(out)


def _options(url: str, **kw) -> F.FetchOptions:
    base = dict(base_url=url, retries=2, retry_wait=0.0, timeout=5.0, chunk_size=256)
    base.update(kw)
    return F.FetchOptions(**base)


def _tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != F.COMPLETE_MARKER}


def _fetch(dest, url, **kw):
    option_keys = [k for k in kw if k in F.FetchOptions.__dataclass_fields__]
    options = _options(url, **{k: kw.pop(k) for k in option_keys})
    events = []
    result = run_to_end(F.fetch_bbbc021(dest, options=options, **kw), events.append)
    return result, events


# --------------------------------------------------------------------------- tests


def test_normal_fetch_is_loadable(tmp_path, serve, official, bundled_dir):
    site = Site(official)
    url = serve(site)
    dest = tmp_path / "BBBC021"
    result, events = _fetch(dest, url, plates=list(PLATES))

    assert result.completed == list(PLATES) and not result.failed
    for plate in PLATES:
        assert F.is_plate_complete(dest, plate)
        marker = json.loads((dest / plate / F.COMPLETE_MARKER).read_text())
        archive = official[F.archive_name(plate)]
        assert marker["sha256"] == hashlib.sha256(archive).hexdigest()
        assert marker["files"] == 3 * FIELDS_PER_PLATE
    assert not (dest / F.DOWNLOAD_DIR).exists()  # archives removed after unpacking
    assert not list(dest.glob(".*unpacking*"))

    meta = load_metadata(dest)
    assert len(meta.table) == FIELDS_PER_PLATE * len(PLATES)
    assert set(meta.table.plate) == set(PLATES)
    first = Path(meta.table.path_DAPI[0])
    assert first.parent.parent == dest and first.exists()
    assert tifffile.imread(first).dtype == np.uint16
    # The bundled WS-DINO field table, pointed at the fetched images (docs/bbbc021.md).
    ws = load_metadata(bundled_dir / IMAGE_CSV, image_root=dest, drop_missing=True)
    assert sorted(ws.table.plate.unique()) == sorted(PLATES)
    assert len(ws.table) == FIELDS_PER_PLATE * len(PLATES)

    fetch_events = [e for e in events if e.stage == "fetch" and e.info.get("phase") == "download"]
    assert fetch_events[-1].step == sum(len(official[F.archive_name(p)]) for p in PLATES)
    assert {e.info["plate"] for e in fetch_events} == set(PLATES)
    assert all(e.info["file_done"] <= e.info["file_total"] for e in fetch_events)


def test_rerun_skips_complete_plates(tmp_path, serve, official):
    site = Site(official)
    url = serve(site)
    dest = tmp_path / "d"
    _fetch(dest, url, plates=list(PLATES))
    before = _tree(dest)
    n_get = len(site.log)
    result, _ = _fetch(dest, url, plates=list(PLATES))
    assert result.skipped == list(PLATES) and result.completed == []
    assert not [r for r in site.log[n_get:] if r[0] == "GET"]  # nothing downloaded again
    assert _tree(dest) == before


def test_truncated_response_is_resumed(tmp_path, serve, official):
    site = Site(official)
    name = F.archive_name(PLATES[0])
    site.faults[name] = {"mode": "truncate", "at": len(official[name]) // 3, "times": 1}
    url = serve(site)
    dest = tmp_path / "d"
    result, _ = _fetch(dest, url, plates=[PLATES[0]])
    assert result.completed == [PLATES[0]]
    ranges = site.gets(name)
    assert ranges[0] is None and ranges[1] == f"bytes={len(official[name]) // 3}-"
    marker = json.loads((dest / PLATES[0] / F.COMPLETE_MARKER).read_text())
    assert marker["sha256"] == hashlib.sha256(official[name]).hexdigest()


def test_persistent_truncation_names_plate_url_and_resume(tmp_path, serve, official):
    site = Site(official)
    name = F.archive_name(PLATES[0])
    stuck_at = len(official[name]) // 2
    site.faults[name] = {"mode": "truncate", "at": stuck_at, "times": None}
    url = serve(site)
    dest = tmp_path / "d"
    with pytest.raises(F.FetchError) as err:
        _fetch(dest, url, plates=list(PLATES), retries=2)
    msg = str(err.value)
    assert PLATES[0] in msg and url + name in msg and "rerun the same command" in msg
    assert err.value.plate == PLATES[0] and err.value.url == url + name
    assert len(site.gets(name)) == 3  # first try + 2 retries
    assert not (dest / PLATES[0]).exists()
    assert F.is_plate_complete(dest, PLATES[1])  # the other plate went on
    part = dest / F.DOWNLOAD_DIR / (name + ".part")
    assert part.stat().st_size == stuck_at

    # The mirror recovers: the same call resumes from the partial file.
    site.faults.clear()
    result, _ = _fetch(dest, url, plates=list(PLATES))
    assert result.completed == [PLATES[0]] and result.skipped == [PLATES[1]]
    assert site.gets(name)[-1] == f"bytes={stuck_at}-"
    assert F.is_plate_complete(dest, PLATES[0]) and not part.exists()


def test_dropped_connection_resume_gives_identical_result(tmp_path, serve, official):
    site = Site(official)
    url = serve(site)
    reference = tmp_path / "ref"
    _fetch(reference, url, plates=[PLATES[1]])

    name = F.archive_name(PLATES[1])
    cut = len(official[name]) // 2 + 7
    site.faults[name] = {"mode": "stall", "at": cut, "times": 1}
    dest = tmp_path / "d"
    with pytest.raises(F.FetchError, match=PLATES[1]):
        _fetch(dest, url, plates=[PLATES[1]], retries=0, timeout=0.5)
    part = dest / F.DOWNLOAD_DIR / (name + ".part")
    assert part.stat().st_size == cut
    assert not (dest / PLATES[1]).exists()

    result, _ = _fetch(dest, url, plates=[PLATES[1]])
    assert result.completed == [PLATES[1]]
    assert site.gets(name)[-1] == f"bytes={cut}-"
    assert _tree(dest / PLATES[1]) == _tree(reference / PLATES[1])
    assert load_metadata(dest, drop_missing=True).table.plate.unique().tolist() == [PLATES[1]]


def test_corrupt_zip_is_refused_and_not_marked_complete(tmp_path, serve, official):
    name = F.archive_name(PLATES[0])
    files = dict(official)
    files[name] = _damage(official[name])
    site = Site(files)
    url = serve(site)
    dest = tmp_path / "d"
    with pytest.raises(F.FetchError) as err:
        _fetch(dest, url, plates=[PLATES[0]])
    msg = str(err.value)
    assert PLATES[0] in msg and url + name in msg and "CRC" in msg
    assert len(site.gets(name)) == 2  # fetched once more from scratch before giving up
    assert not (dest / PLATES[0]).exists()
    assert not F.is_plate_complete(dest, PLATES[0])
    assert not list(dest.glob(f".{PLATES[0]}*"))  # no temporary folder left behind
    downloads = dest / F.DOWNLOAD_DIR
    assert (list(downloads.iterdir()) if downloads.exists() else []) == []  # damaged copy deleted


def test_known_hash_mismatch_is_refused(tmp_path, serve, official):
    site = Site(official)
    url = serve(site)
    dest = tmp_path / "d"
    name = F.archive_name(PLATES[0])
    with pytest.raises(F.FetchError, match="SHA-256"):
        _fetch(dest, url, plates=[PLATES[0]], hashes={name: "0" * 64})
    assert not (dest / PLATES[0]).exists()
    # The right hash (e.g. from a manifest) passes.
    manifest = tmp_path / "BBBC021.sha256"
    manifest.write_text(f"{hashlib.sha256(official[name]).hexdigest()}  {name}\n")
    result, _ = _fetch(dest, url, plates=[PLATES[0]], hashes=F.load_manifest(manifest))
    assert result.completed == [PLATES[0]]
    assert F.manifest_from_dest(dest) == F.load_manifest(manifest)


def test_disk_space_is_checked_before_downloading(tmp_path, serve, official):
    site = Site(official)
    url = serve(site)
    dest = tmp_path / "d"

    class Tiny:
        free = 1000

    with pytest.raises(F.FetchError, match="Not enough disk space"):
        run_to_end(F.fetch_bbbc021(dest, plates=list(PLATES), options=_options(url),
                                   disk_usage=lambda path: Tiny))
    assert not [n for m, n, r in site.log if m == "GET" and n.endswith(".zip")]
    plan = F.plan_fetch(dest, list(PLATES), _options(url))
    sizes = [len(official[F.archive_name(p)]) for p in PLATES]
    assert [j.size for j in plan.jobs] == sizes
    assert plan.download_bytes == sum(sizes)
    assert plan.disk_needed == sum(int(s * F.UNPACK_RATIO) for s in sizes) + max(sizes)


def test_hand_unpacked_plate_is_adopted(tmp_path, serve, official):
    site = Site(official)
    url = serve(site)
    dest = tmp_path / "d"
    run_to_end(F.fetch_metadata(dest, _options(url)))
    with zipfile.ZipFile(io.BytesIO(official[F.archive_name(PLATES[0])])) as zf:
        zf.extractall(dest)
    plan = F.plan_fetch(dest, list(PLATES), _options(url))
    assert [j.complete for j in plan.jobs] == [True, False]
    assert F.is_plate_complete(dest, PLATES[0])


def test_plate_selection(tmp_path, serve, official):
    assert F.select_plates(tmp_path, subset="moa") == F.bundled_plates()
    assert len(F.bundled_plates()) == 55
    assert F.select_plates(tmp_path, plates=[F.archive_name(PLATES[0])]) == [PLATES[0]]
    with pytest.raises(F.FetchError, match="Did you mean .*Week1_22123"):
        F.select_plates(tmp_path, plates=["Week1_2212"])
    with pytest.raises(F.FetchError, match="exactly one way"):
        F.select_plates(tmp_path)
    with pytest.raises(F.FetchError, match="fetch the metadata first"):
        F.select_plates(tmp_path, all_plates=True)
    url = serve(Site(official))
    result, _ = _fetch(tmp_path, url, metadata_only=True)
    assert [p.name for p in result.metadata] == list(F.METADATA_FILES)
    assert F.select_plates(tmp_path, all_plates=True) == sorted(PLATES)


def test_cli_fetch_all(tmp_path, serve, official, capsys):
    site = Site(official)
    url = serve(site)
    dest = tmp_path / "cli"
    assert main(["fetch-bbbc021", str(dest), "--all", "--base-url", url, "--yes", "-q"]) == 0
    out = capsys.readouterr().out
    assert "2 plate(s) fetched" in out
    assert all(F.is_plate_complete(dest, p) for p in PLATES)
    assert main(["fetch", str(dest), "--all", "--base-url", url, "--yes", "-q"]) == 0
    assert "Nothing to do" in capsys.readouterr().out
    # With the progress bar, into a second folder.
    assert main(["fetch-bbbc021", str(tmp_path / "bar"), "--plates", PLATES[1],
                 "--base-url", url, "--yes"]) == 0
    err = capsys.readouterr().err
    assert "overall [" in err and PLATES[1] in err and "100%" in err
    # A mirror without the files: exit code 2 and a message naming the URL.
    bad = url.replace("/bbbc/", "/nowhere/")
    assert main(["fetch-bbbc021", str(tmp_path / "x"), "--all", "--base-url", bad, "--yes",
                 "-q", "--retries", "0"]) == 2
    assert f"{bad}{IMAGE_CSV}" in capsys.readouterr().err


def test_cli_defaults_are_fetch_options():
    """The CLI's defaults and choices come from core.fetch, written once there."""
    from napari_wsdino.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["fetch-bbbc021", "dest", "--all"])
    defaults = F.FetchOptions()
    assert (args.retries, args.timeout, args.base_url, args.keep_zips) == (
        defaults.retries, defaults.timeout, defaults.base_url, defaults.keep_zips)
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    (subset,) = [a for a in sub.choices["fetch-bbbc021"]._actions if a.dest == "subset"]
    assert list(subset.choices) == list(F.SUBSETS)


def test_package_reexports_every_job_module():
    """core.fetch is split by job; each module's public names stay importable from it."""
    import importlib
    import pkgutil

    modules = [m.name for m in pkgutil.iter_modules(F.__path__)]
    assert set(modules) >= {"selection", "manifest", "http", "archive", "plan"}
    for name in modules:
        module = importlib.import_module(f"{F.__name__}.{name}")
        for attr in module.__all__:
            assert getattr(F, attr) is getattr(module, attr), f"{name}.{attr}"
            assert attr in F.__all__, f"{name}.{attr} missing from core.fetch.__all__"


def test_core_does_not_import_napari():
    import subprocess
    import sys

    code = ("import sys, napari_wsdino.core.fetch; "
            "print(any(m in sys.modules for m in ('napari', 'qtpy', 'magicgui')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_file_url_mirror_without_optional_table(tmp_path, bundled_dir):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in (IMAGE_CSV, MOA_CSV):
        (mirror / name).write_bytes((bundled_dir / name).read_bytes())
    options = F.FetchOptions(base_url=mirror.as_uri(), retries=0)
    events = []
    result = run_to_end(F.fetch_bbbc021(tmp_path / "d", metadata_only=True, options=options),
                        events.append)
    assert [p.name for p in result.metadata] == [IMAGE_CSV, MOA_CSV]
    assert any(F.COMPOUND_CSV in e.message and "skipped" in e.message for e in events)
    assert not list((tmp_path / "d").glob("*.part"))
    assert len(load_metadata(tmp_path / "d", check_files=False).table) == 3848


def test_stopping_the_generator_keeps_partial_work(tmp_path, serve, official):
    """The Data panel's worker stops at a yield: a later run resumes, nothing half-made."""
    site = Site(official)
    url = serve(site)
    dest = tmp_path / "d"
    name = F.archive_name(PLATES[0])

    gen = F.fetch_bbbc021(dest, plates=[PLATES[0]], options=_options(url))
    for event in gen:
        if event.info.get("phase") == "download" and event.info["file_done"] >= 1024:
            stopped_at = event.info["file_done"]
            break
    gen.close()
    assert (dest / F.DOWNLOAD_DIR / (name + ".part")).stat().st_size == stopped_at

    gen = F.fetch_bbbc021(dest, plates=[PLATES[0]], options=_options(url))
    for event in gen:
        if event.info.get("phase") == "unpack" and event.info["file_done"] == 2:
            break
    gen.close()
    assert site.gets(name)[-1] == f"bytes={stopped_at}-"
    assert not (dest / PLATES[0]).exists() and not list(dest.glob(".*unpacking*"))

    result = run_to_end(F.fetch_bbbc021(dest, plates=[PLATES[0]], options=_options(url)))
    assert result.completed == [PLATES[0]]
    assert len(site.gets(name)) == 2  # the finished archive was reused, not fetched again
    marker = json.loads((dest / PLATES[0] / F.COMPLETE_MARKER).read_text())
    assert marker["sha256"] == hashlib.sha256(official[name]).hexdigest()


def test_web_page_instead_of_file_is_refused(tmp_path, serve, official):
    files = dict(official)
    files[IMAGE_CSV] = b"<html><body>We moved! Log in first.</body></html>"
    site = Site(files)
    site.types[IMAGE_CSV] = "text/html; charset=utf-8"
    url = serve(site)
    with pytest.raises(F.FetchError, match="web page") as err:
        _fetch(tmp_path / "d", url, metadata_only=True)
    assert url + IMAGE_CSV in str(err.value)
    assert not (tmp_path / "d" / IMAGE_CSV).exists()
    assert len(site.gets(IMAGE_CSV)) == 1  # not retried: retrying cannot help


def test_verify_archive_messages(tmp_path, official):
    good = tmp_path / "good.zip"
    good.write_bytes(official[F.archive_name(PLATES[0])])
    assert F.verify_archive(good) == hashlib.sha256(good.read_bytes()).hexdigest()
    steps = list(F.iter_verify_archive(good))
    assert steps[-1][0] <= steps[-1][1] and len(steps) > 3 * FIELDS_PER_PLATE
    bad = tmp_path / "bad.zip"
    bad.write_bytes(_damage(good.read_bytes()))
    with pytest.raises(F.FetchError, match=r"bad.zip is damaged: member Week1_22123/.* CRC"):
        F.verify_archive(bad)
    page = tmp_path / "page.zip"
    page.write_bytes(b"<html>not found</html>")
    with pytest.raises(F.FetchError, match="not a readable zip"):
        F.verify_archive(page)


@pytest.mark.parametrize("argv, words", [
    (["--timeout", "-1"], ["--timeout must be a number of seconds above 0", "-1.0"]),
    (["--timeout", "0"], ["--timeout must be a number of seconds above 0", "0.0"]),
    (["--timeout", "nan"], ["--timeout must be"]),
    (["--base-url", "notaurl"], ["--base-url 'notaurl' is not a folder URL", "https://"]),
    (["--base-url", "https:/no-host"], ["is not a folder URL"]),
    (["--retries", "-2"], ["--retries is how many times to try again, 0 or more", "-2"]),
])
def test_bad_timeout_and_base_url_are_one_line_before_any_request(tmp_path, capsys, argv, words):
    """Issue 30 b: no ValueError traceback, no 'Operation now in progress'."""
    from napari_wsdino.cli import main

    dest = tmp_path / "bbbc021"
    code = main(["fetch-bbbc021", str(dest), "--metadata-only", *argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("wsdino fetch") and ": error: " in line
    for w in words:
        assert w in line, (w, line)
    assert not dest.exists()
    with pytest.raises(F.FetchError):
        F.FetchOptions(timeout=-1)


def test_archive_missing_listed_files_is_refused_and_not_marked_complete(tmp_path, serve,
                                                                        official, bundled_dir):
    """Issue 30: an archive with fewer fields than the image CSV lists is not 'complete'."""
    rows = _rows(bundled_dir)
    name = F.archive_name(PLATES[0])
    files = dict(official)
    files[name] = _zip_plate(PLATES[0], rows.head(1), seed=0)  # 3 of the plate's files
    url = serve(Site(files))
    dest = tmp_path / "d"
    with pytest.raises(F.FetchError) as err:
        _fetch(dest, url, plates=[PLATES[0]])
    msg = str(err.value)
    assert f"holds 3 of the {3 * FIELDS_PER_PLATE} image files" in msg
    assert "not marked complete" in msg and "--base-url" in msg
    assert not (dest / PLATES[0]).exists() and not F.is_plate_complete(dest, PLATES[0])
    downloads = dest / F.DOWNLOAD_DIR
    assert not downloads.exists() or list(downloads.iterdir()) == []  # fetched anew on rerun
