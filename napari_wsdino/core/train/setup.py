"""Everything a training run builds before its first step (DINO's ``train_dino``).

:func:`setup_run` reads the cache and the weak labels into a sampler, builds the student
and teacher (:func:`build_models`), the loss, AdamW and the schedules, resumes a
checkpoint or starts the log afresh, and wraps the student for DDP / ``torch.compile`` /
bf16 autocast. It returns a :class:`TrainState` that the epoch loop
(:func:`napari_wsdino.core.train.train_one_epoch`) advances and the checkpoints
(:mod:`napari_wsdino.core.train.checkpoint`) save.

Example
-------
>>> from napari_wsdino.core.train.setup import build_models
>>> from napari_wsdino.core.train.settings import TrainConfig
>>> student, teacher = build_models(TrainConfig(arch="test_vit", out_dim=64,
...                                             hidden_dim=32, bottleneck_dim=16))
>>> all(not p.requires_grad for p in teacher.parameters())
True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from napari_wsdino.core import distributed
from napari_wsdino.core.cache import Cache, open_cache
from napari_wsdino.core.dino import DINOHead, DINOLoss, MultiCropWrapper
from napari_wsdino.core.layout import CONFIG_FILE, LOG_FILE
from napari_wsdino.core.model import (
    RANDOM_INIT,
    CheckpointError,
    allows_tf32,
    arch_patch_size,
    autocast_dtype,
    create_backbone,
    dino_centre,
    dino_optimizer_state,
    head_state_dict,
    is_full_checkpoint,
    load_backbone_weights,
    read_checkpoint,
)
from napari_wsdino.core.sampler import WEAK_LABEL_INFO, PairSampler, weak_labels
from napari_wsdino.core.schedules import Schedules
from napari_wsdino.core.train.checkpoint import restore
from napari_wsdino.core.train.settings import (
    N_GLOBAL,
    TrainConfig,
    TrainingError,
    with_cache_channels,
)
from napari_wsdino.core.views import Centres


# -- models ---------------------------------------------------------------------------
def check_fit(config: TrainConfig, shape) -> None:
    """Refuse crop settings that do not fit a cache of ``shape`` (H, W) px, naming the
    setting, its limit and the value to use (:class:`TrainingError`), before any work."""
    side = min(int(v) for v in shape[:2])
    if side < config.global_size // 2:
        raise TrainingError(
            f"global_size = {config.global_size} (Global crop px) is too large for this "
            f"cache's {shape[0]}x{shape[1]} px fields: set it to at most {2 * side} (twice "
            "the shorter side), or preprocess at a larger size.")
    patch = arch_patch_size(config.arch)
    for key, title, value in (("global_size", "Global crop px", config.global_size),
                              ("local_size", "Local crop px", config.local_size)):
        if patch and value % patch:
            raise TrainingError(
                f"{key} = {value} ({title}) is not a multiple of {config.arch}'s patch size "
                f"{patch}: set it to {max(patch, value // patch * patch)}.")


def build_models(config: TrainConfig) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher (same weights; the teacher without drop-path, frozen).

    Weights come from ``torch.manual_seed(config.seed)``, then ``config.init`` if set
    (``"random"``: none), so every channel of a run starts from the same initial weights.
    With ``init_parts="full"`` and a full checkpoint, the student and the teacher each
    get their own saved backbone and head (the heads must fit).
    """
    torch.manual_seed(config.seed)
    backbone = create_backbone(config.arch, in_chans=1, drop_path_rate=config.drop_path_rate,
                               pos_embed=config.pos_embed)
    embed_dim = backbone.num_features
    head = DINOHead(embed_dim, config.out_dim, config.hidden_dim, config.bottleneck_dim,
                    use_bn=False, norm_last_layer=config.norm_last_layer)
    student = MultiCropWrapper(backbone, head)
    teacher = MultiCropWrapper(
        create_backbone(config.arch, in_chans=1, drop_path_rate=0.0, pos_embed=config.pos_embed),
        DINOHead(embed_dim, config.out_dim, config.hidden_dim, config.bottleneck_dim,
                 use_bn=False, norm_last_layer=config.norm_last_layer),
    )
    init = read_checkpoint(config.init) if config.init not in ("", RANDOM_INIT) else None
    full = init is not None and config.init_parts == "full" and is_full_checkpoint(init)
    if init is not None:
        which = "student" if full else "teacher"
        load_backbone_weights(student.backbone, init, which=which)
        _maybe_load_head(student.head, init, which, strict=full)
    teacher.load_state_dict(student.state_dict())
    if full:
        load_backbone_weights(teacher.backbone, init, which="teacher")
        _maybe_load_head(teacher.head, init, "teacher", strict=True)
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def _maybe_load_head(head: DINOHead, ckpt: dict, which: str = "teacher",
                     strict: bool = False) -> bool:
    """Load a DINO head from a full (ours / official) checkpoint when its shape fits
    (``strict``: a head that does not fit is an error naming both shapes)."""
    found = head_state_dict(ckpt, which)
    target = head.state_dict()
    if set(found) != set(target) or any(found[k].shape != target[k].shape for k in target):
        if strict:
            theirs = {k: list(v.shape) for k, v in found.items() if "last_layer" in k}
            ours = {k: list(v.shape) for k, v in target.items() if "last_layer" in k}
            raise CheckpointError(
                f"The {which} head in the checkpoint does not fit: its last layer is {theirs}, "
                f"this config's is {ours}. Set out_dim / hidden_dim / bottleneck_dim to the "
                "checkpoint's (65536 / 2048 / 256 for DINO ViT-S/8)."
            )
        return False
    head.load_state_dict(found)
    return True


