"""Presets: the sizes of a demo or study run, and the embedding each preset implies.

A :class:`Preset` is plain data (replica size, cache size, :class:`~napari_wsdino.core.train.TrainConfig`
overrides, embedding crop / pooling / windows). :data:`PRESETS` is the only list of them; the CLI's
``--preset`` choices, the Train panel's preset menu, ``wsdino demo`` and ``wsdino study`` all read it.

>>> resolve_preset("test", epochs=2).train["epochs"]
2
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from napari_wsdino.core.metadata import DataError
from napari_wsdino.core.pretrained import DEFAULT_INIT
from napari_wsdino.core.recipes import DEFAULT_RECIPE

#: The numbers a demo row and a study evaluation report, in this order.
HEADLINE_METRICS = ("nsc", "nscb", "map_nsc", "map_nscb", "n_nsc", "n_nscb")
#: The demo's run size (``wsdino demo``, :func:`~napari_wsdino.core.pipeline.run_demo`):
#: ``cpu-hires`` since 2026-12-02 (benchmarks/RESULTS.md, "cpu-hires as the default").
DEFAULT_PRESET = "cpu-hires"
#: Presets by the smallest cache side they fit: a cache of the ``cpu-hires`` demo (320 x 400)
#: gets its views of the same pixel size, a smaller one ``cpu``'s. The Train panel and
#: ``wsdino study`` without ``--preset`` choose with it (:func:`preset_for`).
PRESET_FOR_SIDE = ((448, "gpu"), (320, "cpu-hires"), (64, "cpu"), (0, "test"))


def preset_for(shape) -> str:
    """The preset whose crops fit a cache of ``shape`` (H, W) px (:data:`PRESET_FOR_SIDE`)."""
    side = min(shape)
    return next(name for limit, name in PRESET_FOR_SIDE if side >= limit)


def preset_for_fields(shape) -> str:
    """The preset to propose for raw fields of ``shape`` (H, W) px: the largest whose cache
    size fits in them (never an upsampling one), else ``test``. BBBC021's 1024 x 1280
    fields get ``gpu``, the sample's 256 x 320 ``cpu``, a 320 x 400 replica ``cpu-hires``."""
    h, w = (int(v) for v in shape[:2])
    for _side, name in PRESET_FOR_SIDE:
        ch, cw = PRESETS[name].cache_size
        if ch <= h and cw <= w:
            return name
    return "test"


@dataclass(frozen=True)
class Preset:
    """Sizes of a demo run.

    Attributes
    ----------
    subset, sites, image_size
        Replica to generate (:func:`~napari_wsdino.core.synth.write_replica`).
    cache_size
        Preprocessed image size ``(H, W)``.
    train
        :class:`~napari_wsdino.core.train.TrainConfig` overrides.
    embed_crop
        Side of the four centre crops used for profiles.
    embed_pooling
        ``cls`` (the paper) or ``cls+mean`` (:data:`~napari_wsdino.core.embed.POOLINGS`).
    normalize
        The cache's intensity normalisation with the default recipe (``plate``, ``zscore``
        ...; :data:`~napari_wsdino.core.preprocess.NORMALIZATIONS`); empty = the recipe's.
    embed_windows
        With the default recipe, where the embedding's crops come from (``cells``: one
        ``embed_crop`` crop per nucleus, averaged; :data:`~napari_wsdino.core.embed.WINDOWS`);
        empty = the recipe's.
    """

    name: str
    subset: str
    sites: int | None
    image_size: tuple[int, int]
    cache_size: tuple[int, int]
    train: dict = field(default_factory=dict)
    embed_crop: int = 224
    description: str = ""
    embed_pooling: str = "cls"
    normalize: str = ""
    embed_windows: str = ""


_CPU_MODEL = dict(arch="wsdino_vit_pico_patch8", drop_path_rate=0.0, out_dim=1024,
                  hidden_dim=512, bottleneck_dim=128, warmup_teacher_temp=0.04)

_CPU_TRAIN = dict(_CPU_MODEL, epochs=30, batch_size=16, global_size=64, local_size=32,
                  global_scale=(0.08, 0.16), local_crops=1, local_scale=(0.02, 0.05),
                  teacher_temp=0.01, warmup_teacher_temp=0.01, student_temp=0.1,
                  center_momentum=0.9, lr=1e-4, min_lr=1e-4, warmup_epochs=3,
                  checkpoint_every=5, crop_centres="nuclei", rotate90=True, init=DEFAULT_INIT)

