"""Fetch BBBC021 dock widget: download the real plates from the Data panel.

The same as ``wsdino fetch-bbbc021`` (see ``docs/bbbc021.md``): it runs
``core.fetch.fetch_bbbc021`` in a worker, with napari's progress bar for the
whole download and a bar in the dock for the current file. *Stop* takes effect at
the next event; partial files are kept, and *Fetch* again resumes. When the fetch
finishes, the folder is read the way the plate browser opens one and becomes the
viewer's dataset, so the plate browser shows it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator
from urllib.parse import urlparse

from qtpy.QtWidgets import QCheckBox, QFileDialog, QFormLayout, QLabel, QLineEdit, QProgressBar

from napari_wsdino.core.fetch import (
    DEFAULT_BASE_URL,
    FetchError,
    FetchOptions,
    FetchResult,
    fetch_bbbc021,
)
from napari_wsdino.core.metadata import DataError, Metadata, load_metadata
from napari_wsdino.core.progress import Progress
from napari_wsdino._napari import settings
from napari_wsdino._napari.plate_browser import LAST_FOLDER
from napari_wsdino._napari.dock import WorkerDock, add_row, button, combo, edit_row, hrow, tip
from napari_wsdino._napari.workers import start_worker

if TYPE_CHECKING:
    import napari

PREFIX = "fetch."
#: Plate choices of the combo box, in order: label -> key of :class:`FetchRequest`.
CHOICES = {"MoA subset": "moa", "All plates": "all", "These plates": "list"}
BAR_STEPS = 1000  # per-file bar in permille: byte counts can exceed a Qt int
_ARCHIVE = re.compile(r"BBBC021_v1_images_([^/]+)\.zip$")


@dataclass(frozen=True)
class FetchRequest:
    """What the dock asks ``fetch_bbbc021`` for (one validated value, see :func:`make_request`)."""

    dest: Path
    choice: str
    plates: tuple[str, ...] = ()
    metadata_only: bool = False
    base_url: str = DEFAULT_BASE_URL

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~napari_wsdino.core.fetch.fetch_bbbc021`."""
        kw: dict[str, Any] = {"metadata_only": self.metadata_only,
                              "options": FetchOptions(base_url=self.base_url)}
        if self.choice == "moa":
            kw["subset"] = "moa"
        elif self.choice == "all":
            kw["all_plates"] = True
        else:
            kw["plates"] = list(self.plates)
        return kw

    def describe(self) -> str:
        what = ("the metadata" if self.metadata_only else
                {"moa": "the MoA plates", "all": "every plate"}.get(
                    self.choice, f"{len(self.plates)} plate(s)"))
        return f"Fetching {what} into {self.dest} from {self.base_url}"


def make_request(dest: str, choice: str, plates_text: str, metadata_only: bool,
                 base_url: str) -> FetchRequest:
    """Widget values → :class:`FetchRequest`; raises :class:`FetchError` on bad input.

    ``choice`` is ``"moa"``, ``"all"`` or ``"list"``; with ``"list"``, ``plates_text``
    holds plate names separated by commas or spaces. An empty base URL means the
    official one. Plate names are checked by the core (with suggestions for typos).
    """
    dest = dest.strip()
    if not dest:
        raise FetchError("Choose a destination folder.")
    if choice not in CHOICES.values():
        raise FetchError(f"Unknown plate choice {choice!r}.")
    plates = tuple(dict.fromkeys(p for p in plates_text.replace(",", " ").split() if p))
    if choice == "list" and not plates and not metadata_only:
        raise FetchError("Name at least one plate (e.g. Week1_22123), or choose the MoA "
                         "subset or all plates.")
    base_url = base_url.strip() or DEFAULT_BASE_URL
    scheme = urlparse(base_url).scheme
    if scheme not in ("http", "https", "file"):
        raise FetchError(f"Base URL {base_url!r} must start with http://, https:// or file://.")
    return FetchRequest(Path(dest).expanduser(), choice, plates if choice == "list" else (),
                        bool(metadata_only), base_url)


def fetch_and_read(request: FetchRequest) -> Generator[Progress, None, tuple[FetchResult, Any]]:
    """Fetch, then read the folder as the plate browser does (off the GUI thread).

    Returns the :class:`FetchResult` and the :class:`Metadata` of the fields whose
    images are there, or the reason there is nothing to browse yet (a string).
    """
    result = yield from fetch_bbbc021(request.dest, **request.kwargs())
    yield Progress("fetch", 0, 0, f"reading the dataset table in {request.dest}",
                   {"phase": "read"})
    return result, read_dataset(request.dest)


