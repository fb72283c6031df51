"""Recipes: named bundles of settings for preprocess, train, embed and evaluate.

A recipe changes defaults only; every element stays its own option (a flag or a
``--set`` key), and explicit settings win over the recipe's.

``default``
    This package's choices, the behaviour from before recipes existed: z-scored
    inputs, mirrored illumination borders, bf16 autocast and TF32 on CUDA (training and
    embedding: speed and memory on tensor-core GPUs), timm's antialiased resize of the
    position embedding, centred embedding quadrants with numpy's median, L2-normalised
    profiles, one joint TVN, taxol exempt from the NSCB batch rule, the epoch sharded
    over GPUs.
``paper-code``
    The official WS-DINO code element by element (crosszamirski/WS-DINO
    ``WS-DINO_BBBC021.py`` and ``Eval_BBBC021.py``, on facebookresearch/dino
    ``main_dino.py``/``utils.py``): the full ImageNet DINO checkpoint as start
    (student, teacher, head, centre, optimiser), ``min_lr`` 3e-6, fp32 with TF32 off in
    training and fp32 embedding, DINO's position-embedding interpolation when embedding,
    CellProfiler's in-image illumination borders, inputs clipped at 10,000 and divided by 10,000, the
    fixed embedding windows with ``torch.median``, raw CLS features, per-channel TVN,
    the official taxol rule, and every GPU drawing the whole dataset each epoch.
    docs/fidelity.md lists each element with the test that pins it.

:func:`resolve` gives the :class:`Settings` of a recipe plus overrides, and
:meth:`Settings.to_toml` prints them (``wsdino train --print-config``);
:func:`resolve_train` gives one training run's settings, the recipe's defaults under a
config file, a resumed run's saved settings and explicit overrides.

This module combines the stages: it imports their settings (each stage's own, with its
defaults and checks: :class:`~napari_wsdino.core.preprocess.PreprocessSettings`,
:class:`~napari_wsdino.core.train.TrainConfig`,
:class:`~napari_wsdino.core.embed.EmbedSettings`) and no stage imports it.

Example
-------
>>> s = resolve("paper-code")
>>> s.train.min_lr, s.train.precision, s.preprocess.normalize, s.evaluate.tvn
(3e-06, 'fp32', 'paper', 'per-channel')
>>> s.embed.precision, s.embed.pos_embed
('fp32', 'dino')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from napari_wsdino.core.embed.settings import (  # noqa: F401  (importable from here as before)
    DEFAULT_CROP, PRECISIONS, EmbedSettings)
from napari_wsdino.core.metadata import DataError
from napari_wsdino.core.metrics import NSCB_MULTIBATCH
from napari_wsdino.core.preprocess import PreprocessSettings
from napari_wsdino.core.tomlfmt import toml_value
from napari_wsdino.core.tvn import DEFAULT_TVN
from napari_wsdino.core.tvn import METHODS as TVN_METHODS

if TYPE_CHECKING:  # torch-free at import: `wsdino evaluate` lists the recipes without torch
    from pathlib import Path
    from typing import Mapping

    from napari_wsdino.core.train import TrainConfig

#: What each precision and position-embedding choice is, and why a recipe takes it: the
#: comments of ``--print-config``.
NUMERICS_NOTES = {
    "train": ["precision: auto = bf16 autocast and TF32 matmuls on CUDA (this package's "
              "default: faster, less memory), fp32 on CPU; fp32 = fp32 throughout, TF32 off "
              "(the official code, --use_fp16 False)",
              "pos_embed: timm = timm's antialiased resize (this package's default); dino = "
              "DINO's interpolate_pos_encoding for the 96 px local crops (the official code)"],
    "embed": ["precision: auto = bf16 autocast on CUDA (this package's default: faster), "
              "fp32 on CPU; fp32 = the official code's fp32 evaluation",
              "pos_embed: timm = timm's resize of the position embedding, antialiased (this "
              "package's default); dino = DINO's interpolate_pos_encoding, as the official "
              "code (bicubic by the scale factor (n + 0.1) / sqrt(N), no antialiasing)"],
}

#: ``--input-scaling``: preprocessing settings of each choice.
INPUT_SCALING = {
    "zscore": {"normalize": "zscore"},
    "divide": {"normalize": "paper", "clip": 10000.0},
}


class InitRequired(DataError):
    """A recipe or preset that needs initial weights was started without them."""


@dataclass(frozen=True)
class EvaluateSettings:
    """How profiles are scored (:func:`napari_wsdino.core.evaluation.evaluate_profiles`)."""

    tvn: str = DEFAULT_TVN
    nscb_multibatch: str = "exempt"

    def __post_init__(self):
        if self.tvn not in TVN_METHODS:
            raise ValueError(f"tvn must be one of {', '.join(TVN_METHODS)}, not {self.tvn!r}.")
        if self.nscb_multibatch not in NSCB_MULTIBATCH:
            raise ValueError(f"nscb_multibatch must be one of {', '.join(NSCB_MULTIBATCH)}, "
                             f"not {self.nscb_multibatch!r}.")


@dataclass(frozen=True)
class Recipe:
    """A named bundle of defaults; ``requires_init``: refuse random weights unless the
    user says ``--init random``."""

    name: str
    description: str
    train: dict = field(default_factory=dict)
    preprocess: dict = field(default_factory=dict)
    embed: dict = field(default_factory=dict)
    evaluate: dict = field(default_factory=dict)
    requires_init: bool = False


RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    """Add a recipe to :data:`RECIPES` (the CLI and GUI list them from there)."""
    RECIPES[recipe.name] = recipe
    return recipe


#: The recipe every command and panel uses unless told.
DEFAULT_RECIPE = "default"
register_recipe(Recipe(DEFAULT_RECIPE, "this package's defaults (unchanged behaviour)"))
register_recipe(Recipe(
    "paper-code",
    "the official WS-DINO code element by element (docs/fidelity.md)",
    train={"min_lr": 3e-6, "precision": "fp32", "init_parts": "full",
           "epoch_split": "replicate", "pos_embed": "dino"},
    preprocess={**INPUT_SCALING["divide"], "borders": "in-image"},
    embed={"windows": "official", "median": "lower", "l2": False, "precision": "fp32",
           "pos_embed": "dino"},
    evaluate={"tvn": "per-channel", "nscb_multibatch": "official"},
    requires_init=True,
))


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose one of {', '.join(RECIPES)}.")
    return RECIPES[name]


@dataclass(frozen=True)
class Settings:
    """Everything a recipe resolves to, one dataclass per stage."""

    recipe: str
    train: TrainConfig
    preprocess: PreprocessSettings
    embed: EmbedSettings
    evaluate: EvaluateSettings

    def to_toml(self) -> str:
        """The resolved settings as a TOML document, one table per stage."""
        lines = ["# napari-wsdino resolved settings", f"recipe = {toml_value(self.recipe)}"]
        scaling = next((k for k, v in INPUT_SCALING.items()
                        if all(getattr(self.preprocess, f) == x for f, x in v.items())), "other")
        for name in ("train", "preprocess", "embed", "evaluate"):
            lines += ["", f"[{name}]"]
            if name == "preprocess":
                lines.append(f"# input scaling: {scaling} (divide = clip at 10000, then / 10000)")
            lines += [f"# {note}" for note in NUMERICS_NOTES.get(name, ())]
            for key, value in dataclasses.asdict(getattr(self, name)).items():
                if value is None:  # TOML has no null: an unset value is left out
                    lines.append(f"# {key} = (unset)")
                else:
                    lines.append(f"{key} = {toml_value(value)}")
        return "\n".join(lines) + "\n"


def resolve(recipe: str = DEFAULT_RECIPE, *, train: dict | None = None,
            preprocess: dict | None = None, embed: dict | None = None,
            evaluate: dict | None = None) -> Settings:
    """A recipe's settings with explicit overrides on top (overrides win).

    Example
    -------
    >>> resolve("paper-code", evaluate={"tvn": "paper"}).evaluate.tvn
    'paper'
    """
    from napari_wsdino.core.train import TrainConfig  # torch: not at import (wsdino evaluate)

    r = get_recipe(recipe)
    return Settings(
        recipe=r.name,
        train=TrainConfig.from_dict({**r.train, **(train or {})}),
        preprocess=PreprocessSettings(**{**r.preprocess, **(preprocess or {})}),
        embed=EmbedSettings(**{**r.embed, **(embed or {})}),
        evaluate=evaluate_settings(recipe, **(evaluate or {})),
    )


def evaluate_settings(recipe: str = DEFAULT_RECIPE, **overrides) -> EvaluateSettings:
    """A recipe's evaluation settings alone (no torch import: ``wsdino evaluate`` uses it)."""
    return EvaluateSettings(**{**get_recipe(recipe).evaluate, **overrides})