PRESETS: dict[str, Preset] = {
    "test": Preset(
        "test", "mini", 1, (64, 80), (48, 64),
        dict(_CPU_MODEL, out_dim=256, hidden_dim=64, bottleneck_dim=32, epochs=1,
             batch_size=16, global_size=32, local_size=16, local_crops=2, lr=5e-4,
             min_lr=1e-5, warmup_epochs=0, checkpoint_every=1, crop_centres="nuclei",
             rotate90=True),
        embed_crop=16,
        description="seconds; for the test suite only",
        embed_pooling="cls+mean",
        normalize="plate",
        embed_windows="cells",
    ),
    # Tuned with benchmarks/tune_cpu_preset.py (see benchmarks/RESULTS.md). From random
    # init, WS-DINO's cross-field local crops pull a tiny ViT to the uniform output (loss
    # ln(out_dim)); a sharp teacher (0.01, student 0.1), a gentler centre (0.9), one
    # local crop, large global crops (then) and a constant lr kept it well below ln(out_dim).
    # The cache keeps the replica's resolution: nuclei stay several pixels wide.
    # Issue 13 (docs/training.md, benchmarks/RESULTS.md): per-plate intensity normalisation
    # (keeps a treatment's brighter / fewer / larger nuclei, removes the week's stain
    # level), crops centred on nuclei, quarter turns, and CLS + mean-token embeddings; and,
    # as the paper does, a DINO-pretrained start: the bundled replica-dino-pico8-cells weights
    # (core/pretrained.py), made by benchmarks/pretrain_init.py on an unevaluated seed.
    # Views at cell scale (global 8-16 % of the 160 x 200 field, ~50-70 px, a few cells;
    # local 2-5 %), the scale the profiles are embedded at (32 px per nucleus): trained on
    # these, the CLS attention settles on the nuclei (about 4x their area share on DAPI;
    # field-scale views, global 50-100 %, left it at 0.9-1.2x, spread evenly).
    "cpu": Preset(
        "cpu", "mini", 2, (160, 200), (160, 200),
        _CPU_TRAIN,
        embed_crop=32,
        description="minutes on a 2-core laptop: tiny patch-8 ViT fine-tuned from the "
                    f"bundled plain-DINO weights ({DEFAULT_INIT}; --init random: "
                    "from scratch), sharp teacher, one cross-field local crop, cell-scale "
                    "crops centred on nuclei, per-plate normalisation, profiles averaged "
                    "over cells",
        embed_pooling="cls+mean",
        normalize="plate",
        embed_windows="cells",
    ),
    # Issue 13, 2026-12-02 (benchmarks/RESULTS.md, "Twice the resolution"): at 160 x 200 a
    # nucleus (~6 px) is smaller than one 8-px patch, so lobes, micronuclei and asters are a
    # pixel or two. The same recipe on a 320 x 400 replica (nuclei ~12 px): views of the same
    # pixel size at native scale (a quarter of the area fractions: about a cell per global
    # view), cell crops of 64 px (the same cells as 32 px at 160 x 200), and the same bundled
    # weights, pretrained at 160 x 200; 20 epochs of fine-tuning instead of 30 (the 64-px
    # crops cost four times the tokens to embed; 30 epochs took 9-10 min, 20 take about 7 and
    # fine-tune as well). The demo's default since 2026-12-02 (benchmarks/RESULTS.md,
    # "cpu-hires as the default").
    "cpu-hires": Preset(
        "cpu-hires", "mini", 2, (320, 400), (320, 400),
        dict(_CPU_TRAIN, global_scale=(0.02, 0.04), local_scale=(0.005, 0.0125), epochs=20),
        embed_crop=64,
        description="the default, about 15 minutes on 2 cores (replica v2): the cpu recipe "
                    "at twice the resolution (320 x 400, nuclei 1.5 patches wide), 20 epochs, "
                    "cell crops of 64 px",
        embed_pooling="cls+mean",
        normalize="plate",
        embed_windows="cells",
    ),
    "gpu": Preset(
        "gpu", "full", None, (1024, 1280), (512, 640),
        dict(),  # the paper's settings (TrainConfig defaults): ViT-S/8, 400 epochs
        embed_crop=224,
        description="the paper's settings on the full replica; needs a GPU and hours",
    ),
}


