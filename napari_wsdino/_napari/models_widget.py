"""Load models dock widget: the per-channel model set that attention and evaluation use.

Sources: a training run folder (``RUN/<channel>/checkpoint.pth``, what the Train
panel writes), one weights file per channel (ours, timm's, official DINO's or
``.safetensors``), the same initial weights for every channel ("init only", the
paper's ImageNet-DINO baseline), the official DINO ViT-S/8 weights by name (the
same, downloaded once into the ecosystem's cache after the user agrees: bytes shown,
Cancel keeps no partial file), or random initialisation (the no-learning baseline).
Loading runs in a worker; the result goes into the shared state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Generator
from urllib.parse import urlsplit

from qtpy.QtWidgets import QFileDialog, QFormLayout, QLabel, QLineEdit, QMessageBox

from napari_wsdino.core.errors import CheckpointError
from napari_wsdino.core.metadata import CHANNELS, DataError
from napari_wsdino.core.model import ARCHITECTURES, DEFAULT_ARCH
from napari_wsdino.core.modelset import ModelSet, describe
from napari_wsdino.core.pretrained import (DEFAULT_INIT, OFFICIAL, cached_official,
                                           download_official, weights_exist)
from napari_wsdino.core.progress import Progress
from napari_wsdino.core import layout
from napari_wsdino.core.train import TrainConfig
from napari_wsdino._napari.dock import (WorkerDock, add_row, button, combo, data_combo,
                                        edit_row, hrow)

if TYPE_CHECKING:
    import napari

SOURCES = {
    "run": "Training run folder",
    "files": "One weights file per channel",
    "init-only": "Same initial weights for every channel",
    "official": "Official DINO ViT-S/8",
    "random": "Random initialisation (baseline)",
}
WHICH = ("teacher", "student")
ARCHS = tuple(ARCHITECTURES)  # core.model's registry; the box is editable
PREFIX = "models."
#: How a file downloaded by hand is used, in the offline message.
BY_HAND = "choose that file under 'Same initial weights for every channel'"


@dataclass(frozen=True)
class LoadConfig:
    """What to load; built from the widget by :func:`make_config`."""

    source: str
    channels: tuple[str, ...] = CHANNELS
    path: str = ""
    files: dict[str, str] = field(default_factory=dict)
    arch: str = DEFAULT_ARCH
    which: str = "teacher"
    seed: int = 0


def make_config(source: str, channels, path: str = "", files: dict | None = None,
                arch: str = DEFAULT_ARCH, which: str = "teacher", seed: int = 0) -> LoadConfig:
    """Validate widget values into a :class:`LoadConfig` (errors name the missing input)."""
    if source not in SOURCES:
        raise DataError(f"Unknown model source {source!r}; choose one of {list(SOURCES)}.")
    channels = tuple(channels) or CHANNELS
    path = str(path).strip()
    files = {c: str(p).strip() for c, p in (files or {}).items() if str(p).strip()}
    if source in ("run", "init-only") and not path:
        raise DataError(f"{SOURCES[source]}: choose a {'folder' if source == 'run' else 'file'} first.")
    if source in ("run", "init-only") and not weights_exist(path):
        raise DataError(f"{path} does not exist.")
    if source == "official" and path not in OFFICIAL:
        raise DataError(f"Unknown official weights {path!r}; choose one of {list(OFFICIAL)}.")
    if source == "files":
        if not files:
            raise DataError("Give a weights file for at least one channel.")
        absent = [p for p in files.values() if not weights_exist(p)]
        if absent:
            raise DataError(f"Weights file(s) not found: {absent}.")
    if which not in WHICH:
        raise DataError(f"which must be one of {WHICH}.")
    return LoadConfig(source, channels, path, files, arch.strip() or DEFAULT_ARCH, which, int(seed))


def load_model_set(config: LoadConfig) -> ModelSet:
    """The model set a :class:`LoadConfig` describes (one core call per source)."""
    if config.source == "run":
        found = [c for c in config.channels if layout.channel_dir(config.path, c).is_dir()]
        return ModelSet.from_run(config.path, found or None, which=config.which)
    if config.source == "files":
        return ModelSet.from_files(config.files, arch=config.arch, which=config.which)
    if config.source in ("init-only", "official"):  # an official name is a weights file
        return ModelSet.init_only(config.arch, config.path, config.channels)
    return ModelSet.random(config.arch, config.channels, seed=config.seed)


def official_names(config: LoadConfig) -> list[str]:
    """The official weights a config names (fetched before loading)."""
    named = [config.path] if config.source in ("init-only", "official") else []
    named += list(config.files.values()) if config.source == "files" else []
    return list(dict.fromkeys(n for n in named if n in OFFICIAL))


def cached_file(name: str) -> Path | None:
    """The cached file of official weights, or None (also when timm cannot say where)."""
    try:
        return cached_official(name)
    except CheckpointError:  # the download will say why, as one line
        return None


def missing_official(config: LoadConfig) -> list[str]:
    """The official weights a config names that are not cached yet (would download)."""
    return [n for n in official_names(config) if cached_file(n) is None]


def consent_text(names: list[str]) -> str:
    """What the user agrees to: each file, its size, where from and where to."""
    lines = [f"{OFFICIAL[n].file} (about {OFFICIAL[n].size / 1e6:.0f} MB) from "
             f"{OFFICIAL[n].url} into {OFFICIAL[n].cache_path()}" for n in names]
    return ("Download " + "; ".join(lines) + "? It is downloaded once and read from "
            "there afterwards.")


def load_job(config: LoadConfig) -> Generator[Progress, None, ModelSet]:
    """Progress-yielding wrapper of :func:`load_model_set` for a worker: official weights
    are downloaded first (bytes as events; no network when cached)."""
    for name in official_names(config):
        yield from download_official(name, by_hand=BY_HAND)
    yield Progress("load models", 0, 1, SOURCES[config.source])
    models = load_model_set(config)
    yield Progress("load models", 1, 1, "loaded")
    return models


def run_arch(run: str | Path) -> str | None:
    """The architecture a training run folder's channels were trained with (config.toml)."""
    if not str(run).strip() or not Path(run).is_dir():
        return None
    for saved in sorted(Path(run).glob(f"*/{layout.CONFIG_FILE}")):  # any channel's
        try:
            return TrainConfig.load(saved).arch
        except (OSError, ValueError):
            continue
    return None


