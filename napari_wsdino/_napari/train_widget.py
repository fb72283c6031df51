"""Train dock widget: WS-DINO on the loaded cache, in the background, with live curves.

Start trains one model per chosen channel (``core.train.train_channels``) in a
worker; Stop asks the core to stop before its next step, which writes a
checkpoint; Resume continues from the run folder's checkpoints. Loss and learning
rate are drawn live in the dock; napari's progress bar shows the ETA. When a run
finishes or stops, the shared state's model path points at the run folder, so the
Load models panel is ready to load it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from napari_wsdino.core.cache import open_cache
from napari_wsdino.core.metadata import CHANNELS, DataError
from napari_wsdino.core.model import CPU_ARCHS, DEFAULT_ARCH
from napari_wsdino.core.progress import Progress
from napari_wsdino.core.sampler import WEAK_LABELS
from napari_wsdino.core.train import TrainConfig, train_channels
from napari_wsdino._napari import settings
from napari_wsdino._napari.dock import WorkerDock
from napari_wsdino._napari.state import TaskStatus
from napari_wsdino._napari.workers import start_worker

if TYPE_CHECKING:
    import napari

PREFIX = "train."
ARCHS = (DEFAULT_ARCH, *CPU_ARCHS, "vit_base_patch8_224", "test_vit")
#: Widget fields that go straight into TrainConfig.
CONFIG_FIELDS = ("weak_label", "arch", "epochs", "batch_size", "lr", "init", "device",
                 "global_size", "local_size", "local_crops", "out_dim")


def device_choices() -> list[tuple[str, str]]:
    """``(label, value)`` for the device combo; the GPU is named when there is one."""
    import torch

    choices = [("auto", "auto"), ("CPU", "cpu")]
    if torch.cuda.is_available():
        choices.append((f"CUDA: {torch.cuda.get_device_name(0)}", "cuda"))
    else:
        choices.append(("CUDA (no GPU found)", "cuda"))
    return choices


def make_train_config(values: dict[str, Any], base_file: str = "") -> TrainConfig:
    """Widget values over a base config (a TOML file, or WS-DINO's defaults), validated.

    Raises ``ValueError`` / ``FileNotFoundError`` with a message naming the bad setting.
    """
    base = TrainConfig.load(base_file) if str(base_file).strip() else TrainConfig()
    changes = {k: values[k] for k in CONFIG_FIELDS if k in values}
    if changes.get("init") and not Path(changes["init"]).exists():
        raise FileNotFoundError(f"Initial weights file {changes['init']} does not exist.")
    return base.replace(**changes)  # dataclasses.replace re-runs the validation


class LossPlot:
    """Loss and learning-rate curves on a matplotlib canvas (redrawn at most 4x a second)."""

    def __init__(self):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 3), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.ax_loss = self.figure.add_subplot(2, 1, 1)
        self.ax_lr = self.figure.add_subplot(2, 1, 2, sharex=self.ax_loss)
        self.series: dict[str, tuple[list, list, list]] = {}
        self._last = 0.0
        self.clear()

    def clear(self) -> None:
        self.series.clear()
        self.redraw()

    def add(self, event: Progress) -> None:
        """Plot a training step (events without a loss, e.g. start-up notes, are skipped)."""
        if "loss" not in event.info:
            return
        channel = str(event.info.get("channel", ""))
        steps, loss, lr = self.series.setdefault(channel, ([], [], []))
        steps.append(event.step)
        loss.append(float(event.info.get("loss", float("nan"))))
        lr.append(float(event.info.get("lr", float("nan"))))
        if time.perf_counter() - self._last > 0.25:
            self.redraw()

    def redraw(self) -> None:
        self._last = time.perf_counter()
        for ax in (self.ax_loss, self.ax_lr):
            ax.clear()
        for channel, (steps, loss, lr) in self.series.items():
            self.ax_loss.plot(steps, loss, label=channel, lw=1)
            self.ax_lr.plot(steps, lr, label=channel, lw=1)
        self.ax_loss.set_ylabel("loss")
        self.ax_lr.set_ylabel("learning rate")
        self.ax_lr.set_xlabel("step")
        if self.series:
            self.ax_loss.legend(fontsize="small")
        self.canvas.draw_idle()


class TrainWidget(WorkerDock):
    """Train (Start / Stop / Resume) one WS-DINO model per channel on the cache."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):
        super().__init__(napari_viewer)
        self.result: dict[str, Path] | None = None
        self._stop = threading.Event()
        saved = settings.load_settings()
        get = lambda key, default: saved.get(PREFIX + key, default)  # noqa: E731

        self.cache_edit = QLineEdit(str(self.state.cache_path or get("cache", "")))
        self.cache_edit.setPlaceholderText("preprocessed cache folder (2 Preprocess)")
        self.cache_browse = QPushButton("…")
        self.run_edit = QLineEdit(get("run", ""))
        self.run_edit.setPlaceholderText("run folder: RUN/<channel>/checkpoint.pth")
        self.run_browse = QPushButton("…")
        self.channel_boxes: dict[str, QCheckBox] = {}
        self.channels_row = QHBoxLayout()
        self.weak_combo = QComboBox()
        self.weak_combo.addItems(WEAK_LABELS)
        self.weak_combo.setCurrentText(get("weak_label", "compound"))
        self.arch_combo = QComboBox()
        self.arch_combo.setEditable(True)
        self.arch_combo.addItems(ARCHS)
        self.arch_combo.setCurrentText(get("arch", DEFAULT_ARCH))
        self.epochs_spin = _spin(1, 100000, get("epochs", 400))
        self.batch_spin = _spin(1, 4096, get("batch_size", 16))
        self.init_edit = QLineEdit(get("init", ""))
        self.init_edit.setPlaceholderText("empty: random; ours / timm / DINO .pth")
        self.init_browse = QPushButton("…")
        self.device_combo = QComboBox()
        for label, value in device_choices():
            self.device_combo.addItem(label, value)
        self.device_combo.setCurrentIndex(max(self.device_combo.findData(get("device", "auto")), 0))
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(8)
        self.lr_spin.setRange(1e-8, 1.0)
        self.lr_spin.setSingleStep(1e-6)
        self.lr_spin.setValue(float(get("lr", 4e-6)))
        self.global_spin = _spin(8, 1024, get("global_size", 224))
        self.local_spin = _spin(8, 1024, get("local_size", 96))
        self.crops_spin = _spin(0, 32, get("local_crops", 8))
        self.outdim_spin = _spin(16, 262144, get("out_dim", 65536))
        self.base_edit = QLineEdit(get("base", ""))
        self.base_edit.setPlaceholderText("optional TOML with every other setting")
        self.start_button = QPushButton("Start")
        self.stop_button = QPushButton("Stop")
        self.resume_button = QPushButton("Resume")
        self.status_label = QLabel("Idle.")
        self.status_label.setWordWrap(True)
        self.plot = LossPlot()
        self.plot.canvas.setMinimumHeight(220)

        form = QFormLayout()
        form.addRow("Cache", _row(self.cache_edit, self.cache_browse))
        form.addRow("Run folder", _row(self.run_edit, self.run_browse))
        form.addRow("Channels", self.channels_row)
        form.addRow("Weak label", self.weak_combo)
        form.addRow("Architecture", self.arch_combo)
        form.addRow("Epochs", self.epochs_spin)
        form.addRow("Batch size", self.batch_spin)
        form.addRow("Initial weights", _row(self.init_edit, self.init_browse))
        form.addRow("Device", self.device_combo)
        advanced = QGroupBox("Advanced")
        adv = QFormLayout(advanced)
        adv.addRow("Learning rate", self.lr_spin)
        adv.addRow("Global crop px", self.global_spin)
        adv.addRow("Local crop px", self.local_spin)
        adv.addRow("Local crops", self.crops_spin)
        adv.addRow("Head output dim", self.outdim_spin)
        adv.addRow("Base config", self.base_edit)
        buttons = QHBoxLayout()
        for b in (self.start_button, self.stop_button, self.resume_button):
            buttons.addWidget(b)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(advanced)
        layout.addLayout(buttons)
        layout.addWidget(self.status_label)
        layout.addWidget(self.plot.canvas, 1)

        self._set_channels(self._channels(), get("channels", None))
        self.cache_browse.clicked.connect(lambda: self._pick_dir(self.cache_edit, "Cache folder"))
        self.run_browse.clicked.connect(lambda: self._pick_dir(self.run_edit, "Run folder"))
        self.init_browse.clicked.connect(self._pick_init)
        self.cache_edit.editingFinished.connect(lambda: self._set_channels(self._channels()))
        self.start_button.clicked.connect(lambda: self.start(resume=False))
        self.resume_button.clicked.connect(lambda: self.start(resume=True))
        self.stop_button.clicked.connect(self.stop)
        self.state.cache_changed.connect(self._on_cache)
        self._set_running(False)

    # -- inputs ----------------------------------------------------------------------
    def _channels(self) -> tuple[str, ...]:
        try:
            return open_cache(self.cache_edit.text().strip()).channels
        except (DataError, OSError, ValueError):
            meta = self.state.metadata
            return tuple(meta.channels) if meta is not None else CHANNELS

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
            box.setChecked(checked is None or channel in checked)
            self.channel_boxes[channel] = box
            self.channels_row.addWidget(box)

    def _on_cache(self, path) -> None:
        """A new cache (from Preprocess): train on it, in a run folder beside it."""
        if path is None:
            return
        self.cache_edit.setText(str(path))
        if not self.run_edit.text().strip():
            self.run_edit.setText(str(Path(path).parent / "runs" / self.weak_combo.currentText()))
        self._set_channels(self._channels())

    def _pick_dir(self, edit: QLineEdit, title: str) -> None:
        path = QFileDialog.getExistingDirectory(self, title, edit.text())
        if path:
            edit.setText(path)
            self._set_channels(self._channels())

    def _pick_init(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Initial weights", self.init_edit.text(),
                                              "Weights (*.pth *.pt *.safetensors);;All files (*)")
        if path:
            self.init_edit.setText(path)

    def values(self) -> dict[str, Any]:
        return {
            "weak_label": self.weak_combo.currentText(),
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
        """Validate and start (or resume) training in a worker."""
        if self.status == TaskStatus.RUNNING:
            return
        channels = [c for c, box in self.channel_boxes.items() if box.isChecked()]
        run = self.run_edit.text().strip()
        try:
            config = make_train_config(self.values(), self.base_edit.text())
            cache = open_cache(self.cache_edit.text().strip())
            if not channels:
                raise ValueError("Tick at least one channel to train.")
            if not run:
                raise ValueError("Choose a run folder.")
            existing = [c for c in channels if (Path(run) / c / "checkpoint.pth").exists()]
            if existing and not resume:
                raise ValueError(f"{run} already holds checkpoints for {existing}: press "
                                 "Resume to continue them, or choose another run folder.")
        except (ValueError, FileNotFoundError, DataError) as exc:
            self.status_label.setText(str(exc))
            return
        settings.remember_many({
            PREFIX + "cache": str(cache.path), PREFIX + "run": run,
            PREFIX + "channels": channels, PREFIX + "base": self.base_edit.text().strip(),
            **{PREFIX + k: v for k, v in self.values().items()},
        })
        self._stop.clear()
        self.result = None
        if not resume:
            self.plot.clear()
        self.status = TaskStatus.RUNNING
        self._set_running(True)
        self.status_label.setText(f"{'Resuming' if resume else 'Starting'} {', '.join(channels)}…")
        self._run = Path(run)
        self.worker = start_worker(
            train_channels(cache, config, run, channels, resume=resume, stop=self._stop.is_set),
            on_progress=self._progress, on_done=self._finished, on_error=self._failed,
            desc="Training", owner=self
        )

    def stop(self) -> None:
        """Ask the run to stop before its next step (it writes a checkpoint)."""
        if self.status == TaskStatus.RUNNING:
            self._stop.set()
            self.stop_button.setEnabled(False)
            self.status_label.setText("Stopping after this step…")

    def _progress(self, event: Progress) -> None:
        self.plot.add(event)
        eta = event.info.get("eta_s")
        eta_text = f", ETA {eta:.0f} s" if isinstance(eta, (int, float)) and eta == eta else ""
        self.status_label.setText(f"{event.message} (step {event.step}/{event.total}{eta_text})")

    def _finished(self, paths: dict[str, Path]) -> None:
        self.result = paths
        self.status = TaskStatus.STOPPED if self._stop.is_set() else TaskStatus.DONE
        self._set_running(False)
        self.plot.redraw()
        word = "Stopped" if self.status == TaskStatus.STOPPED else "Finished"
        self.status_label.setText(
            f"{word}: checkpoints of {', '.join(paths) or 'no channel'} in {self._run}. "
            "Load models points there."
        )
        self.state.model_path = None  # re-emit even when the same folder is trained again
        self.state.model_path = self._run

    def _failed(self, exc: BaseException) -> None:
        self.status = TaskStatus.CRASHED
        self._set_running(False)
        self.status_label.setText(f"Training failed: {exc}")

    def _set_running(self, running: bool) -> None:
        self.start_button.setEnabled(not running)
        self.resume_button.setEnabled(not running)
        self.stop_button.setEnabled(running)


def _spin(lo: int, hi: int, value) -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(lo, hi)
    spin.setValue(int(value))
    return spin


def _row(*widgets) -> QHBoxLayout:
    row = QHBoxLayout()
    for i, w in enumerate(widgets):
        row.addWidget(w, 1 if i == 0 else 0)
    return row
