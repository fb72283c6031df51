"""Weights that ship with the package, addressed by name wherever a weights file is taken.

The paper never trains WS-DINO from random weights: it fine-tunes a DINO-pretrained ViT.
For the tiny CPU ViT of the ``cpu`` preset no public pretrained weights exist, so the
package ships one, made by ``benchmarks/pretrain_init.py``: plain DINO (no labels) on the
synthetic replica of a seed the docs never evaluate, every stain in turn
(benchmarks/RESULTS.md, "Issue 13"). It is the ``cpu`` preset's default ``init``;
``--init random`` trains from random weights instead.

A bundled file holds only the teacher (backbone and DINO head, float16), records its
architecture and no channel, so it serves every stain: ``--init replica-dino-pico8-cells``,
``--model DAPI=replica-dino-pico8-cells`` and the Models panel's "init only" all take the name.

The official ImageNet DINO ViT-S/8 weights (Caron et al. 2021) are also taken by name,
downloaded on first use and cached by the ecosystem's own machinery (:data:`OFFICIAL`):
``dino-vits8`` is the backbone through timm's pretrained config
``vit_small_patch8_224.dino`` and huggingface_hub's cache; ``dino-vits8-full`` is the full
training checkpoint (student, teacher, heads, optimiser, loss centre) that WS-DINO starts
from, from the address in facebookresearch/dino's README into torch.hub's cache
(``TORCH_HOME``). Without network, and not cached, the error names the file and where to
put it. :func:`download_official` is the same fetch as a progress generator (bytes as they
arrive; closing it stops the download and keeps no partial file): the Load models panel's.

>>> resolve_weights("replica-dino-pico8-cells").name
'replica_dino_pico8_cells.pth'
>>> str(resolve_weights("runs/a/DAPI/checkpoint.pth"))
'runs/a/DAPI/checkpoint.pth'
"""

from __future__ import annotations

import os
import queue
import threading
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator, Mapping

from napari_wsdino.core.errors import CheckpointError
from napari_wsdino.core.progress import Progress

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


@dataclass(frozen=True)
class BundledWeights:
    """One weights file shipped in ``napari_wsdino/weights``."""

    name: str
    file: str
    arch: str
    about: str

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.file


#: The ``cpu`` preset's initial weights (the bundled file every CPU demo fine-tunes).
DEFAULT_INIT = "replica-dino-pico8-cells"

#: Every bundled weights file, by the name users type.
BUNDLED: dict[str, BundledWeights] = {b.name: b for b in (
    BundledWeights(
        DEFAULT_INIT, "replica_dino_pico8_cells.pth", "wsdino_vit_pico_patch8",
        "plain DINO (no labels), tiny patch-8 ViT, 300 epochs per stain (DAPI, Tubulin, "
        "Actin in turn) on the synthetic BBBC021 replica of seed 101 (mini, 2 sites, "
        "160 x 200, per-plate normalisation), on cell-scale crops (global views 8-16 %, "
        "local 2-5 % of the field, centred on nuclei): benchmarks/pretrain_init.py"),
    BundledWeights(
        "replica-dino-pico8", "replica_dino_pico8.pth", "wsdino_vit_pico_patch8",
        "the previous cpu-preset init (until 2026-12-01): as replica-dino-pico8-cells but "
        "on field-scale crops (global views 50-100 %, local 20-50 %); its attention does "
        "not settle on the cells"),
)}


@dataclass(frozen=True)
class OfficialWeights:
    """Published weights, fetched by name on first use and kept in a standard cache.

    ``timm_tag``: the timm pretrained config whose Hugging Face hub file (``file``) is
    fetched with huggingface_hub (its cache, ``HF_HUB_CACHE``); without it, ``url`` is
    fetched into torch.hub's checkpoint folder (``TORCH_HOME``) under ``file``. ``size``:
    about how many bytes the download is (what a user is asked to agree to); ``title``: the
    name panels show.
    """

    name: str
    arch: str
    file: str
    url: str
    about: str
    timm_tag: str = ""
    size: int = 0
    title: str = ""

    def hub_repo(self) -> tuple[str, str | None]:
        """The Hugging Face repository and revision of ``timm_tag`` (timm's config)."""
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(self.timm_tag)
        if cfg is None or not cfg.hf_hub_id:
            raise CheckpointError(f"timm has no hub weights for {self.timm_tag}; update timm.")
        repo, _, revision = cfg.hf_hub_id.partition("@")
        return repo, revision or None

    def cache_path(self) -> Path:
        """Where the file lies once fetched (torch.hub's checkpoints for a URL; the hub
        repository's cache folder for a timm config)."""
        if self.timm_tag:
            from huggingface_hub import constants

            repo, _ = self.hub_repo()
            return Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        import torch.hub

        return Path(torch.hub.get_dir()) / "checkpoints" / self.file


