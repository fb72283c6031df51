"""One ViT backbone per channel, for inference (embedding and attention maps).

WS-DINO trains a separate model for each fluorescent channel (WS-DINO paper,
Methods: "A separate model was trained for each of the three channels"). A
:class:`ModelSet` holds those backbones keyed by channel, knows which channel each
one serves, and refuses to run a model on another channel's images.

Where the weights come from:

* our training runs: ``RUN/<channel>/checkpoint.pth`` (teacher weights by default,
  as in DINO; the student on request) — :meth:`ModelSet.from_run`;
* one file per channel: ours, timm's, official DINO's (``dino_deitsmall8_pretrain.pth``)
  or a ``.safetensors`` file written by :meth:`ModelSet.export_safetensors` —
  :meth:`ModelSet.from_files`;
* the paper's baselines: :meth:`ModelSet.random` (random initialisation) and
  :meth:`ModelSet.init_only` (ImageNet DINO weights, no fine-tuning).

Checkpoint files are untrusted input: PyTorch files are read with
``torch.load(weights_only=True)`` (see :func:`napari_wsdino.core.model.read_checkpoint`),
safetensors files hold tensors only.

Example
-------
>>> from napari_wsdino.core.modelset import ModelSet
>>> models = ModelSet.random("test_vit", ("DAPI", "Tubulin", "Actin"), seed=0)
>>> models.channels, models.embed_dim
(('DAPI', 'Tubulin', 'Actin'), 192)
>>> models.check_channels(("DAPI", "Actin", "Tubulin"))   # any order is fine
>>> models.check_channels(("DAPI", "Mito"))               # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
ChannelMismatchError: ...
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from napari_wsdino.core.layout import CHECKPOINT_FILE, channel_dir, checkpoint_path
from napari_wsdino.core.metadata import DataError
from napari_wsdino.core.model import (
    CHECKPOINT_FORMAT,
    DEFAULT_ARCH,
    CheckpointError,
    create_backbone,
    load_backbone_weights,
    read_checkpoint,
)
from napari_wsdino.core.runpaths import (  # noqa: F401  (importable from here as before)
    resolve_checkpoint, run_channels, weights_name)

CHECKPOINT_NAME = CHECKPOINT_FILE  # the old name, kept for importers
WHICH = ("teacher", "student")


class ChannelMismatchError(DataError):
    """A model was asked to serve a channel it was not trained for."""


@dataclass
class ChannelModel:
    """One channel's backbone and where it came from.

    Attributes
    ----------
    channel
        The channel this model serves (``"DAPI"``, ...).
    model
        A timm ViT with ``num_classes=0``: ``model(x)`` is the CLS embedding.
    arch
        timm architecture name.
    source
        Human-readable origin (file and teacher/student, ``random(seed=0)``, ...).
    input_mean, input_std
        Input normalisation the model was trained with, ``(x - mean) / std``
        (our checkpoints record it in their config; 0 and 1 otherwise).
    dataset_id
        Identity of the dataset the model was trained on (:mod:`napari_wsdino.core.identity`,
        recorded by our training checkpoints); None when unknown.
    weak_label
        The weak label it was trained with (``core.sampler.WEAK_LABELS``; our checkpoints
        record it); None when unknown.
    """

    channel: str
    model: nn.Module
    arch: str
    source: str
    input_mean: float = 0.0
    input_std: float = 1.0
    dataset_id: dict | None = None
    weak_label: str | None = None

    def normalise(self, x):
        """Apply the training-time input normalisation (no copy when it is the identity)."""
        if self.input_mean == 0.0 and self.input_std == 1.0:
            return x
        return (x - self.input_mean) / self.input_std

    @property
    def embed_dim(self) -> int:
        return int(getattr(self.model, "num_features", getattr(self.model, "embed_dim", 0)))

    @property
    def patch_size(self) -> int:
        """Side of the ViT's square patches (1 for non-ViT stand-ins)."""
        pe = getattr(self.model, "patch_embed", None)
        size = getattr(pe, "patch_size", 1)
        return int(size[0] if isinstance(size, (tuple, list)) else size)


