"""Screen layouts: how a screen's CSV files name plates, wells, sites, stains and
compounds, and a small registry of named layouts.

``"bbbc021"`` is the official BBBC021 files (three stains: DAPI, Tubulin, Actin;
Ljosa et al. 2013); ``"cellpainting"`` a JUMP-style Cell Painting ``load_data.csv``
(five stains: DNA, ER, RNA, AGP, Mito; Chandrasekaran et al. 2023) with the MoA in a
column of the same file. :func:`detect_layout` picks one for a folder or CSV, and
:func:`resolve_layout` turns a name or a JSON file into a layout. Everything here is
re-exported by :mod:`napari_wsdino.core.metadata`.

Example
-------
>>> get_layout("cellpainting").channels
('DNA', 'ER', 'RNA', 'AGP', 'Mito')
>>> [p.name for p in LAYOUTS.values()]
['bbbc021', 'cellpainting']
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from napari_wsdino.core.errors import DataError

IMAGE_CSV = "BBBC021_v1_image.csv"
MOA_CSV = "BBBC021_v1_moa.csv"
CHANNELS: tuple[str, ...] = ("DAPI", "Tubulin", "Actin")
#: The five Cell Painting stains, in JUMP's ``FileName_Orig<stain>`` names.
CELLPAINTING_CHANNELS: tuple[str, ...] = ("DNA", "ER", "RNA", "AGP", "Mito")
LOAD_DATA_CSV = "load_data.csv"
#: JUMP's identifier of DMSO (the negative control) in ``Metadata_JCP2022``.
JUMP_DMSO = "JCP2022_033924"
CONTROL = "DMSO"


@dataclass(frozen=True)
class ScreenLayout:
    """How a screen's CSV files name things. Defaults are BBBC021's official names.

    Parameters
    ----------
    channels
        Channel names, in the order images are stacked.
    file_columns
        For each channel, the (file name column, path column) of the image CSV.
    batch_pattern
        Regular expression with one group, applied to the plate name, giving the batch
        (BBBC021: the ``WeekN`` prefix). If it does not match (or is ``None``),
        ``batch_column`` is used (Cell Painting: ``Metadata_Source``).
    site_pattern
        Regular expression with one group, applied to the first channel's file name,
        giving the site (BBBC021: ``_s3_``). If it does not match (or is ``None``),
        ``site_column`` is used.
    concentration_column
        ``None``: every treatment is at ``default_concentration`` µM (JUMP: 10), the
        control at 0.
    moa_csv
        The MoA table beside the image CSV (columns ``moa_compound_column``,
        ``moa_concentration_column``, ``moa_column``); ``None``: ``moa_column`` is a
        column of the image CSV itself (blank: unannotated).
    control_compound, control_column, control_value
        Control rows: ``compound_column == control_compound``, or
        ``control_column == control_value`` where that column exists.
    image_csv, image_glob
        The image CSV's name in a dataset folder, and the pattern tried when it is absent.
    """

    channels: tuple[str, ...] = CHANNELS
    file_columns: dict[str, tuple[str, str]] = field(
        default_factory=lambda: {
            c: (f"Image_FileName_{c}", f"Image_PathName_{c}") for c in CHANNELS
        }
    )
    plate_column: str = "Image_Metadata_Plate_DAPI"
    well_column: str = "Image_Metadata_Well_DAPI"
    compound_column: str = "Image_Metadata_Compound"
    concentration_column: str | None = "Image_Metadata_Concentration"
    default_concentration: float = 0.0
    replicate_column: str | None = "Replicate"
    batch_column: str | None = None
    site_column: str | None = None
    batch_pattern: str | None = r"^(Week\d+)_"
    site_pattern: str | None = r"_s(\d+)_"
    moa_compound_column: str = "compound"
    moa_concentration_column: str = "concentration"
    moa_column: str = "moa"
    control_compound: str = CONTROL
    control_column: str | None = None
    control_value: str = "negcon"
    image_csv: str = IMAGE_CSV
    moa_csv: str | None = MOA_CSV
    image_glob: str = "*image*.csv"

    @classmethod
    def from_mapping(cls, mapping: dict) -> "ScreenLayout":
        """Build a layout from a plain dict (e.g. parsed from JSON/TOML).

        ``file_columns`` may be given as ``{"DNA": ["FileName_DNA", "PathName_DNA"], ...}``;
        ``channels`` defaults to its keys.
        """
        if not isinstance(mapping, dict):
            raise DataError(
                f"A screen layout must be a JSON object of ScreenLayout fields, not a "
                f"{_json_kind(mapping)}: e.g. {{\"plate_column\": \"Plate\", \"file_columns\": "
                "{\"DNA\": [\"FileName_DNA\", \"PathName_DNA\"]}}."
            )
        mapping = dict(mapping)
        unknown = set(mapping) - set(cls.__dataclass_fields__)
        if unknown:
            raise DataError(
                f"Unknown screen-layout keys {sorted(unknown)}; "
                f"valid keys are {sorted(cls.__dataclass_fields__)}."
            )
        problems = [p for key, value in mapping.items() for p in _layout_type_problems(key, value)]
        if problems:
            raise DataError("Invalid screen layout: " + "; ".join(problems) + ".")
        if "file_columns" in mapping:
            mapping["file_columns"] = {
                k: tuple(v) for k, v in mapping["file_columns"].items()
            }
            mapping.setdefault("channels", tuple(mapping["file_columns"]))
        if "channels" in mapping:
            mapping["channels"] = tuple(mapping["channels"])
        return cls(**mapping)

    def to_mapping(self) -> dict:
        """A JSON-ready dict that :meth:`from_mapping` turns back into this layout."""
        out = asdict(self)
        out["channels"] = list(self.channels)
        out["file_columns"] = {k: list(v) for k, v in self.file_columns.items()}
        return out

    def required_columns(self) -> list[str]:
        """Columns the image CSV must have (the MoA column too when there is no MoA CSV)."""
        needed = [self.plate_column, self.well_column, self.compound_column]
        optional = (self.concentration_column, self.batch_column, self.site_column)
        needed += [c for c in optional if c is not None]
        for ch in self.channels:
            if ch not in self.file_columns:
                raise DataError(f"Layout names channel {ch!r} but gives no file columns for it.")
            needed += list(self.file_columns[ch])
        return needed + ([self.moa_column] if self.moa_csv is None else [])


def _json_kind(value) -> str:
    """What JSON calls ``value``'s type (the user wrote JSON, not Python)."""
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list",
            dict: "object"}.get(type(value), type(value).__name__)


