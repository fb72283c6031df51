"""Where a model set's weights are: the channels of a run folder, the file of one channel,
and the name a person knows weights by (run folder, bundled or official name).

Plain paths, no torch: the loaders in :mod:`napari_wsdino.core.modelset` and the panels
call these.
"""

from __future__ import annotations

from pathlib import Path

from napari_wsdino.core.errors import CheckpointError
from napari_wsdino.core.layout import CHECKPOINT_FILE, checkpoint_path
from napari_wsdino.core.metadata import LAYOUTS
from napari_wsdino.core.pretrained import bundled_arch


def run_channels(run: str | Path) -> list[str]:
    """The channels of a run folder (sub-folders holding a checkpoint), in the order of
    the registered screen layout they belong to (BBBC021: DAPI, Tubulin, Actin; Cell
    Painting: DNA, ER, RNA, AGP, Mito), others after them by name.

    Example
    -------
    >>> run_channels("runs/cellpainting")                            # doctest: +SKIP
    ['DNA', 'ER', 'RNA', 'AGP', 'Mito']
    """
    found = {p.parent.name for p in Path(run).glob(f"*/{CHECKPOINT_FILE}")}
    order = list(dict.fromkeys(c for preset in LAYOUTS.values() for c in preset.layout.channels))
    return [c for c in order if c in found] + sorted(found - set(order))


def weights_name(path: str | Path) -> str:
    """The name a person knows weights by: a bundled or official name as given, the run
    folder of our checkpoints (``RUN``, ``RUN/<channel>``, ``RUN/<channel>/checkpoint.pth``),
    else the file's name.

    Example
    -------
    >>> weights_name("runs/compound/DAPI/checkpoint.pth"), weights_name("replica-dino-pico8")
    ('compound', 'replica-dino-pico8')
    """
    if bundled_arch(path) is not None:
        return str(path)
    p = Path(path).absolute()
    if p.name == CHECKPOINT_FILE or (p / CHECKPOINT_FILE).is_file():  # a channel's file or folder
        p = p.parent.parent if p.name == CHECKPOINT_FILE else p.parent
    return p.name


def resolve_checkpoint(path: str | Path, channel: str) -> Path:
    """The weights file of ``channel`` for a file, a channel run folder or a run folder."""
    path = Path(path)
    if path.is_dir():
        for candidate in (checkpoint_path(path, channel), path / CHECKPOINT_FILE):
            if candidate.is_file():
                return candidate
        raise CheckpointError(
            f"{path} is a folder without {channel}/{CHECKPOINT_FILE} or {CHECKPOINT_FILE}; "
            "pass a training run folder or a weights file."
        )
    if not path.exists():
        raise CheckpointError(f"Weights file {path} does not exist.")
    return path