@dataclass
class ModelSet:
    """Per-channel backbones in a fixed channel order.

    Build one with :meth:`from_run`, :meth:`from_files`, :meth:`random` or
    :meth:`init_only`; or directly from :class:`ChannelModel` entries.

    Attributes
    ----------
    models
        ``{channel: ChannelModel}``, in the order embeddings are concatenated.
    kind
        ``"trained"``, ``"files"``, ``"random"`` or ``"init-only"``.
    origin
        What a person calls the set: the run folder's name, the weights' names
        (:func:`weights_name`), ``random (seed N)``, ``init-only <weights>``; set by the
        constructors, empty when unknown.
    """

    models: dict[str, ChannelModel]
    kind: str = "files"
    origin: str = field(default="", compare=False)
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not self.models:
            raise CheckpointError("A model set needs at least one channel model.")
        for name, entry in self.models.items():
            if entry.channel != name:
                raise ChannelMismatchError(
                    f"Model set entry {name!r} holds a model for channel {entry.channel!r}."
                )
            entry.model.eval()

    # -- the channels -------------------------------------------------------------------

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self.models)

    @property
    def embed_dim(self) -> int:
        """Length of a field's profile: the channels' embedding sizes summed."""
        return sum(m.embed_dim for m in self.models.values())

    @property
    def archs(self) -> dict[str, str]:
        return {c: m.arch for c, m in self.models.items()}

    def __len__(self) -> int:
        return len(self.models)

    def __iter__(self) -> Iterator[ChannelModel]:
        return iter(self.models.values())

    def __getitem__(self, channel: str) -> ChannelModel:
        """The model of one channel; refuses channels the set has no model for."""
        if channel not in self.models:
            raise ChannelMismatchError(
                f"No model for channel {channel!r}: this model set serves "
                f"{list(self.channels)}. Pass a model trained on {channel!r} "
                f"(e.g. --model {channel}=RUN_OR_FILE)."
            )
        return self.models[channel]

    def check_channels(self, available: Iterable[str]) -> None:
        """Raise :class:`ChannelMismatchError` unless every model's channel is available.

        Parameters
        ----------
        available
            Channels of the images to embed (e.g. a cache's ``channels``).
        """
        available = tuple(available)
        missing = [c for c in self.channels if c not in available]
        if missing:
            raise ChannelMismatchError(
                f"The models serve channels {list(self.channels)} but the images hold "
                f"{list(available)} (no {missing}). A model only runs on the channel it "
                "was trained for; check the channel names of --model and of the cache."
            )

    @property
    def weak_label(self) -> str:
        """The weak label the models were trained with (``"a/b"`` when they differ; empty
        when none records one)."""
        return "/".join(dict.fromkeys(m.weak_label for m in self.models.values() if m.weak_label))

    def dataset_identity(self) -> dict | None:
        """The identity of the dataset these models were trained on, when they record one."""
        return next((m.dataset_id for m in self.models.values() if m.dataset_id), None)

    def summary(self) -> dict:
        """Plain description for logs and Parquet metadata."""
        return {
            "kind": self.kind,
            "channels": list(self.channels),
            "models": {c: {"arch": m.arch, "source": m.source, "dim": m.embed_dim,
                           "input_mean": m.input_mean, "input_std": m.input_std}
                       for c, m in self.models.items()},
            "fingerprint": self.fingerprint(),
        }

    def fingerprint(self) -> str:
        """SHA-1 of every channel's weights: equal sets give equal fingerprints."""
        if self._fingerprint is None:
            h = hashlib.sha1()
            for channel, entry in self.models.items():
                h.update(f"{channel}:{entry.input_mean!r}:{entry.input_std!r}".encode())
                for key, value in entry.model.state_dict().items():
                    h.update(key.encode())
                    h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def to(self, device) -> "ModelSet":
        for entry in self.models.values():
            entry.model.to(device)
        return self

    # -- constructors -------------------------------------------------------------------

    @classmethod
    def from_run(
        cls,
        run: str | Path,
        channels: Iterable[str] | None = None,
        *,
        which: str = "teacher",
    ) -> "ModelSet":
        """Models from a training run folder holding ``<channel>/checkpoint.pth``.

        Parameters
        ----------
        run
            The run folder (``wsdino train --out RUN``).
        channels
            Channels to load (default: every sub-folder holding a checkpoint, in
            its screen layout's order: :func:`run_channels`).
        which
            ``"teacher"`` (default, DINO's choice for evaluation) or ``"student"``.

        Example
        -------
        >>> models = ModelSet.from_run("runs/wsdino", ("DAPI", "Tubulin", "Actin"))  # doctest: +SKIP
        """
        run = Path(run)
        if not run.is_dir():
            raise CheckpointError(f"Run folder {run} does not exist.")
        if channels is None:
            channels = run_channels(run)
            if not channels:
                raise CheckpointError(
                    f"{run} holds no <channel>/{CHECKPOINT_FILE}; train with "
                    "'wsdino train --out RUN' or pass one file per channel with --model."
                )
        missing = [c for c in channels if not checkpoint_path(run, c).is_file()]
        if missing:
            have = sorted(p.parent.name for p in run.glob(f"*/{CHECKPOINT_FILE}"))
            raise CheckpointError(
                f"Run {run} has no model for {missing} (it holds {have}). Train those "
                "channels, or embed only the channels it has (--channels)."
            )
        models = {c: load_channel_model(c, channel_dir(run, c), which=which) for c in channels}
        return cls(models, kind="trained", origin=weights_name(run))

    @classmethod
    def from_files(
        cls,
        files: Mapping[str, str | Path],
        *,
        arch: str | None = None,
        which: str = "teacher",
    ) -> "ModelSet":
        """One weights file (or run folder) per channel.

        Parameters
        ----------
        files
            ``{channel: path}``; a path is our checkpoint, a run folder (``RUN`` with
            ``RUN/<channel>/checkpoint.pth``, or a channel folder with
            ``checkpoint.pth``), a timm or official DINO file, or ``.safetensors``.
        arch
            Architecture for files that do not record it (timm/DINO files); our
            checkpoints record theirs, and a different ``arch`` is refused.
        which
            ``"teacher"`` or ``"student"`` for files that hold both.
        """
        models = {c: load_channel_model(c, p, arch=arch, which=which) for c, p in files.items()}
        kind = "trained" if all(m.source.startswith("wsdino") for m in models.values()) else "files"
        origin = ", ".join(dict.fromkeys(weights_name(p) for p in files.values()))
        return cls(models, kind=kind, origin=origin)

    @classmethod
    def random(
        cls, arch: str, channels: Iterable[str], seed: int = 0
    ) -> "ModelSet":
        """Randomly initialised backbones: the no-learning baseline, one per channel
        (give the cache's channels: ``cache.channels``).

        The same ``seed`` gives the same weights; each channel gets its own draw.
        """
        models = {}
        for i, channel in enumerate(channels):
            # timm initialises through the global generator; isolate it from the caller's.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed) * 1000 + i)
                model = create_backbone(arch, in_chans=1)
            models[channel] = ChannelModel(channel, model, arch, f"random(seed={seed})")
        return cls(models, kind="random", origin=f"random (seed {seed})")

    @classmethod
    def init_only(
        cls, arch: str, weights_file: str | Path, channels: Iterable[str]
    ) -> "ModelSet":
        """The same initial weights (e.g. ImageNet DINO) for every channel, no fine-tuning.

        This is the paper's "DINO, ImageNet weights only" baseline; RGB filters are
        summed into one grey input channel. A checkpoint of ours serves every channel
        here whatever channel it records: these are the weights every channel starts from
        (``--init``), as a chained pretraining over the stains leaves them.
        """
        from napari_wsdino.core.pretrained import bundled_arch

        arch = bundled_arch(weights_file) or arch     # a bundled file knows its own
        models = {}
        for channel in channels:
            entry = load_channel_model(channel, weights_file, arch=arch, any_channel=True)
            entry.source = f"init-only {entry.source}"
            models[channel] = entry
        return cls(models, kind="init-only", origin=f"init-only {weights_name(weights_file)}")

    # -- export -------------------------------------------------------------------------

    def export_safetensors(self, folder: str | Path) -> list[Path]:
        """Write each channel's backbone as ``FOLDER/<channel>.safetensors``.

        The files hold tensors only plus metadata (channel, arch, source), so they can
        be shared and loaded without pickle; :meth:`from_files` reads them back.
        """
        try:
            from safetensors.torch import save_file
        except ImportError:  # pragma: no cover - timm depends on safetensors
            raise CheckpointError(
                "safetensors is not installed; 'pip install safetensors' to export."
            ) from None
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for channel, entry in self.models.items():
            sd = {k: v.detach().cpu().contiguous() for k, v in entry.model.state_dict().items()}
            path = folder / f"{channel}.safetensors"
            save_file(sd, str(path), metadata={
                "format": "napari-wsdino-backbone",
                "channel": channel,
                "arch": entry.arch,
                "source": entry.source,
                "input_mean": repr(float(entry.input_mean)),
                "input_std": repr(float(entry.input_std)),
                "weak_label": entry.weak_label or "",
            })
            written.append(path)
        return written