def _layout_type_problems(key: str, value) -> list[str]:
    """What is wrong with the type of one layout field as JSON gave it (none: [])."""
    def is_text(v):
        return isinstance(v, str)

    if key == "file_columns":
        if not isinstance(value, dict) or not value:
            return [f"file_columns must be an object of channel: [file name column, path "
                    f"column], not a {_json_kind(value)}"]
        return [f"file_columns[{ch!r}] must be [file name column, path column], not {cols!r}"
                for ch, cols in value.items()
                if not (isinstance(cols, (list, tuple)) and len(cols) == 2
                        and all(map(is_text, cols)))]
    if key == "channels":
        if not (isinstance(value, (list, tuple)) and value and all(map(is_text, value))):
            return [f"channels must be a list of channel names, not {value!r}"]
        return []
    if key == "default_concentration":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else [f"default_concentration must be a number, not {value!r}"]
    optional = "None" in str(ScreenLayout.__dataclass_fields__[key].type)
    if is_text(value) or (optional and value is None):
        return []
    return [f"{key} must be a string{' or null' if optional else ''}, not {value!r}"]


@dataclass(frozen=True)
class LayoutPreset:
    """A named screen layout, as the CLI and the panels list it."""

    name: str
    display_name: str
    layout: ScreenLayout
    description: str = ""