#: DINO's ViT-S/8 (Caron et al. 2021), as WS-DINO starts from it.
OFFICIAL: dict[str, OfficialWeights] = {w.name: w for w in (
    OfficialWeights(
        "dino-vits8", "vit_small_patch8_224", "model.safetensors",
        "https://huggingface.co/timm/vit_small_patch8_224.dino/resolve/main/model.safetensors",
        "the official ImageNet DINO ViT-S/8 backbone (dino_deitsmall8_pretrain.pth as timm "
        "publishes it)", timm_tag="vit_small_patch8_224.dino",
        size=86_700_000,  # 21.67 M float32 tensors
        title="backbone only"),
    OfficialWeights(
        "dino-vits8-full", "vit_small_patch8_224", "dino_deitsmall8_pretrain_full_checkpoint.pth",
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/"
        "dino_deitsmall8_pretrain_full_checkpoint.pth",
        "the official ImageNet DINO ViT-S/8 full checkpoint (student, teacher, heads, "
        "optimiser, centre), WS-DINO's start",
        # estimated from its tensors' shapes (student and teacher with the 65536-d head,
        # AdamW's two moments): 176 M float32; no session has had network to measure it
        size=704_000_000, title="full checkpoint (with DINO head)"),
)}


def cached_official(name: str) -> Path | None:
    """The cached file of an official name, or ``None`` (never downloads)."""
    weights = OFFICIAL[name]
    if weights.timm_tag:
        from huggingface_hub import try_to_load_from_cache

        repo, revision = weights.hub_repo()
        found = try_to_load_from_cache(repo, weights.file, revision=revision)
        return Path(found) if isinstance(found, str) else None
    path = weights.cache_path()
    return path if path.is_file() else None


def fetch_official(name: str, progress: bool = True) -> Path:
    """The file of an official name: from the cache, else downloaded into it.

    Raises :class:`CheckpointError` with one line naming the file, its address and where
    to put it when it cannot be downloaded (no network, say).

    Example
    -------
    >>> fetch_official("dino-vits8-full").name                    # doctest: +SKIP
    'dino_deitsmall8_pretrain_full_checkpoint.pth'
    """
    weights = OFFICIAL[name]
    cached = cached_official(name)
    if cached is not None:
        return cached
    try:
        if weights.timm_tag:
            from huggingface_hub import hf_hub_download

            repo, revision = weights.hub_repo()
            return Path(hf_hub_download(repo, weights.file, revision=revision))
        import torch.hub

        dest = weights.cache_path()
        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(dest), progress=progress)
        return dest
    except Exception as exc:  # network, HTTP and disk errors alike end in the same advice
        raise CheckpointError(_offline_advice(weights, exc)) from None


def _offline_advice(weights: OfficialWeights, exc: Exception,
                    by_hand: str | None = None) -> str:
    """One line: why ``weights`` could not be downloaded, and where to put the file.
    ``by_hand``: how to use a file downloaded elsewhere (default: the CLI's ``--init``)."""
    text = str(exc).strip()
    reason = type(exc).__name__ + (f": {text.splitlines()[0][:120].strip()}" if text else "")
    asked = weights.name if by_hand else f"--init {weights.name}"
    if weights.timm_tag:
        repo, _ = weights.hub_repo()
        use = by_hand or "give --init with that file's path"
        where = (f"run `hf download {repo} {weights.file}` where there is network and copy "
                 f"its cache folder to {weights.cache_path()}, or download {weights.url} and "
                 f"{use}")
    else:
        use = by_hand or "give --init with the file's path"
        where = (f"download {weights.url} where there is network and put it at "
                 f"{weights.cache_path()} (or {use})")
    return f"Cannot download {weights.file} for {asked} ({reason}): {where}."


class DownloadCancelled(Exception):
    """The download was stopped on request (:func:`download_official` closed)."""


