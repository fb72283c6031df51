"""Widget settings that persist between napari sessions (last paths, last options).

Stored as JSON in ``~/.config/napari-wsdino/settings.json``; the folder can be
moved with the environment variable ``NAPARI_WSDINO_CONFIG_DIR`` (tests point it
at ``tmp_path``). A corrupt file is ignored, never fatal.

Example
-------
>>> remember("browser.last_folder", "/data/BBBC021")      # doctest: +SKIP
>>> recall("browser.last_folder")                          # doctest: +SKIP
'/data/BBBC021'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from napari_wsdino.core.fsio import atomic_write_text

ENV_VAR = "NAPARI_WSDINO_CONFIG_DIR"
SETTINGS_FILE = "settings.json"


def config_dir() -> Path:
    """Folder of the settings file (``$NAPARI_WSDINO_CONFIG_DIR`` or ``~/.config/napari-wsdino``)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "napari-wsdino"


def settings_path() -> Path:
    return config_dir() / SETTINGS_FILE


def load_settings() -> dict[str, Any]:
    """All saved settings (empty when none were saved or the file is unreadable)."""
    try:
        data = json.loads(settings_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_settings(settings: dict[str, Any]) -> None:
    """Write all settings (atomically: a crash never leaves half a file)."""
    path = settings_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=2, default=str))
    except OSError:
        pass  # settings are a convenience: a read-only home must not break the GUI


def recall(key: str, default: Any = None) -> Any:
    """One saved value."""
    return load_settings().get(key, default)


def remember(key: str, value: Any) -> None:
    """Save one value (read-modify-write of the settings file)."""
    settings = load_settings()
    settings[key] = value
    save_settings(settings)


def remember_many(values: dict[str, Any]) -> None:
    """Save several values with one read and one write."""
    settings = load_settings()
    settings.update(values)
    save_settings(settings)