#: Registered screen layouts by name (:func:`register_layout`), in registration order.
LAYOUTS: dict[str, LayoutPreset] = {}


def register_layout(name: str, display_name: str, layout: ScreenLayout,
                    description: str = "") -> LayoutPreset:
    """Register a named layout (for ``--layout NAME`` and :func:`detect_layout`)."""
    LAYOUTS[name] = preset = LayoutPreset(name, display_name, layout, description)
    return preset


register_layout(
    "bbbc021", "BBBC021 (DAPI, Tubulin, Actin)", ScreenLayout(),
    "BBBC021_v1_image.csv + BBBC021_v1_moa.csv; batch = the plate's WeekN prefix")
register_layout(
    "cellpainting", "Cell Painting, JUMP load_data (DNA, ER, RNA, AGP, Mito)",
    ScreenLayout(
        channels=CELLPAINTING_CHANNELS,
        file_columns={c: (f"FileName_Orig{c}", f"PathName_Orig{c}")
                      for c in CELLPAINTING_CHANNELS},
        plate_column="Metadata_Plate", well_column="Metadata_Well",
        compound_column="Metadata_JCP2022", concentration_column=None,
        default_concentration=10.0, replicate_column=None,
        batch_column="Metadata_Source", site_column="Metadata_Site",
        batch_pattern=None, site_pattern=None, moa_column="Metadata_MoA",
        control_compound=JUMP_DMSO, control_column="Metadata_pert_type",
        image_csv=LOAD_DATA_CSV, moa_csv=None, image_glob="*load_data*.csv"),
    "load_data.csv with FileName_Orig*/PathName_Orig*, Metadata_Source/Plate/Well/Site, "
    "Metadata_JCP2022, Metadata_MoA; batch = Metadata_Source; DMSO (JCP2022_033924 "
    "or Metadata_pert_type 'negcon') is the control")


def get_layout(name: str) -> ScreenLayout:
    """The registered layout called ``name``."""
    if name not in LAYOUTS:
        raise DataError(f"Unknown screen layout {name!r}; choose one of {list(LAYOUTS)} "
                        "or give a JSON file of ScreenLayout fields.")
    return LAYOUTS[name].layout


def resolve_layout(value: ScreenLayout | str | Path | None) -> ScreenLayout | None:
    """A layout from a registry name, a JSON file of fields, or ``None`` (detect later)."""
    if value is None or isinstance(value, ScreenLayout):
        return value
    if str(value) in LAYOUTS:
        return LAYOUTS[str(value)].layout
    try:
        mapping = json.loads(Path(value).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"Cannot read layout file {value}: {exc}. Give one of "
                        f"{list(LAYOUTS)} or a JSON file of ScreenLayout fields.") from None
    try:
        return ScreenLayout.from_mapping(mapping)
    except DataError as exc:
        raise DataError(f"Layout file {value}: {exc}") from None


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return [c.strip().strip('"') for c in fh.readline().strip().split(",")]
    except OSError:
        return []


def detect_layout(source: str | Path) -> ScreenLayout:
    """The registered layout of a dataset folder or image CSV (default: BBBC021).

    A folder holding a layout's ``image_csv`` is that layout; otherwise the first
    layout whose columns all appear in the CSV header.
    """
    source = Path(source)
    if source.is_dir():
        for preset in LAYOUTS.values():
            if (source / preset.layout.image_csv).exists():
                return preset.layout
        csvs = sorted(source.glob("*.csv"))
    else:
        csvs = [source]
    for csv_path in csvs:
        header = set(_csv_header(csv_path))
        for preset in LAYOUTS.values():
            if header and set(preset.layout.required_columns()) <= header:
                return preset.layout
    return LAYOUTS["bbbc021"].layout