def download_official(name: str, *, poll: float = 0.2, by_hand: str | None = None,
                      ) -> Generator[Progress, None, Path]:
    """:func:`fetch_official` as a progress generator: the same caches, bytes reported.

    Yields ``Progress("download", bytes done, bytes in all, ...)`` (``info``: ``name``,
    ``file``, ``url``, ``cached``) at least every ``poll`` seconds, so a worker's ``quit()`` is
    seen even while the network is silent. Closing the generator stops the download at
    its next chunk and removes the partial file; a cached file yields one event and no
    network is used. Failures raise :class:`CheckpointError` naming the file and where
    to put it (``by_hand``: how to use a file downloaded elsewhere; default the CLI's
    ``--init``).

    Example
    -------
    >>> from napari_wsdino.core.progress import run_to_end
    >>> run_to_end(download_official("dino-vits8-full")).name    # doctest: +SKIP
    'dino_deitsmall8_pretrain_full_checkpoint.pth'
    """
    weights = OFFICIAL[name]
    info = {"name": name, "file": weights.file, "url": weights.url, "cached": True}
    cached = cached_official(name)
    if cached is not None:
        yield Progress("download", 1, 1, f"{weights.file} is cached", info)
        return cached
    info["cached"] = False
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    outcome: dict = {}

    def report(done: int, total: int | None) -> None:
        if stop.is_set():
            raise DownloadCancelled(weights.file)
        events.put((done, total))

    def run() -> None:
        try:
            outcome["path"] = _download(weights, report)
        except BaseException as exc:  # noqa: BLE001 - handed to the generator
            outcome["error"] = exc
        finally:
            events.put(None)

    thread = threading.Thread(target=run, name=f"download {name}", daemon=True)
    thread.start()
    done, total = 0, weights.size
    try:
        while (item := _next_event(events, poll, (done, total))) is not None:
            done, total = item[0], item[1] or total
            yield Progress("download", done, total, f"{weights.file}: {_mb(done, total)}", info)
    finally:
        if thread.is_alive():  # closed early: stop at the next chunk, which cleans up
            stop.set()
            thread.join(timeout=60)
    error = outcome.get("error")
    if error is not None:
        raise CheckpointError(_offline_advice(weights, error, by_hand)) from None
    return Path(outcome["path"])


def _next_event(events: queue.Queue, poll: float, last: tuple[int, int]):
    """The next ``(done, total)`` (or ``None``: finished); ``last`` again after ``poll`` s."""
    try:
        return events.get(timeout=poll)
    except queue.Empty:
        return last


def _mb(done: int, total: int) -> str:
    """``12.3 of 86.7 MB`` (``12.3 MB`` while the size is unknown)."""
    return f"{done / 1e6:.1f} of {total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"


def _download(weights: OfficialWeights, report: Callable[[int, int | None], None]) -> Path:
    """Download ``weights`` into its cache, calling ``report(done, total)`` per chunk
    (which raises to stop it); no partial file is left behind on any failure."""
    if weights.timm_tag:
        from huggingface_hub import hf_hub_download

        repo, revision = weights.hub_repo()
        # huggingface_hub writes to a temporary file it removes on failure, and reports
        # through the tqdm class it is given
        return Path(hf_hub_download(repo, weights.file, revision=revision,
                                    tqdm_class=_relay_class(report)))
    dest = weights.cache_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{uuid.uuid4().hex}.partial")  # torch.hub's naming
    try:
        with urllib.request.urlopen(weights.url, timeout=60) as resp, open(part, "wb") as fh:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            done = 0
            report(done, total)
            while chunk := resp.read(1 << 20):
                fh.write(chunk)
                done += len(chunk)
                report(done, total)
        if total is not None and done != total:
            raise OSError(f"the connection closed after {done} of {total} bytes")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def _relay_class(report: Callable[[int, int | None], None]):
    """A silent tqdm class that hands huggingface_hub's byte counts to ``report``."""
    from tqdm.auto import tqdm

    class Relay(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            super().__init__(*args, **{**kwargs, "disable": True})
            self.done = kwargs.get("initial") or 0
            report(self.done, kwargs.get("total"))

        def update(self, n=1):
            self.done += n or 0
            report(self.done, self.total)

        def update_transfer(self, n=1):  # hf_xet's network bytes: the file bytes count
            pass

        def set_transfer_postfix_str(self, *args, **kwargs):
            pass

    return Relay


def resolve_weights(value: str | Path) -> Path:
    """The file behind a weights argument: a bundled name, an official name (fetched on
    first use, :func:`fetch_official`), or the path as given."""
    bundled = BUNDLED.get(str(value))
    if bundled is not None:
        return bundled.path
    if str(value) in OFFICIAL:
        return fetch_official(str(value))
    return Path(value)


def weights_exist(value: str | Path) -> bool:
    """Whether a weights argument names an existing file or folder, a bundled file, or
    official weights (fetched on first use: never downloads here)."""
    if str(value) in OFFICIAL:
        return True
    return resolve_weights(value).exists()


def bundled_arch(value: str | Path) -> str | None:
    """The architecture of a bundled or official name (``None`` for a path)."""
    known = BUNDLED.get(str(value)) or OFFICIAL.get(str(value))
    return known.arch if known is not None else None


def slim_init(checkpoint: Mapping, about: str, arch: str) -> dict:
    """A training checkpoint reduced to what an ``init`` needs: the teacher's backbone and
    head in float16, its architecture and a description; no channel, so any stain takes it.

    Example
    -------
    >>> import torch
    >>> slim = slim_init({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 4)},
    ...                   "student": {}}, "test", "test_vit")
    >>> sorted(slim), slim["teacher"]["backbone.cls_token"].dtype
    (['about', 'arch', 'teacher'], torch.float16)
    """
    import torch

    teacher = {k: (v.half() if v.is_floating_point() else v)
               for k, v in checkpoint["teacher"].items() if isinstance(v, torch.Tensor)}
    return {"teacher": teacher, "arch": arch, "about": about}