def _load_init_state(config, student, optimizer, dino_loss) -> None:
    """The rest of DINO's restart_from_checkpoint: loss centre and optimiser state of a
    full init checkpoint (its epoch counter is not taken: training starts at epoch 0)."""
    if config.init in ("", RANDOM_INIT):
        return
    init = read_checkpoint(config.init)
    centre = dino_centre(init)
    if centre is not None:
        if tuple(centre.shape) != tuple(dino_loss.center.shape):
            raise CheckpointError(f"The checkpoint's DINO centre is {list(centre.shape)}, this "
                                  f"config's {list(dino_loss.center.shape)}; set out_dim to match.")
        dino_loss.center.copy_(centre.to(dino_loss.center))
    names = {id(p): n for n, p in student.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state = dino_optimizer_state(init, optimizer, order)
    if state is not None:
        optimizer.load_state_dict(state)


def _patch_size(backbone) -> int:
    ps = backbone.patch_embed.patch_size
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)



# -- data -----------------------------------------------------------------------------
class FieldSource:
    """Fields of one channel as ``(B, 1, H, W)`` float32 batches on the device.

    With ``preload="device"`` (or ``"auto"`` on CUDA when they fit) the fields used are
    copied once to the device as float16 — 2,528 fields of 512 x 640 take 1.7 GB — so a
    batch is a gather there. Otherwise batches are read from the memory-mapped cache.
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray, device: torch.device, preload: str):
        self.images, self.device = images, device
        self.lookup = None
        rows = np.unique(rows)
        nbytes = len(rows) * int(np.prod(images.shape[1:])) * 2
        resident = preload == "device" or (
            preload == "auto" and device.type == "cuda"
            and nbytes < 0.4 * torch.cuda.mem_get_info(device)[0]
        )
        if resident:
            self.lookup = np.full(images.shape[0], -1, dtype=np.int64)
            self.lookup[rows] = np.arange(len(rows))
            self.data = torch.empty((len(rows), *images.shape[1:]), dtype=torch.float16,
                                    device=device)
            for s in range(0, len(rows), 256):  # chunked: never the whole cache in host RAM
                chunk = np.asarray(images[rows[s:s + 256]], dtype=np.float16)
                self.data[s:s + len(chunk)] = torch.from_numpy(chunk).to(device)

    def batch(self, rows: np.ndarray) -> torch.Tensor:
        if self.lookup is not None:
            idx = torch.from_numpy(self.lookup[rows]).to(self.device)
            return self.data.index_select(0, idx).float().unsqueeze(1)
        # float16 -> float32 in torch: several times faster than NumPy's cast.
        x = torch.from_numpy(np.ascontiguousarray(self.images[np.asarray(rows)])).float()
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True).unsqueeze(1)
        return x.unsqueeze(1)


def dataset_fingerprint(cache: Cache, channel: str, labels) -> str:
    """SHA-256 over the cache settings, the fields and labels used, and sample pixels."""
    h = hashlib.sha256()
    h.update(json.dumps(cache.settings, sort_keys=True, default=str).encode())
    h.update(channel.encode())
    rows = labels.index.to_numpy()
    cols = [c for c in ("plate", "well", "site") if c in cache.table]
    h.update(cache.table.iloc[rows][cols].to_csv(index=False).encode())
    h.update("\n".join(map(str, labels.to_numpy())).encode())
    images = cache.images(channel)
    probe = np.linspace(0, images.shape[0] - 1, num=min(4, images.shape[0])).astype(int)
    h.update(np.ascontiguousarray(images[probe]).tobytes())
    return h.hexdigest()



def _params_groups(model: torch.nn.Module):
    """DINO's groups: no weight decay on biases and norms."""
    reg, not_reg = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (not_reg if name.endswith(".bias") or p.ndim == 1 else reg).append(p)
    return [{"params": reg}, {"params": not_reg, "weight_decay": 0.0}]