class ModelLoader(WorkerDock):
    """Choose where the per-channel models come from, and load them."""

    settings_prefix = PREFIX
    failed_text = "Could not load"
    stopping_text = "Cancelling…"
    stopped_text = "Cancelled: no partial download is kept."

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):
        super().__init__(napari_viewer, "No models loaded.")
        self.source_combo = data_combo(((t, k) for k, t in SOURCES.items()),
                                       self.saved("source", "run"))
        self.path_edit = QLineEdit(self.saved("path", ""))
        self.path_edit.setPlaceholderText("run folder; for init-only a weights file or "
                                          + DEFAULT_INIT)
        self.browse_button = button("Browse…", "Choose the run folder, or the weights file",
                                    self._browse)
        self.arch_combo = combo(ARCHS, self.saved("arch", DEFAULT_ARCH), editable=True)
        self.which_combo = combo(WHICH)
        self.official_combo = data_combo(((w.title, n) for n, w in OFFICIAL.items()),
                                         self.saved("official", next(iter(OFFICIAL))))
        self.official_label = QLabel()
        self.official_label.setWordWrap(True)
        self.official_label.setMinimumWidth(1)  # a long path never widens the dock
        self.file_edits: dict[str, QLineEdit] = {}
        self.files_form = QFormLayout()
        self.load_button = button("Load models", "Load the model set in the background; "
                                  "Attention and Evaluate use it", self.load)
        self.cancel_button = button("Cancel", "Stop the download (no partial file is kept) "
                                    "or the loading", self.stop_task)
        self.idle_controls = (self.load_button,)
        self.busy_controls = (self.cancel_button,)

        form = QFormLayout()
        add_row(form, "Source", self.source_combo,
                "Where the per-channel models come from: a training run, one file per channel, "
                "the same initial weights for every channel (ImageNet-DINO baseline), the "
                "official DINO ViT-S/8 weights by name, or random")
        add_row(form, "Path", edit_row(self.path_edit, self.browse_button),
                "The training run folder, or the initial weights file")
        add_row(form, "Official", self.official_combo,
                "The official ImageNet DINO ViT-S/8 weights (Caron et al. 2021): the backbone "
                "(timm's vit_small_patch8_224.dino, huggingface_hub's cache) or the full "
                "checkpoint with the DINO head (facebookresearch/dino, torch.hub's cache), "
                "for every channel; downloaded once, after you agree")
        form.addRow(self.official_label)
        self.form = form
        add_row(form, "Architecture", self.arch_combo,
                "timm ViT name for weights files and random models; a run's checkpoints name "
                "their own architecture")
        add_row(form, "Weights", self.which_combo,
                "teacher (DINO's evaluation default) or student weights of a checkpoint")
        self.stack(form, self.files_form, hrow(self.load_button, self.cancel_button),
                   self.status_label, 1)
        self.set_running(False)

        self._set_channels(self._channels())
        self._source_changed()
        self.source_combo.currentIndexChanged.connect(self._source_changed)
        self.state.model_changed.connect(self._point_at_run)
        self.state.metadata_changed.connect(lambda _m: self._set_channels(self._channels()))
        self.state.cache_changed.connect(lambda _c: self._set_channels(self._channels()))
        self.state.models_changed.connect(self._show_models)
        self.path_edit.editingFinished.connect(self._source_changed)
        self.official_combo.currentIndexChanged.connect(self._source_changed)
        if self.state.models is not None:
            self._show_models(self.state.models)
        elif self.state.model_path is not None:  # a run trained before this dock opened
            self._point_at_run(self.state.model_path)

    def _channels(self) -> tuple[str, ...]:
        """The preprocessed cache's channels, else the open dataset's; BBBC021's only
        when nothing is loaded."""
        from napari_wsdino.core.cache import open_cache

        if self.state.cache_path is not None:
            try:
                return tuple(open_cache(self.state.cache_path).channels)
            except (DataError, OSError, ValueError):
                pass
        meta = self.state.metadata
        return tuple(meta.channels) if meta is not None else CHANNELS

    def _set_channels(self, channels: tuple[str, ...]) -> None:
        """One file picker row per channel (used by the per-channel source)."""
        if tuple(self.file_edits) == channels:
            return
        while self.files_form.rowCount():
            self.files_form.removeRow(0)
        self.file_edits = {c: QLineEdit() for c in channels}
        for channel, edit in self.file_edits.items():
            edit.setPlaceholderText(f"{channel} weights (.pth / .safetensors / run folder)")
            edit.setToolTip(f"Weights file of the {channel} model (ours, timm, official DINO "
                            "or .safetensors); empty leaves the channel out")
            self.files_form.addRow(channel, edit)
        self._source_changed()

    def _source_changed(self, *_):
        """Show the inputs the chosen source needs."""
        source = self.source_combo.currentData()
        for edit in self.file_edits.values():
            edit.setVisible(source == "files")
            label = self.files_form.labelForField(edit)
            if label is not None:
                label.setVisible(source == "files")
        self.path_edit.setEnabled(source in ("run", "init-only"))
        self.browse_button.setEnabled(source in ("run", "init-only"))
        for widget in (self.official_combo, self.official_label,
                       self.form.labelForField(self.official_combo)):
            widget.setVisible(source == "official")
        # a run's checkpoints name their architecture: show it, never a stale choice
        arch = run_arch(self.path_edit.text()) if source == "run" else None
        if arch:
            self.arch_combo.setCurrentText(arch)
        self.arch_combo.setEnabled(source not in ("run", "official"))
        self._show_official()

    def _show_official(self) -> None:
        """Whether the chosen official weights are cached (loaded with no network) or
        would be downloaded (how much, from where); the button says which."""
        weights = OFFICIAL[self.official_combo.currentData()]
        cached = cached_file(weights.name)
        if cached is not None:
            text = f"Cached in {cached.parent} (loads with no network)."
            tooltip = f"Cached: {cached}"
        else:
            host = urlsplit(weights.url).netloc
            text = (f"Not downloaded yet: about {weights.size / 1e6:.0f} MB from {host} "
                    f"into {weights.cache_path().parent}.")
            tooltip = (f"Not downloaded yet: {weights.file} from {weights.url} into "
                       f"{weights.cache_path()}")
        self.official_label.setToolTip(tooltip)
        self.official_label.setText(text.replace("/", "/\u200b"))  # long paths wrap at a /
        download = self.source_combo.currentData() == "official" and cached is None
        self.load_button.setText("Download and load…" if download else "Load models")

    def _browse(self) -> None:
        """Folder for runs, file for init-only weights."""
        if self.source_combo.currentData() == "run":
            path = QFileDialog.getExistingDirectory(self, "Training run folder", self.path_edit.text())
        else:
            path, _ = QFileDialog.getOpenFileName(self, "Weights file", self.path_edit.text(),
                                                  "Weights (*.pth *.pt *.safetensors);;All files (*)")
        if path:
            self.path_edit.setText(path)
            self._source_changed()

    def _point_at_run(self, path) -> None:
        """Training finished or stopped: the loader points at its run folder."""
        if path is not None:
            self.source_combo.setCurrentIndex(self.source_combo.findData("run"))
            self.path_edit.setText(str(path))
            self._source_changed()
            self.status_label.setText(f"New training run at {path}: press Load models.")

    def config(self) -> LoadConfig:
        source = self.source_combo.currentData()
        path = self.official_combo.currentData() if source == "official" else self.path_edit.text()
        return make_config(
            source, self._channels(), path,
            {c: e.text() for c, e in self.file_edits.items()},
            self.arch_combo.currentText(), self.which_combo.currentText(),
        )

    def load(self) -> None:
        """Validate the inputs and load the model set in a worker."""
        try:
            config = self.config()
        except DataError as exc:
            self.input_error(self.status_label, str(exc))
            return
        missing = missing_official(config)
        if missing and not self.ask_consent(consent_text(missing)):
            self.status_label.setText("Download not started: nothing was loaded.")
            return
        where = "official" if config.source == "official" else "path"
        self.remember({"source": config.source, where: config.path, "arch": config.arch})
        self.start_task(load_job(config), "Downloading…" if missing else "Loading…",
                        on_done=self._loaded, describe=self._describe,
                        on_progress=self._bytes_on_bar, desc="Load models")

    def ask_consent(self, text: str) -> bool:
        """Ask before downloading (tests answer for the user by replacing this)."""
        answer = QMessageBox.question(self, "Download official weights", text,
                                      QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
        return answer == QMessageBox.Yes

    def _describe(self, event: Progress) -> str | None:
        if event.stage != "download":
            return "Loading…"
        done, total = event.step / 1e6, event.total / 1e6
        size = f"{done:.1f} of {total:.1f} MB" if total else f"{done:.1f} MB"
        return f"Downloading {event.info.get('name', '')}: {size}"

    def _bytes_on_bar(self, event: Progress) -> None:
        """Bytes in MB on the bar, not raw counts."""
        if event.stage == "download" and event.total:
            self.progress_bar.setFormat(f"%p%  {event.step / 1e6:.1f} of {event.total / 1e6:.1f} MB")

    def set_running(self, running: bool) -> None:
        super().set_running(running)
        if not running:  # a download may have finished, or been cancelled
            self._show_official()

    def _loaded(self, models: ModelSet) -> None:
        """The model set goes into the shared state (Attention and Evaluate use it)."""
        self.state.models = models

    def _show_models(self, models) -> None:
        if models is not None:
            self.status_label.setText(f"Loaded ({models.kind}):\n{describe(models)}")
            archs = set(models.archs.values())
            if len(archs) == 1:
                self.arch_combo.setCurrentText(archs.pop())
