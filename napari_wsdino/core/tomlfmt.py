"""TOML values written as text: the one writer of the settings files and ``--print-config``.

Python reads TOML (:mod:`tomllib`) but does not write it; the settings written here are
flat tables of booleans, numbers, strings and short lists, so one function suffices
(torch-free, used by :mod:`~napari_wsdino.core.train.settings` for ``config.toml`` and by
:mod:`~napari_wsdino.core.recipes` for the resolved settings of every stage).

Example
-------
>>> print(toml_value(True), toml_value(3e-6), toml_value((0.1, 0.2)), toml_value("DAPI"))
true 3e-06 [0.1, 0.2] "DAPI"
"""

from __future__ import annotations

import json
import math


def toml_value(value) -> str:
    """``value`` (bool, int, float, str, or a list / tuple of them) as a TOML value;
    anything else is written as its ``str`` in quotes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # JSON string escapes are valid TOML basic strings