def _crop_centres(cache: Cache, config: TrainConfig, rows: np.ndarray):
    """``rows -> Centres | None``: nuclei of the fields used, found once per run."""
    if config.crop_centres == "uniform":
        return lambda batch_rows: None
    from napari_wsdino.core.nuclei import nuclei_centres

    if config.nuclei_channel not in cache.channels:
        raise TrainingError(
            f"crop_centres = nuclei needs the nuclear stain {config.nuclei_channel!r}, which "
            f"this cache lacks (it has {', '.join(cache.channels)}). Set nuclei_channel to "
            "your DNA channel (empty: the cache's first), or crop_centres = uniform.")
    rows = np.unique(rows)
    yx, count = nuclei_centres(cache.images(config.nuclei_channel), rows)
    lookup = np.full(len(cache.table), -1, dtype=np.int64)
    lookup[rows] = np.arange(len(rows))
    yx_t, count_t = torch.from_numpy(yx), torch.from_numpy(count)

    def centres(batch_rows) -> Centres:
        idx = torch.from_numpy(lookup[np.asarray(batch_rows)])
        return Centres(yx_t[idx], count_t[idx])

    return centres



def describe_data(cache: Cache | str | Path, config: TrainConfig) -> dict:
    """What a run would train on: fields, weak-label groups, singleton groups, steps.

    Example
    -------
    >>> describe_data("cache/", TrainConfig(weak_label="compound"))   # doctest: +SKIP
    {'fields': 2528, 'groups': 38, 'singleton_groups': [], 'paired': True, ...}
    """
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    info = distributed.DistInfo(world_size=distributed.env_world_size())  # as rank 0 sees it
    return _sampler(cache, config, info)[1].summary()



