"""Evented state that the WS-DINO widgets of one viewer share.

Widgets never call each other: the plate browser sets the dataset and the current
field, the preprocess widget sets the cache, the train widget sets the model set,
and every widget that cares connects to the matching signal. One
:class:`WsdinoState` exists per viewer (:func:`state_for`).

Example
-------
>>> state = WsdinoState()
>>> seen = []
>>> _ = state.field_changed.connect(seen.append)
>>> state.field_index = 3
>>> seen
[3]
"""

from __future__ import annotations

import enum
import json
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psygnal import Signal

from napari_wsdino.core.identity import DatasetCheck, check_dataset
from napari_wsdino.core.metadata import Metadata
from napari_wsdino.core.presets import DEFAULT_PRESET, PRESETS, preset_for

if TYPE_CHECKING:
    import napari


class TaskStatus(str, enum.Enum):
    """Where a long task (preprocess, train, embed, evaluate) stands."""

    IDLE = "idle"
    RUNNING = "running"
    DONE = "done"
    STOPPED = "stopped"
    CRASHED = "crashed"


class _EventedPath:
    """A path attribute (or ``None``) that emits the owner's ``signal`` when it changes."""

    def __init__(self, signal: str):
        self.signal = signal

    def __set_name__(self, owner, name: str) -> None:
        self.attr = f"_{name}"

    def __get__(self, obj, objtype=None) -> Path | None:
        return self if obj is None else getattr(obj, self.attr)

    def __set__(self, obj, path: str | Path | None) -> None:
        path = Path(path) if path is not None else None
        if path != getattr(obj, self.attr):
            setattr(obj, self.attr, path)
            getattr(obj, self.signal).emit(path)