def read_dataset(dest: str | Path) -> Metadata | str:
    """The fields of ``dest`` with their images present, or why there are none.

    The official image CSV also lists treatments without a mechanism of action;
    they are left out (``unannotated="drop"``), which leaves the MoA-annotated
    fields and the DMSO controls that WS-DINO uses.
    """
    try:
        metadata = load_metadata(dest, drop_missing=True, unannotated="drop")
    except (DataError, OSError) as exc:
        return str(exc)
    if not len(metadata.table):
        return f"no plate of {dest} has its images yet"
    return metadata


def _read_job(dest: Path) -> Generator[Progress, None, Metadata | str]:
    yield Progress("fetch", 0, 0, f"reading {dest}", {"phase": "read"})
    return read_dataset(dest)


class FetchWidget(WorkerDock):
    """Download BBBC021 (metadata, MoA subset, all plates or a list) and open it."""

    settings_prefix = PREFIX
    stopping_text = "Stopping after the current chunk…"
    stopped_text = ("Stopped. Finished plates and the partial download are kept; press Fetch "
                    "to resume.")

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):
        super().__init__(napari_viewer, "The MoA plates are about 40 GB zipped and 105 GB "
                         "unpacked; a rerun resumes and skips finished plates.")
        self._read_worker = None
        self.request: FetchRequest | None = None
        self.result: FetchResult | None = None
        get = self.saved

        self.dest_edit = QLineEdit(str(get("dest", "")))
        self.dest_edit.setPlaceholderText("folder to fetch into, e.g. ~/data/BBBC021")
        self.dest_browse = button("Browse…", "Choose the destination folder", self._browse)
        saved_choice = get("choice", "moa")
        self.choice_combo = combo(CHOICES, next(
            (label for label, key in CHOICES.items() if key == saved_choice), None))
        self.plates_edit = tip(QLineEdit(str(get("plates", ""))), "Plate names, separated by "
                               "commas (the Image_Metadata_Plate_DAPI column of the image CSV)")
        self.plates_edit.setPlaceholderText("Week1_22123, Week1_22141, …")
        self.metadata_check = tip(QCheckBox("Metadata only (the three CSVs)"),
                                  "Download only the image, MoA and compound CSVs")
        self.url_edit = tip(QLineEdit(str(get("base_url", DEFAULT_BASE_URL))),
                            "Folder URL with the official file names: the Broad's, a mirror, a "
                            "local web server or a file:// folder")
        self.url_edit.setPlaceholderText(DEFAULT_BASE_URL)
        self.url_reset = button("Official", DEFAULT_BASE_URL,
                                lambda: self.url_edit.setText(DEFAULT_BASE_URL))
        self.fetch_button = button("Fetch", "Download (or resume) in the background; finished "
                                   "plates are skipped", self.fetch)
        self.stop_button = button("Stop", "Stop after the current chunk; Fetch again resumes",
                                  self.stop)
        self.idle_controls = (self.fetch_button, self.dest_edit, self.dest_browse,
                              self.metadata_check, self.url_edit, self.url_reset)
        self.busy_controls = (self.stop_button,)
        self.file_bar_tip = "Progress of the current file (download, verify, unpack)"
        self.file_bar = tip(QProgressBar(), self.file_bar_tip)
        self.file_bar.setRange(0, BAR_STEPS)
        self.file_bar.setValue(0)
        self.file_bar.setFormat("%p%")

        form = QFormLayout()
        add_row(form, "Destination", edit_row(self.dest_edit, self.dest_browse),
                "Folder the screen is downloaded and unpacked into")
        add_row(form, "Plates", self.choice_combo,
                "Which plates: the MoA subset, all plates, or the list below")
        add_row(form, "Plate list", self.plates_edit, self.plates_edit.toolTip())
        form.addRow("", self.metadata_check)
        add_row(form, "Base URL", edit_row(self.url_edit, self.url_reset), self.url_edit.toolTip())
        self.stack(form, hrow(self.fetch_button, self.stop_button), QLabel("Current file"),
                   self.file_bar, self.status_label, 1)

        self.choice_combo.currentTextChanged.connect(self._choice_changed)
        self.metadata_check.toggled.connect(lambda _on: self._choice_changed())
        self._choice_changed()
        self.set_running(False)

    # -- fields ----------------------------------------------------------------------
    def _browse(self) -> None:
        """Ask for the destination folder."""
        folder = QFileDialog.getExistingDirectory(self, "Fetch BBBC021 into",
                                                  self.dest_edit.text())
        if folder:
            self.dest_edit.setText(folder)

    def _choice_changed(self, *_) -> None:
        """The plate list is only used for "These plates"."""
        self.plates_edit.setEnabled(self.choice() == "list" and not self.metadata_check.isChecked()
                                    and not self.running)
        self.choice_combo.setEnabled(not self.metadata_check.isChecked() and not self.running)

    def choice(self) -> str:
        return CHOICES.get(self.choice_combo.currentText(), "moa")

    def make_request(self) -> FetchRequest:
        return make_request(self.dest_edit.text(), self.choice(), self.plates_edit.text(),
                            self.metadata_check.isChecked(), self.url_edit.text())

    # -- run -------------------------------------------------------------------------
    def fetch(self) -> None:
        """Start (or resume) the download in a worker."""
        if self.running:
            return
        try:
            request = self.make_request()
        except FetchError as exc:
            self.input_error(self.status_label, str(exc))
            return
        self.remember({"dest": str(request.dest), "base_url": request.base_url,
                       "choice": request.choice, "plates": self.plates_edit.text()})
        self.request, self.result = request, None
        self.start_task(fetch_and_read(request), f"{request.describe()}…",
                        describe=self._progress, on_done=self._done, desc="Fetch BBBC021")
        self._file_progress(0, 0, "connecting")

    def stop(self) -> None:
        """Stop at the next event; the partial file is kept and Fetch resumes it."""
        self.stop_task()

    def _progress(self, event: Progress) -> str:
        """The per-file bar from one core event; returns the status line."""
        info = event.info
        if event.stage == "download":  # a metadata table
            self._file_progress(event.step, event.total, str(info.get("file", "")))
        elif event.stage == "metadata":
            self._file_progress(1, 1, str(info.get("file", "")))
        elif "file_total" in info:
            label = f"{info.get('plate', '')} {info.get('phase', '')}".strip()
            self._file_progress(info.get("file_done", 0), info["file_total"], label)
        return event.message

    def _file_progress(self, done: int, total: int, label: str) -> None:
        if total:
            self.file_bar.setRange(0, BAR_STEPS)
            self.file_bar.setValue(min(BAR_STEPS, int(BAR_STEPS * done / total)))
        else:
            self.file_bar.setRange(0, 0)  # busy: the size is not known
        self.file_bar.setFormat(f"{label}: %p%" if label else "%p%")

    def _done(self, value: tuple[FetchResult, Any]) -> None:
        result, dataset = value
        self.result = result
        self._file_progress(1, 1, "done")
        parts = []
        if result.completed:
            parts.append(f"{len(result.completed)} plate(s) fetched")
        if result.skipped:
            parts.append(f"{len(result.skipped)} already complete")
        if not parts:
            parts.append(f"{len(result.metadata)} metadata table(s)")
        summary = f"Done: {', '.join(parts)} in {result.dest}."
        self.status_label.setText(f"{summary} {self._adopt(dataset)}")

    def _adopt(self, dataset: Metadata | str) -> str:
        """Make the fetched folder the viewer's dataset; returns a line for the status."""
        if isinstance(dataset, str):
            return f"Nothing to browse yet: {dataset}."
        dest = str(self.request.dest)
        settings.remember(LAST_FOLDER, dest)  # the plate browser proposes it next time
        self.state.set_dataset(dataset, dest)
        s = dataset.summary()
        return f"Opened in the plate browser: {s['fields']} fields on {s['plates']} plate(s)."

    def task_failed(self, exc: BaseException) -> None:
        """Status line naming the plate and URL (the notification came from start_worker)."""
        super().task_failed(exc)
        plate, url = getattr(exc, "plate", None), getattr(exc, "url", None)
        if not plate and url:  # e.g. a missing archive, found while planning
            m = _ARCHIVE.search(str(url))
            plate = m.group(1) if m else None
        where = [f"plate {plate}"] if plate else []
        if url:
            where.append(str(url))
        at = f" ({', '.join(where)})" if where else ""
        self.status_label.setText(f"Fetch failed{at}: {exc}")
        if getattr(exc, "plate", None) and self.request is not None:
            # Finished plates are kept: let the user browse them meanwhile (read off
            # the GUI thread: a whole screen's files are checked).
            self._read_worker = start_worker(_read_job(self.request.dest),
                                             on_done=self._adopt_partial, progress_bar=False,
                                             desc="Reading the fetched plates", owner=self)

    def _adopt_partial(self, dataset: Metadata | str) -> None:
        """After a failure: open the plates that did finish."""
        if not isinstance(dataset, str):
            self.status_label.setText(f"{self.status_label.text()}\n{self._adopt(dataset)}")

    def set_running(self, running: bool) -> None:
        super().set_running(running)
        self._choice_changed()