# -- the run ----------------------------------------------------------------------------
@dataclass
class TrainState:
    """One channel's run in memory: what :func:`setup_run` built, and where the loop is.

    ``step`` counts optimisation steps done; ``epoch_loss`` / ``epoch_n`` /
    ``epoch_singletons`` are the running totals of the current epoch (saved in the
    checkpoint, so a run resumed mid-epoch logs the same epoch mean).
    """

    config: TrainConfig
    out: Path
    ckpt_path: Path
    device: torch.device
    info: distributed.DistInfo
    sampler: PairSampler
    student: MultiCropWrapper
    teacher: MultiCropWrapper
    dino_loss: DINOLoss
    optimizer: torch.optim.Optimizer
    sched: Schedules
    data_meta: dict
    patch: int
    # Filled by setup_run once the state is restored:
    forward: Callable | None = None  # the student as trained: DDP / torch.compile wrapped
    autocast: Callable = contextlib.nullcontext
    source: FieldSource | None = None
    centres: Callable | None = None
    step: int = 0
    epoch_loss: float = 0.0
    epoch_n: int = 0
    epoch_singletons: int = 0
    last_layer: list = field(default_factory=list)

    @property
    def paired(self) -> bool:
        return WEAK_LABEL_INFO[self.config.weak_label].paired

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def total(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    @property
    def fields_per_step(self) -> int:
        return self.config.batch_size * self.info.world_size

    @property
    def log_path(self) -> Path:
        return self.out / LOG_FILE


def setup_run(cache: Cache, config: TrainConfig, out: Path, ckpt_path: Path,
              device: torch.device, info, resume: bool) -> TrainState:
    """Build one channel's run, resumed from ``ckpt_path`` when ``resume`` and it exists.

    An empty ``config.channel`` / ``nuclei_channel`` becomes the cache's first channel
    (:func:`~napari_wsdino.core.train.settings.with_cache_channels`); the run's saved
    ``config.toml`` and checkpoint name the channel it resolved to.
    """
    config = with_cache_channels(config, cache.channels)
    if config.channel not in cache.channels:
        raise TrainingError(f"This cache has no channel {config.channel!r} (it has "
                            f"{', '.join(cache.channels)}); train one of those.")
    if device.type == "cuda" and info.distributed:
        device = torch.device("cuda", info.local_rank)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if ckpt_path.exists() and not resume:
        raise FileExistsError(
            f"{ckpt_path} exists: resume it (--resume) or choose another output folder."
        )
    labels, sampler = _sampler(cache, config, info)
    _check_length(config, sampler.steps_per_epoch)
    student, teacher, patch = _models(cache, config, device)
    dino_loss = DINOLoss(config.out_dim, N_GLOBAL + config.local_crops, N_GLOBAL,
                         config.student_temp, config.center_momentum,
                         config.teacher_centering).to(device)
    optimizer = torch.optim.AdamW(_params_groups(student), lr=0.0,
                                  weight_decay=config.weight_decay, fused=device.type == "cuda")
    state = TrainState(
        config=config, out=out, ckpt_path=ckpt_path, device=device, info=info,
        sampler=sampler, student=student, teacher=teacher, dino_loss=dino_loss,
        optimizer=optimizer, sched=Schedules.from_config(config, sampler.steps_per_epoch),
        data_meta=_data_meta(cache, config, labels, sampler), patch=patch)
    resuming = resume and ckpt_path.exists()
    if config.init_parts == "full" and not resuming:
        _load_init_state(config, student, optimizer, dino_loss)
    if resuming:
        restore(state)
    if info.is_main:
        config.save(out / CONFIG_FILE)
        if state.step == 0:  # a fresh start: no lines of an attempt that never checkpointed
            state.log_path.unlink(missing_ok=True)
    _accelerate(state)
    rows = labels.index.to_numpy()
    state.source = FieldSource(cache.images(config.channel), rows, device, config.preload)
    state.centres = _crop_centres(cache, config, rows)
    state.last_layer = list(student.head.last_layer.parameters())
    return state


def _sampler(cache: Cache, config: TrainConfig, info) -> tuple:
    """The weak label of every field used, and this process's sampler of them."""
    labels = weak_labels(cache.table, config.weak_label, config.dmso)
    paired = WEAK_LABEL_INFO[config.weak_label].paired
    # "replicate": every process draws the whole epoch, as WS-DINO's WeightedRandomSampler.
    shard = config.epoch_split == "shard"
    sampler = PairSampler(labels, config.batch_size, pair=paired,
                          balance=paired and config.balance, seed=config.seed,
                          rank=info.rank if shard else 0,
                          world_size=info.world_size if shard else 1)
    return labels, sampler


def _data_meta(cache: Cache, config: TrainConfig, labels, sampler: PairSampler) -> dict:
    """What the run trains on, saved in every checkpoint (resume checks the fingerprint)."""
    meta = {"channel": config.channel, "weak_label": config.weak_label, "dmso": config.dmso,
            "fingerprint": dataset_fingerprint(cache, config.channel, labels),
            **sampler.summary()}
    if isinstance(cache.settings.get("dataset_id"), dict):  # which dataset, for the panels
        meta["dataset_id"] = cache.settings["dataset_id"]
    return meta


#: The most optimisation steps of one run: its three schedules (float64 per step) take
#: 1.2 GB of memory at this length.
MAX_STEPS = 50_000_000


def _check_length(config: TrainConfig, steps_per_epoch: int) -> None:
    """Refuse, before building anything, a run whose schedules would not fit in memory."""
    total = config.epochs * steps_per_epoch
    if total > MAX_STEPS:
        raise TrainingError(
            f"{config.epochs:,} epochs of {steps_per_epoch:,} steps are {total:,} steps, more "
            f"than the {MAX_STEPS:,} one run may take (its schedules alone would need "
            f"{24 * total / 2**30:.1f} GiB of memory): lower --epochs or raise --batch-size.")


def _models(cache: Cache, config: TrainConfig, device: torch.device) -> tuple:
    """Student and teacher on ``device``, after checking the crops fit the patches and cache."""
    student, teacher = build_models(config)
    patch = _patch_size(student.backbone)
    for name in ("global_size", "local_size"):
        if getattr(config, name) % patch:
            raise ValueError(f"{name} = {getattr(config, name)} is not a multiple of the "
                             f"{config.arch} patch size {patch}.")
    if min(cache.shape) < config.global_size // 2:
        raise ValueError(f"Cache fields of {cache.shape} px are too small for "
                         f"{config.global_size} px global crops.")
    return student.to(device), teacher.to(device), patch


def _accelerate(state: TrainState) -> None:
    """DDP across processes, ``torch.compile``, TF32 and bf16 autocast where asked for."""
    config, device = state.config, state.device
    cuda = device.type == "cuda"
    model = state.student
    if state.info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            state.student, device_ids=[device.index] if cuda else None)
    state.forward = torch.compile(model) if config.compile else model
    if cuda:  # precision "fp32": no TF32 either, as the official fp32 training
        torch.backends.cuda.matmul.allow_tf32 = allows_tf32(config.precision)
        torch.backends.cudnn.allow_tf32 = allows_tf32(config.precision)
    dtype = autocast_dtype(device, config.precision)
    if dtype is not None:
        state.autocast = lambda: torch.autocast(device.type, dtype=dtype)