def train_defaults(recipe: str = DEFAULT_RECIPE) -> dict:
    """TrainConfig values of a recipe (all fields), for layering under user settings."""
    from napari_wsdino.core.train import TrainConfig  # torch: not at import (wsdino evaluate)

    return TrainConfig.from_dict(get_recipe(recipe).train).to_dict()


def resolve_train(recipe: str = DEFAULT_RECIPE, base: TrainConfig | str | Path | None = None,
                  overrides: Mapping | None = None, *, resume_from: str | Path | None = None,
                  sources: Mapping[str, str] | None = None) -> TrainConfig:
    """One channel's training settings with ``recipe``'s defaults as the bottom layer:
    :func:`napari_wsdino.core.train.resolve_config` (its layers and resume rule, the CLI's
    and the panels') given :func:`train_defaults`.

    Example
    -------
    >>> resolve_train("paper-code", overrides={"epochs": 3}).min_lr
    3e-06
    """
    from napari_wsdino.core.train import resolve_config  # torch: not at import (wsdino evaluate)

    return resolve_config(base, overrides, resume_from=resume_from,
                          defaults=train_defaults(recipe),
                          defaults_source=f"the {recipe} recipe's defaults", sources=sources)


def check_init(init: str, needed: bool, what: str) -> None:
    """Refuse to start ``what`` from random weights by default when it needs initial ones.

    ``init`` is a weights file, ``"random"`` (:data:`~napari_wsdino.core.model.RANDOM_INIT`:
    random weights, said out loud) or ``""``.
    """
    if needed and not init:
        raise InitRequired(
            f"{what} starts from pretrained weights, as the paper does: give --init "
            "dino-vits8-full (the full ImageNet DINO ViT-S/8 checkpoint, downloaded once into "
            "torch.hub's cache), --init dino-vits8 (its backbone) or --init FILE, or say "
            "--init random to train from random weights on purpose."
        )