# -- loading one channel ---------------------------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover
        raise CheckpointError("Reading .safetensors needs the safetensors package.") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"Cannot read {path} as safetensors ({exc}).") from None
    return sd, meta


def load_channel_model(
    channel: str,
    path: str | Path,
    *,
    arch: str | None = None,
    which: str = "teacher",
    any_channel: bool = False,
) -> ChannelModel:
    """Build and load one channel's backbone; refuse a checkpoint of another channel.

    Our checkpoints and our safetensors exports record their channel and
    architecture; both are checked. timm and official DINO files carry neither,
    so they serve the channel they are given, with ``arch`` (default ViT-S/8).
    ``any_channel``: take a checkpoint of another channel on purpose (initial weights
    shared by every stain, :meth:`ModelSet.init_only`).
    """
    from napari_wsdino.core.pretrained import OFFICIAL, bundled_arch, resolve_weights

    if which not in WHICH:
        raise CheckpointError(f"which must be one of {WHICH}, not {which!r}.")
    file = resolve_checkpoint(resolve_weights(path), channel)
    if file.suffix == ".safetensors":
        sd, meta = _read_safetensors(file)
        recorded_channel, recorded_arch = meta.get("channel"), meta.get("arch")
        norm = {k: float(meta[k]) for k in ("input_mean", "input_std") if k in meta}
        norm["weak_label"] = meta.get("weak_label") or None
        source = f"safetensors {file}"
        weights: Mapping = sd
    else:
        ckpt = read_checkpoint(file)
        ours = ckpt.get("format") == CHECKPOINT_FORMAT
        config = ckpt.get("config") if isinstance(ckpt.get("config"), Mapping) else {}
        recorded_channel = ckpt.get("channel") if ours else None
        recorded_arch = (config.get("arch") or ckpt.get("arch")) if ours else None
        norm = {k: float(config[k]) for k in ("input_mean", "input_std") if ours and k in config}
        data = ckpt.get("data") if ours and isinstance(ckpt.get("data"), Mapping) else {}
        if isinstance(data.get("dataset_id"), Mapping):
            norm["dataset_id"] = dict(data["dataset_id"])
        if ours:
            norm["weak_label"] = ckpt.get("weak_label") or config.get("weak_label") or None
        if ours and which not in ckpt:
            raise CheckpointError(f"{file} holds no {which!r} weights.")
        source = f"wsdino {file} ({which})" if ours else f"{file}"
        if (bundled := bundled_arch(path)) is not None:
            kind = "official" if str(path) in OFFICIAL else "bundled"
            recorded_arch, source = bundled, f"{kind} {path}"
        weights = ckpt
    if recorded_channel is not None and recorded_channel != channel and not any_channel:
        raise ChannelMismatchError(
            f"{file} is a model of channel {recorded_channel!r}, not {channel!r}. "
            f"Give it as --model {recorded_channel}={path}, and pass the {channel} model "
            f"for {channel}."
        )
    if recorded_arch and arch and recorded_arch != arch:
        raise CheckpointError(
            f"{file} holds a {recorded_arch} model, not {arch}; drop --arch or set it to {recorded_arch}."
        )
    use_arch = recorded_arch or arch or DEFAULT_ARCH
    model = create_backbone(use_arch, in_chans=1)
    load_backbone_weights(model, weights, which=which)
    if float(norm.get("input_std", 1.0)) == 0:
        raise CheckpointError(f"{file} records input_std = 0; it cannot normalise inputs.")
    return ChannelModel(channel, model.eval(), use_arch, source, **norm)


def parse_model_specs(specs: Iterable[str]) -> dict[str, str]:
    """``["DAPI=runs/a", "Actin=x.pth"]`` → ``{"DAPI": "runs/a", "Actin": "x.pth"}``."""
    out: dict[str, str] = {}
    for spec in specs:
        channel, sep, path = spec.partition("=")
        if not sep or not channel or not path:
            raise DataError(f"--model takes CHANNEL=RUN_OR_FILE, got {spec!r}.")
        if channel in out:
            raise DataError(f"--model names channel {channel!r} twice.")
        out[channel] = path
    return out


def describe(models: ModelSet) -> str:
    """One line per channel, for the CLI."""
    return "\n".join(
        f"  {c:<10} {m.arch:<24} {m.embed_dim:>5}-d  {m.source}" for c, m in models.models.items()
    )