class WsdinoState:
    """Dataset, current field, cache and model set of one viewer, with change signals.

    Attributes
    ----------
    metadata
        The loaded field table (:class:`~napari_wsdino.core.metadata.Metadata`) or ``None``.
    source
        Folder or image CSV the metadata was read from.
    field_index
        Row of ``metadata.table`` shown in the viewer.
    cache_path
        Preprocessed cache folder (``core.cache``) or ``None``.
    model_path
        Current model set / training run folder or checkpoint, or ``None``.
        Training sets it when a run finishes or stops; the model loader starts there.
    models
        The loaded :class:`~napari_wsdino.core.modelset.ModelSet` (attention, evaluation).
    results
        Last evaluation (the Evaluate panel's ``Evaluation``) or ``None``.
    evaluations
        Every evaluation of this session, one per model set label (the latest kept), so
        a panel opened later (Compare) shows what was computed before it opened.
    preset
        The recipe this workflow runs: a name of ``core.presets.PRESETS`` (what
        ``wsdino demo --preset`` / ``wsdino preprocess --preset`` / ``wsdino embed
        --preset`` run), or ``None`` until one is chosen; then panels use the preset that
        fits the cache (``core.presets.preset_for``) and say so. Preprocess, Train and
        Evaluate take their settings from it (:meth:`recipe_for`).

    The workflow runs dataset -> cache -> run (``model_path``) -> model set -> evaluations;
    each panel reads these when it opens and follows the signals while it is open.
    :meth:`check_cache` tells whether a cache was made from the open dataset.
    """

    metadata_changed = Signal(object)
    field_changed = Signal(int)
    cache_changed = Signal(object)
    model_changed = Signal(object)
    models_changed = Signal(object)
    results_changed = Signal(object)
    preset_changed = Signal(object)

    def __init__(self) -> None:
        self._metadata: Metadata | None = None
        self.source: Path | None = None
        self._field_index = 0
        self._cache_path: Path | None = None
        self._model_path: Path | None = None
        self._models: Any = None
        self._results: Any = None
        self.evaluations: list[Any] = []
        self._checks: dict[tuple, DatasetCheck] = {}
        self._preset: str | None = None

    # -- dataset -----------------------------------------------------------------
    @property
    def metadata(self) -> Metadata | None:
        return self._metadata

    def set_dataset(self, metadata: Metadata | None, source: str | Path | None = None,
                    field_index: int = 0) -> None:
        """Replace the dataset; emits ``metadata_changed`` then ``field_changed``."""
        self._metadata = metadata
        self.source = Path(source) if source is not None else None
        self._checks.clear()
        self._field_index = int(field_index)
        self.metadata_changed.emit(metadata)
        self.field_changed.emit(self._field_index)

    @property
    def field_index(self) -> int:
        return self._field_index

    @field_index.setter
    def field_index(self, index: int) -> None:
        index = int(index)
        if self._metadata is not None and not 0 <= index < len(self._metadata.table):
            raise IndexError(
                f"Field {index} is outside the dataset's {len(self._metadata.table)} fields."
            )
        if index != self._field_index:
            self._field_index = index
            self.field_changed.emit(index)

    # -- products of later steps -------------------------------------------------
    cache_path = _EventedPath("cache_changed")
    model_path = _EventedPath("model_changed")

    @property
    def models(self) -> Any:
        return self._models

    @models.setter
    def models(self, value: Any) -> None:
        self._models = value
        self.models_changed.emit(value)

    @property
    def results(self) -> Any:
        return self._results

    @results.setter
    def results(self, value: Any) -> None:
        self._results = value
        if value is not None:
            label = getattr(value, "label", None)
            self.evaluations = [e for e in self.evaluations
                                if getattr(e, "label", None) != label] + [value]
        self.results_changed.emit(value)

    @property
    def preset(self) -> str | None:
        return self._preset

    @preset.setter
    def preset(self, name: str | None) -> None:
        if name is not None and name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose from {', '.join(PRESETS)}.")
        if name != self._preset:
            self._preset = name
            self.preset_changed.emit(name)

    def recipe_for(self, shape=None) -> tuple[str, str]:
        """The preset to run and why: ``(name, reason)``. The chosen :attr:`preset`, else
        the one whose crops fit a cache of ``shape`` (H, W), else the demo's default."""
        if self._preset is not None:
            return self._preset, "chosen"
        if shape is not None:
            return preset_for(shape), f"fits the {shape[0]} x {shape[1]} cache"
        return DEFAULT_PRESET, "the default"

    # -- dataset identity ----------------------------------------------------------
    def check_cache(self, cache) -> DatasetCheck:
        """Was ``cache`` (a ``core.cache.Cache``) made from the open dataset?

        ``same`` is True or False from the identity the cache records
        (:mod:`napari_wsdino.core.identity`), None when no dataset is open or the cache
        records none. Remembered per (dataset, cache): only a few files are read, once.
        """
        if self._metadata is None:
            return DatasetCheck(None, "no dataset is open in 1 Data")
        key = (id(self._metadata), str(cache.path), json.dumps(cache.settings.get("dataset_id"),
                                                               sort_keys=True))
        if key not in self._checks:
            self._checks[key] = check_dataset(cache.settings.get("dataset_id"),
                                              self._metadata.table, self._metadata.channels)
        return self._checks[key]

    def check_models(self, models) -> DatasetCheck:
        """Were ``models`` (a ``core.modelset.ModelSet``) trained on the open dataset?

        Like :meth:`check_cache`, from the identity our training checkpoints record; None
        when no dataset is open or the models record none (random, official weights).
        """
        ident = models.dataset_identity() if models is not None else None
        if self._metadata is None or ident is None:
            return DatasetCheck(None, "no dataset is open in 1 Data" if self._metadata is None
                                else "the models record no dataset")
        key = (id(self._metadata), "models", json.dumps(ident, sort_keys=True))
        if key not in self._checks:
            self._checks[key] = check_dataset(ident, self._metadata.table, self._metadata.channels)
        return self._checks[key]


_STATES: "weakref.WeakKeyDictionary[Any, WsdinoState]" = weakref.WeakKeyDictionary()


def state_for(viewer: "napari.viewer.Viewer") -> WsdinoState:
    """The one shared :class:`WsdinoState` of ``viewer`` (created on first use)."""
    state = _STATES.get(viewer)
    if state is None:
        state = _STATES[viewer] = WsdinoState()
    return state