#: Display names of the presets (menus); kept beside :data:`PRESETS`, not in them, so that a
#: demo folder's recorded settings do not change.
PRESET_TITLES = {"gpu": "paper (ViT-S/8, GPU)", "cpu": "CPU demo (tiny ViT, 160 x 200 fields)",
                 "cpu-hires": "CPU demo (tiny ViT, 320 x 400 fields)",
                 "test": "quick test (tiny ViT, 1 epoch)"}


def resolve_preset(preset: str | Preset, **overrides) -> Preset:
    """A preset by name, with ``train`` overrides merged in (e.g. ``epochs=5``)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise DataError(f"Unknown preset {preset!r}; choose from {', '.join(PRESETS)}.")
        preset = PRESETS[preset]
    if overrides:
        preset = Preset(**{**asdict(preset), "train": {**preset.train, **overrides}})
    return preset


def preprocess_settings(preset: Preset, base=None, recipe: str = DEFAULT_RECIPE):
    """The :class:`~napari_wsdino.core.preprocess.PreprocessSettings` a preset runs: the
    recipe's (``base``; default: the package's), the preset's cache size, a clip at 10,000
    counts, and with the default recipe the preset's normalisation. ``wsdino demo``,
    ``wsdino preprocess --preset`` and the Preprocess panel all take them from here.

    >>> preprocess_settings(PRESETS["cpu"]).normalize
    'plate'
    """
    from napari_wsdino.core.preprocess import PreprocessSettings

    ps = replace(base if base is not None else PreprocessSettings(),
                 size=tuple(preset.cache_size), clip=10000.0)
    if preset.normalize and recipe == DEFAULT_RECIPE:
        ps = replace(ps, normalize=preset.normalize)
    return ps


def describe_preset(preset: Preset, recipe: str = DEFAULT_RECIPE) -> str:
    """One line on what a preset runs, for panels and logs ("cpu: 160 x 200 cache, ...")."""
    norm = preset.normalize if preset.normalize and recipe == DEFAULT_RECIPE else "the recipe's"
    windows = preset.embed_windows if preset.embed_windows and recipe == DEFAULT_RECIPE else "centre"
    crops = (f"one {preset.embed_crop}-px crop per nucleus, averaged" if windows == "cells"
             else f"four {preset.embed_crop}-px centre crops, median")
    return (f"{preset.name}: {preset.cache_size[0]} x {preset.cache_size[1]} cache, {norm} "
            f"normalisation; profiles from {crops}, {preset.embed_pooling} pooling")


def embed_settings(preset: Preset, stages, recipe: str = DEFAULT_RECIPE) -> dict:
    """``embed_cache`` keyword arguments of a preset under a recipe: the recipe's windows,
    median and L2, with the preset's pooling, and its windows when the recipe is ours."""
    windows = (preset.embed_windows if preset.embed_windows and recipe == DEFAULT_RECIPE
               else stages.embed.windows)
    return {"crop": preset.embed_crop, "pooling": preset.embed_pooling, "windows": windows,
            "median": stages.embed.median, "l2": stages.embed.l2,
            "precision": stages.embed.precision, "pos_embed": stages.embed.pos_embed}


def preset_embedding(preset: str = "", crop: int | None = None,
                     recipe: str = DEFAULT_RECIPE) -> dict:
    """``embed_cache`` settings of a preset by name under a recipe (:func:`embed_settings`),
    as ``wsdino demo``, ``wsdino embed --preset`` and the Evaluate panel embed; ``crop``
    given wins. No preset: only ``crop`` (the package's defaults for the rest)."""
    from napari_wsdino.core.recipes import resolve  # resolve builds a TrainConfig: torch

    settings = embed_settings(PRESETS[preset], resolve(recipe), recipe) if preset else {}
    if crop:
        settings["crop"] = int(crop)
    return settings


def headline(result) -> dict:
    """The :data:`HEADLINE_METRICS` of an :class:`~napari_wsdino.core.evaluation.EvaluationResult`."""
    d = result.to_dict()
    return {k: d[k] for k in HEADLINE_METRICS}
