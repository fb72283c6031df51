"""Train dock widget: WS-DINO on the loaded cache, in the background, with live curves.

Start trains one model per chosen channel (``core.train.train_channels``) in a
worker; Stop asks the core to stop before its next step, which writes a
checkpoint; Resume continues from the run folder's checkpoints. Loss and learning
rate are drawn live in the dock; napari's progress bar shows the ETA. When a run
finishes or stops, the shared state's model path points at the run folder, so the
Load models panel is ready to load it.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit, QVBoxLayout,
    QWidget,
)

from napari_wsdino.core import layout
from napari_wsdino.core.archs import ARCHITECTURES
from napari_wsdino.core.cache import open_cache
from napari_wsdino.core.metadata import CHANNELS, DataError
from napari_wsdino.core.pretrained import DEFAULT_INIT
from napari_wsdino.core.presets import DEFAULT_PRESET, PRESET_TITLES
from napari_wsdino.core.progress import Progress
from napari_wsdino.core.sampler import WEAK_LABEL_INFO, weak_label_note
# Only torch-free names at import: the panel opens without torch (imported in the background).
from napari_wsdino.core.train import TrainingError
from napari_wsdino._napari.train_config import (  # noqa: F401 - importable from here too
    CONFIG_FIELDS, check_fit, continue_config, make_train_config, preset_config,
)
from napari_wsdino._napari.canvases import LossPlot
from napari_wsdino._napari.train_status import describe_step, epochs_of, run_summary
from napari_wsdino._napari.state import TaskStatus
from napari_wsdino._napari.dock import (
    WorkerDock, add_row, button, combo, data_combo, double_spin, edit_row, hrow, item_tips,
    select_text, spin,
)
from napari_wsdino._napari.workers import run_in_background

if TYPE_CHECKING:
    import napari

PREFIX = "train."
#: Architectures offered, from core.model's registry (the box is editable: any timm ViT name).
ARCHS = tuple(ARCHITECTURES)
#: ``(label, value)`` of the device combo while the panel opens; the CUDA entry is named
#: (the GPU, or none found) once :func:`load_training_code` has run in the background.
DEVICE_CHOICES = (("auto", "auto"), ("CPU", "cpu"), ("CUDA", "cuda"))


def load_training_code() -> str:
    """Import the training code (torch, timm) and the curves' matplotlib canvas; return the
    CUDA entry's label.

    Run in a worker once the panel is shown: these imports are seconds on a small CPU, which
    the panel would otherwise spend frozen while it opens (or when Start is pressed).
    """
    import matplotlib.backends.backend_qtagg  # noqa: F401 - the loss plot's canvas
    import matplotlib.figure  # noqa: F401
    import torch

    import napari_wsdino.core.train.loop  # noqa: F401 - with setup, checkpoint, timm

    if torch.cuda.is_available():
        return f"CUDA: {torch.cuda.get_device_name(0)}"
    return "CUDA (no GPU found)"


class TrainWidget(WorkerDock):
    """Train (Start / Stop / Continue) one WS-DINO model per channel on the cache."""

    settings_prefix = PREFIX
    failed_text = "Training failed"
    stopping_text = "Stopping after this step…"

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):
        super().__init__(napari_viewer)
        self.result: dict[str, Path] | None = None
        self._stop = threading.Event()
        #: True once the training code (torch, timm) is imported, in the background.
        self.training_ready = False
        self._shape: tuple[int, int] | None = None
        self._table = None       # the cache's field table, for what the weak label can teach
        # Remembered values, else the remembered (or default) preset's: one consistent set.
        get = self.saved
        preset = self.state.preset or get("preset", DEFAULT_PRESET)
        d = preset_config(preset)

        self.cache_edit = QLineEdit(str(self.state.cache_path or get("cache", "")))
        self.cache_edit.setPlaceholderText("preprocessed cache folder (2 Preprocess)")
        self.cache_browse = button("…", "Choose a preprocessed cache folder",
                                   lambda: self._pick_dir(self.cache_edit, "Cache folder"))
        self.run_edit = QLineEdit(str(self.state.model_path or get("run", "")))
        self.run_edit.setPlaceholderText(f"run folder: RUN/<channel>/{layout.CHECKPOINT_FILE}")
        self.run_browse = button("…", "Choose the run folder",
                                 lambda: self._pick_dir(self.run_edit, "Run folder"))
        self.channel_boxes: dict[str, QCheckBox] = {}
        self.channels_row = QHBoxLayout()
        self.preset_combo = data_combo(((t, n) for n, t in PRESET_TITLES.items()), preset)
        self.weak_combo = data_combo(((w.title, w.name) for w in WEAK_LABEL_INFO.values()),
                                     get("weak_label", d.weak_label))
        self.arch_combo = combo(ARCHS, get("arch", d.arch), editable=True)
        item_tips(self.weak_combo, [w.help for w in WEAK_LABEL_INFO.values()])
        item_tips(self.arch_combo, [f"{a.title}: {a.help}" for a in ARCHITECTURES.values()])
        self.epochs_spin = spin(1, 100000, get("epochs", d.epochs))
        self.batch_spin = spin(1, 4096, get("batch_size", d.batch_size))
        self.init_edit = QLineEdit(get("init", d.init))
        self.init_edit.setPlaceholderText(f"empty: random; a .pth, or {DEFAULT_INIT}")
        self.init_browse = button("…", "Choose an initial weights file", self._pick_init)
        self.device_combo = data_combo(DEVICE_CHOICES, get("device", d.device))
        self.lr_spin = double_spin(1e-8, 1.0, get("lr", d.lr), step=1e-6, decimals=8)
        self.global_spin = spin(8, 1024, get("global_size", d.global_size))
        self.local_spin = spin(8, 1024, get("local_size", d.local_size))
        self.crops_spin = spin(0, 32, get("local_crops", d.local_crops))
        self.outdim_spin = spin(16, 262144, get("out_dim", d.out_dim))
        self.base_edit = QLineEdit(get("base", ""))
        self.base_edit.setPlaceholderText("optional TOML with every other setting")
        self.start_button = button("Start", "Train a new run in the run folder (refused if it "
                                   "holds one)", lambda: self.start(resume=False))
        self.stop_button = button("Stop", "Stop before the next step; a checkpoint is written",
                                  self.stop)
        self.resume_button = button(
            "Continue", "Continue the run in the run folder with its saved settings: an "
            "interrupted run resumes exactly; with more Epochs a finished run is extended (the "
            "schedules are recomputed for the new total, see docs/training.md)",
            lambda: self.start(resume=True))
        self.idle_controls = (self.start_button, self.resume_button)
        self.busy_controls = (self.stop_button,)
        self.weak_note = QLabel("")
        self.weak_note.setWordWrap(True)
        self.run_label = QLabel("")
        self.run_label.setWordWrap(True)
        # The curves' canvas is made when first needed (matplotlib costs seconds on a small
        # CPU), in a fixed-height box (a longer status line never resizes and redraws it).
        self._plot: LossPlot | None = None
        self.plot_box = QWidget()
        self.plot_box.setFixedHeight(260)
        QVBoxLayout(self.plot_box).setContentsMargins(0, 0, 0, 0)

        form = QFormLayout()
        add_row(form, "Cache", edit_row(self.cache_edit, self.cache_browse),
                "Preprocessed cache to train on (filled in by 2 Preprocess)")
        add_row(form, "Run folder", edit_row(self.run_edit, self.run_browse),
                f"Where RUN/<channel>/{layout.CHECKPOINT_FILE}, {layout.CONFIG_FILE} and "
                f"{layout.LOG_FILE} go")
        add_row(form, "Channels", self.channels_row, "One model is trained per ticked channel")
        add_row(form, "Preset", self.preset_combo,
                "Settings that fit the cache: chosen by the cache's size when it is selected "
                "(paper settings need fields of at least 448 px; the demo presets fit small caches)")
        add_row(form, "Weak label", self.weak_combo,
                "none = plain DINO; otherwise local crops come from another field of the same "
                "treatment / compound / MoA (WS-DINO)")
        form.addRow("", self.weak_note)
        add_row(form, "Architecture", self.arch_combo,
                "timm ViT name; the wsdino_vit_* models are small enough for a CPU")
        add_row(form, "Epochs", self.epochs_spin,
                "Passes over the fields; Continue with more epochs extends a finished run")
        add_row(form, "Batch size", self.batch_spin, "Fields per optimisation step")
        add_row(form, "Initial weights", edit_row(self.init_edit, self.init_browse),
                "Start from these weights (ours, timm or the official DINO file); empty = random")
        add_row(form, "Device", self.device_combo, "auto uses the GPU when there is one")
        advanced = QGroupBox("Advanced")
        advanced.setToolTip("Less common settings; a TOML file can hold every setting")
        adv = QFormLayout(advanced)
        add_row(adv, "Learning rate", self.lr_spin, "Peak learning rate (after warm-up)")
        add_row(adv, "Global crop px", self.global_spin,
                "Side of the two global crops; at most twice the cache's shorter side, "
                "a multiple of the patch size")
        add_row(adv, "Local crop px", self.local_spin,
                "Side of the local crops; a multiple of the patch size")
        add_row(adv, "Local crops", self.crops_spin, "Local crops per field")
        add_row(adv, "Head output dim", self.outdim_spin, "Outputs of the DINO head")
        add_row(adv, "Base config", self.base_edit,
                "Optional TOML (as wsdino train writes) with every other setting; "
                "replaces the preset")
        self.stack(form, advanced, hrow(self.start_button, self.stop_button, self.resume_button),
                   self.run_label, self.status_label, self.plot_box, 1)

        self._set_channels(self._channels(), get("channels", None))
        self.cache_edit.editingFinished.connect(lambda: self._cache_picked(self.cache_edit.text()))
        self.run_edit.editingFinished.connect(self._describe_run)
        self.preset_combo.currentIndexChanged.connect(lambda _i: self.apply_preset())
        # Every setting is remembered when changed (not only at Start): the next session
        # shows the same form, the preset with its architecture and weights included.
        for box in (self.preset_combo, self.weak_combo, self.arch_combo, self.device_combo):
            box.currentIndexChanged.connect(lambda _i: self._remember_form())
        for box in (self.epochs_spin, self.batch_spin, self.lr_spin, self.global_spin,
                    self.local_spin, self.crops_spin, self.outdim_spin):
            box.valueChanged.connect(lambda _v: self._remember_form())
        for edit in (self.arch_combo.lineEdit(), self.init_edit, self.base_edit):
            edit.editingFinished.connect(self._remember_form)
        self.weak_combo.currentIndexChanged.connect(lambda _i: self._describe_weak_label())
        # The workflow's recipe (shared with 2 Preprocess and 4 Evaluate): a preset picked
        # here becomes it, and one picked there is shown here.
        self.preset_combo.activated.connect(
            lambda _i: setattr(self.state, "preset", self.preset_combo.currentData()))
        self.state.preset_changed.connect(self._on_preset)
        self.state.cache_changed.connect(self._on_cache)
        self.state.model_changed.connect(self._on_run)
        self.set_running(False)
        if self.state.cache_path is not None:  # a cache made before this dock opened
            self._on_cache(self.state.cache_path)
        self._describe_weak_label()
        self._describe_run()

    # -- inputs ----------------------------------------------------------------------
    def _channels(self) -> tuple[str, ...]:
        try:
            cache = open_cache(self.cache_edit.text().strip())
        except (DataError, OSError, ValueError):
            self._shape = self._table = None
            meta = self.state.metadata
            return tuple(meta.channels) if meta is not None else CHANNELS
        self._shape, self._table = cache.shape, cache.table
        return cache.channels

    def _set_channels(self, channels, checked=None) -> None:
        """One check box per channel of the cache."""
        if tuple(self.channel_boxes) == tuple(channels):
            return
        for box in self.channel_boxes.values():
            self.channels_row.removeWidget(box)
            box.deleteLater()
        self.channel_boxes = {}
        for channel in channels:
            box = QCheckBox(channel)
            box.setToolTip(f"Train a model on the {channel} channel")
            box.setChecked(checked is None or channel in checked)
            box.toggled.connect(lambda _on: self._remember_form())
            self.channel_boxes[channel] = box
            self.channels_row.addWidget(box)

    def _on_cache(self, path) -> None:
        """A new cache (from Preprocess): train on it, in a run folder beside it."""
        if path is None:
            return
        self.cache_edit.setText(str(path))
        if not self.run_edit.text().strip():
            self.run_edit.setText(str(layout.default_run_dir(path, self.weak_combo.currentData())))
        self._cache_picked(path)

    def _on_preset(self, name) -> None:
        """The workflow's recipe changed (2 Preprocess): fill the form with it."""
        index = self.preset_combo.findData(name)
        if name is not None and index >= 0 and index != self.preset_combo.currentIndex():
            self.preset_combo.setCurrentIndex(index)  # applies it

    def _cache_picked(self, _path) -> None:
        """Channels of the cache, and the workflow's recipe (else the preset whose crops
        fit its fields)."""
        self._set_channels(self._channels())
        if self._shape is not None:
            name, _why = self.state.recipe_for(self._shape)
            index = self.preset_combo.findData(name)
            if index != self.preset_combo.currentIndex():
                self.preset_combo.setCurrentIndex(index)  # applies it
        self._describe_weak_label()
        self._describe_run()

    def _describe_weak_label(self) -> None:
        """Under the weak label: what it can teach about batches on this cache's fields."""
        brief = note = ""
        if self._table is not None:
            weak = self.weak_combo.currentData()
            try:
                brief, note = (weak_label_note(self._table, weak, brief=True),
                               weak_label_note(self._table, weak))
            except (KeyError, ValueError):  # a cache without batch or label columns
                pass
        self.weak_note.setText(brief)
        self.weak_note.setToolTip(note)

    def _on_run(self, path) -> None:
        """A run folder chosen elsewhere (or this panel's run finished)."""
        if path is not None and not self.running:
            self.run_edit.setText(str(path))
            self._describe_run()

    def apply_preset(self) -> None:
        """Fill the form with the chosen preset's settings (remembered once, as a set)."""
        cfg = preset_config(self.preset_combo.currentData())
        self._applying = True
        try:
            select_text(self.arch_combo, cfg.arch)
            self.init_edit.setText(cfg.init)     # the cpu preset's: the bundled weights
            for box, value in ((self.epochs_spin, cfg.epochs), (self.batch_spin, cfg.batch_size),
                               (self.lr_spin, cfg.lr), (self.global_spin, cfg.global_size),
                               (self.local_spin, cfg.local_size),
                               (self.crops_spin, cfg.local_crops),
                               (self.outdim_spin, cfg.out_dim)):
                box.setValue(value)
        finally:
            self._applying = False
        self._remember_form()

    def showEvent(self, event) -> None:  # noqa: N802 - Qt override
        """Once the panel is on screen, import the training code and matplotlib in the
        background; then make the plot (neither while the panel opens)."""
        super().showEvent(event)
        if not getattr(self, "_loading", False):
            self._loading = True
            run_in_background(load_training_code, self._training_loaded, owner=self)

    def _training_loaded(self, cuda_label: str) -> None:
        """The training code is imported: name the GPU (or its absence) in the device menu,
        and make the plot."""
        self.device_combo.setItemText(self.device_combo.findData("cuda"), cuda_label)
        self.training_ready = True
        QTimer.singleShot(0, self._make_plot)

    def _make_plot(self) -> None:
        """The curves' canvas, with the run folder's curves if it holds a run."""
        try:
            self.plot  # noqa: B018 - made on first use
            self._describe_run()
        except RuntimeError:  # the panel was closed meanwhile
            pass

    @property
    def plot(self) -> LossPlot:
        """The loss and learning-rate curves (made on first use)."""
        if self._plot is None:
            self._plot = LossPlot()
            self.plot_box.layout().addWidget(self._plot.canvas)
        return self._plot

    def _remember_form(self) -> None:
        """Remember the preset, the ticked channels and the form's training settings."""
        if getattr(self, "_applying", False):
            return
        self.remember({"preset": self.preset_combo.currentData(), **self.values(),
                       "channels": [c for c, box in self.channel_boxes.items() if box.isChecked()],
                       "base": self.base_edit.text().strip()})

    def _describe_run(self) -> None:
        run = self.run_edit.text().strip()
        summary = run_summary(run, self.channel_boxes) if run else ""
        # A run's curves are drawn once matplotlib is imported (in the background).
        if (summary and self.training_ready and (self._plot is None or not self._plot.series)
                and not self.running):
            self._plot_log(run)
        self.run_label.setText(
            f"Run folder holds: {summary}. Continue resumes it, or extends it to the Epochs above."
            if summary else "")

    def _plot_log(self, run: str) -> None:
        """An existing run's curves, one point per epoch (its log.jsonl), until it runs again."""
        for channel in self.channel_boxes:
            log = layout.log_path(run, channel)
            try:
                records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            except (OSError, ValueError):
                continue
            if records:
                self.plot.series[channel] = ([r["step"] for r in records],
                                             [r["loss"] for r in records],
                                             [r["lr"] for r in records])
        self.plot.redraw()

    def _pick_dir(self, edit: QLineEdit, title: str) -> None:
        path = QFileDialog.getExistingDirectory(self, title, edit.text())
        if path:
            edit.setText(path)
            self._cache_picked(path)

    def _pick_init(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Initial weights", self.init_edit.text(),
                                              "Weights (*.pth *.pt *.safetensors);;All files (*)")
        if path:
            self.init_edit.setText(path)

    def values(self) -> dict[str, Any]:
        return {
            "weak_label": self.weak_combo.currentData(),
            "arch": self.arch_combo.currentText().strip(),
            "epochs": self.epochs_spin.value(),
            "batch_size": self.batch_spin.value(),
            "lr": self.lr_spin.value(),
            "init": self.init_edit.text().strip(),
            "device": self.device_combo.currentData(),
            "global_size": self.global_spin.value(),
            "local_size": self.local_spin.value(),
            "local_crops": self.crops_spin.value(),
            "out_dim": self.outdim_spin.value(),
        }

    # -- run ---------------------------------------------------------------------------
    def start(self, resume: bool = False) -> None:
        """Validate and start a run, or continue the one in the run folder, in a worker."""
        if self.running:
            return
        channels = [c for c, box in self.channel_boxes.items() if box.isChecked()]
        run = self.run_edit.text().strip()
        try:
            cache = open_cache(self.cache_edit.text().strip())
            if not channels:
                raise ValueError("Tick at least one channel to train.")
            if not run:
                raise ValueError("Choose a run folder.")
            if resume:
                config = continue_config(run, channels, self.epochs_spin.value(),
                                         self.device_combo.currentData())
            else:
                config = make_train_config(self.values(), self.base_edit.text(),
                                           self.preset_combo.currentData())
            check_fit(config, cache.shape)
            existing = layout.trained_channels(run, channels)
            if existing and not resume:
                raise ValueError(f"{run} already holds checkpoints for {existing}: press "
                                 "Continue to resume or extend them, or choose another run folder.")
        except (ValueError, FileNotFoundError, DataError, TrainingError) as exc:
            self.input_error(self.status_label, str(exc))
            return
        self.remember({"cache": str(cache.path), "run": run, "channels": channels,
                       "base": self.base_edit.text().strip(),
                       "preset": self.preset_combo.currentData(), **self.values()})
        self._stop.clear()
        self.result = None
        if not resume:
            self.plot.clear()
        self._run = Path(run)
        from napari_wsdino.core.train import train_channels  # torch (imported at show)

        self.start_task(
            train_channels(cache, config, run, channels, resume=resume, stop=self._stop.is_set),
            f"{'Continuing' if resume else 'Starting'} {', '.join(channels)}…",
            on_progress=self._plot_step,
            describe=lambda e: describe_step(e, epochs_of(config), channels),
            on_done=self._finished, stop=self._stop.set, desc="Training",
        )

    def stop(self) -> None:
        """Ask the run to stop before its next step (it writes a checkpoint)."""
        self.stop_task()

    def _plot_step(self, event: Progress) -> None:
        self.plot.add(event)
        if not self.running:
            self.plot.redraw()  # the last step can arrive after the end: draw it too

    def _finished(self, paths: dict[str, Path]) -> None:
        self.result = paths
        if self._stop.is_set():
            self.status = TaskStatus.STOPPED
        self.plot.redraw()  # the last steps may not be drawn yet
        word = "Stopped" if self.status == TaskStatus.STOPPED else "Finished"
        self.status_label.setText(
            f"{word}: checkpoints of {', '.join(paths) or 'no channel'} in {self._run}. "
            "3b Load models points there."
        )
        self.state.model_path = None  # re-emit even when the same folder is trained again
        self.state.model_path = self._run
        self._describe_run()
