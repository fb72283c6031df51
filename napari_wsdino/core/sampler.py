"""Which fields a training batch holds, and where each field's local crops come from.

WS-DINO (Cross-Zamirski et al. 2022) takes the global crops of a view set from field
``i`` and all local crops from a field ``j != i`` that shares ``i``'s weak label
(treatment, compound, or MoA as a pseudo-label). When ``i``'s group holds one field,
``j = i``; such draws are counted and reported. With the weak label ``"none"`` this is
plain DINO: ``j = i`` always. Fields are drawn with replacement with weight
``1 / group size`` (the paper's weighted random sampler: each weak-label group equally
often), ``len(fields)`` draws per epoch; plain DINO draws a permutation.

Beyond the paper (its proposed future work), ``moa_or_compound`` is a hierarchical label
for partially annotated screens — the MoA where known, else the compound — and DMSO
control fields are excluded (the paper), grouped per plate, or grouped all together.

Example
-------
>>> import pandas as pd
>>> from napari_wsdino.core.sampler import PairSampler, weak_labels
>>> table = pd.DataFrame({"compound": list("aabbc"), "moa": ["X", "X", "Y", "Y", "DMSO"],
...                       "treatment": list("aabbc"), "plate": ["p"] * 5})
>>> labels = weak_labels(table, "compound")
>>> labels.tolist(), labels.index.tolist()
(['a', 'a', 'b', 'b'], [0, 1, 2, 3])
>>> plan = PairSampler(labels, batch_size=2, seed=0).epoch(0)
>>> plan.global_rows.shape
(2, 2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from napari_wsdino.core.metadata import DataError, groups_across_batches

if TYPE_CHECKING:
    import pandas as pd


_BLANK = ["", "nan", "none", "unknown"]


def _each_field(table: pd.DataFrame) -> pd.Series:
    import pandas as pd

    return pd.Series(np.arange(len(table)).astype(str), dtype=object)


def _column(name: str) -> Callable[[pd.DataFrame], pd.Series]:
    def labels(table: pd.DataFrame) -> pd.Series:
        import pandas as pd

        if name not in table:
            raise DataError(f"The field table has no {name!r} column to use as weak label.")
        col = table[name]
        # A blank label is no label: grouping all blanks together would pair unrelated fields.
        blank = col.isna() | col.astype(str).str.strip().str.lower().isin(_BLANK)
        if blank.any():
            raise DataError(
                f"{int(blank.sum())} fields have no {name}; use --weak-label "
                "moa_or_compound for partially annotated screens."
            )
        return pd.Series(col.astype(str).to_numpy(), dtype=object)

    return labels


def _moa_or_compound(table: pd.DataFrame) -> pd.Series:
    import pandas as pd

    moa = table["moa"].astype(object)
    known = moa.notna() & ~moa.astype(str).str.strip().str.lower().isin(_BLANK)
    return pd.Series(
        np.where(known, "moa:" + moa.astype(str), "compound:" + table["compound"].astype(str)),
        dtype=object,
    )


@dataclass(frozen=True)
class WeakLabel:
    """One weak label a run can train with: the only place its name, title and help live.

    ``method`` names the method it makes (``DINO`` without a label, else ``WS-DINO``);
    ``group(table)`` gives every field's group, one str per table row.
    """

    name: str
    title: str
    help: str
    group: Callable[[pd.DataFrame], pd.Series]
    method: str = "WS-DINO"

    @property
    def paired(self) -> bool:
        """Local crops from another field of the group (WS-DINO); else the same field."""
        return self.method != "DINO"


#: Weak labels by name, in menu order; the CLI choices, the panels and the study read it.
WEAK_LABEL_INFO: dict[str, WeakLabel] = {w.name: w for w in (
    WeakLabel("none", "none (plain DINO)",
              "each field is its own group: plain DINO, local crops from the same field",
              _each_field, "DINO"),
    WeakLabel("treatment", "treatment", "fields of the same compound at the same concentration",
              _column("treatment")),
    WeakLabel("compound", "compound", "fields of the same compound, any concentration",
              _column("compound")),
    WeakLabel("moa", "MoA", "fields of the same mechanism of action (every field annotated)",
              _column("moa")),
    WeakLabel("moa_or_compound", "MoA, else compound",
              "the MoA where annotated, else the compound (partially annotated screens)",
              _moa_or_compound),
)}
#: Weak-label names (iterable, ``in``-testable), from :data:`WEAK_LABEL_INFO`.
WEAK_LABELS = tuple(WEAK_LABEL_INFO)
#: The one default weak label (training, the CLI, the Train panel, the demo): WS-DINO with the
#: compound, the paper's best; every screen names its compounds. ``none`` is plain DINO.
DEFAULT_WEAK_LABEL = "compound"
DMSO_MODES = ("exclude", "plate", "together")
CONTROL = "DMSO"


def weak_label_help() -> str:
    """One line per weak label, ``name: help``, for --help texts and tooltips."""
    return "; ".join(f"{w.name}: {w.help}" for w in WEAK_LABEL_INFO.values())


def weak_label_note(table: pd.DataFrame, weak_label: str, brief: bool = False) -> str:
    """What a weak label can teach about batches on these fields, in one sentence ("" for
    plain DINO): the demo report and results.json show it, the Train panel its ``brief``
    form under the weak label.

    WS-DINO pairs fields of one group; only groups imaged in several batches give pairs
    that cross a batch, and only those can teach the invariance to the batch that NSCB
    rewards (the paper's argument). In BBBC021's design 37 of the 38 compounds sit in one
    week (only taxol spans all ten).
    """
    if not WEAK_LABEL_INFO[weak_label].paired:
        return ""
    if weak_label in ("moa", "moa_or_compound"):
        if brief:
            return "The MoA is what NSC / NSCB score: a fit to the answer, not discovery."
        return (f"Weak label '{weak_label}': the MoA is what NSC and NSCB score, so on "
                "annotated fields the WS-DINO row measures fit to the answer, not discovery "
                "(the paper: 'cannot be considered a weak label').")
    treated = table[~_is_control(table)]
    n, multi = groups_across_batches(treated, WEAK_LABEL_INFO[weak_label].group(treated))
    if n == 0:           # no treated fields: nothing to pair
        return ""
    groups = f"{weak_label}s"       # treatments, compounds
    if len(multi) * 2 >= n:
        some = f"all {n}" if len(multi) == n else f"{len(multi)} of the {n}"
        if brief:
            return (f"{some.capitalize()} {groups} span several batches: pairs cross "
                    "batches and can teach batch invariance (NSCB).")
        return (f"Weak label '{weak_label}': {some} {groups} were imaged in several "
                "batches, so WS-DINO's pairs cross batches and can teach the invariance to "
                "the batch that NSCB rewards.")
    names = f"{', '.join(multi[:3])}{', ...' if len(multi) > 3 else ''}"
    if brief:
        where = (f"{n - len(multi)} of {n} {groups} sit in one batch (only {names} "
                 f"span{'s' if len(multi) == 1 else ''} several)" if multi
                 else f"All {n} {groups} sit in one batch")
        return (f"{where}: pairs rarely cross batches, so expect WS-DINO and plain DINO to "
                "tie on NSCB.")
    where = (f"{n - len(multi)} of the {n} {groups} were imaged in a single batch, "
             f"{len(multi)} in several ({names})" if multi
             else f"all {n} {groups} were imaged in a single batch")
    share = "every" if not multi else "almost every" if len(multi) * 10 <= n else "most"
    return (f"Weak label '{weak_label}': {where}, so {share} pair WS-DINO learns from "
            "shares a batch: the label cannot teach the model to look past the batch, and "
            "WS-DINO is not expected to beat plain DINO on NSCB on these fields "
            "(docs/training.md, 'Fine-tuning harder does not separate WS-DINO from DINO').")


def _is_control(table: pd.DataFrame) -> np.ndarray:
    ctrl = np.zeros(len(table), dtype=bool)
    for col in ("moa", "compound"):
        if col in table:
            ctrl |= table[col].astype(str).to_numpy() == CONTROL
    return ctrl


def weak_labels(table: pd.DataFrame, weak_label: str = DEFAULT_WEAK_LABEL,
                dmso: str = "exclude") -> pd.Series:
    """The weak label of every training field, indexed by its row in ``table``.

    Parameters
    ----------
    table
        Field table (cache index): ``compound``, ``treatment``, ``moa``, ``plate``.
    weak_label
        A name of :data:`WEAK_LABEL_INFO`: ``none`` (each field alone: plain DINO),
        ``treatment``, ``compound``, ``moa``, or ``moa_or_compound`` (MoA where
        annotated, else the compound).
    dmso
        DMSO controls: ``exclude`` (the paper), ``plate`` (one group per plate), or
        ``together`` (one group).

    Returns
    -------
    pandas.Series of str, index = table row positions of the fields used.
    """
    if weak_label not in WEAK_LABELS:
        raise DataError(
            f"Unknown weak label {weak_label!r}; choose one of {', '.join(WEAK_LABELS)}."
        )
    if dmso not in DMSO_MODES:
        raise DataError(f"Unknown DMSO mode {dmso!r}; choose one of {', '.join(DMSO_MODES)}.")
    rows = np.arange(len(table))
    info = WEAK_LABEL_INFO[weak_label]
    labels = info.group(table)
    ctrl = _is_control(table)
    if info.paired:
        if dmso == "plate":
            labels[ctrl] = (CONTROL + "@" + table["plate"].astype(str))[ctrl].to_numpy()
        elif dmso == "together":
            labels[ctrl] = CONTROL
    keep = ~ctrl if dmso == "exclude" else np.ones(len(table), dtype=bool)
    labels.index = rows
    out = labels[keep]
    if out.empty:
        raise DataError("No training fields are left (all are DMSO controls?); try --dmso plate.")
    return out


@dataclass(frozen=True)
class EpochPlan:
    """One process's batches for one epoch, as cache row indices ``(steps, batch)``."""

    global_rows: np.ndarray
    local_rows: np.ndarray
    singleton: np.ndarray

    @property
    def steps(self) -> int:
        return self.global_rows.shape[0]


class PairSampler:
    """Weighted field sampler with WS-DINO partner fields, sharded across processes.

    Parameters
    ----------
    labels
        From :func:`weak_labels`: weak label per field, index = cache row.
    batch_size
        Fields per step per process (the last incomplete batch is dropped, as DINO).
    pair
        Local crops from another field of the same label (WS-DINO). Default: on unless
        every field is its own group (plain DINO).
    balance
        Draw fields with weight ``1 / group size`` (with replacement); else a permutation.
    seed
        Same seed → same batches, on every process.
    rank, world_size
        This process's shard (``DistributedDataParallel``).
    """

    def __init__(
        self,
        labels: pd.Series,
        batch_size: int = 16,
        *,
        pair: bool | None = None,
        balance: bool | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        import pandas as pd

        self.rows = labels.index.to_numpy(dtype=np.int64)
        self.labels = labels.to_numpy(dtype=object)
        codes, uniques = pd.factorize(labels, sort=True)
        self.codes = codes
        self.group_names = list(uniques)
        self.sizes = np.bincount(codes, minlength=len(uniques))
        plain = len(uniques) == len(codes)
        self.pair = (not plain) if pair is None else pair
        self.balance = (not plain) if balance is None else balance
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{len(self.rows)} training fields over {world_size} process(es) do not fill "
                f"one batch of {batch_size}; lower the batch size."
            )
        # Members of each group, contiguous, and each field's position in its group.
        self._order = np.argsort(codes, kind="stable")
        self._start = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self._pos = np.empty(len(codes), dtype=np.int64)
        self._pos[self._order] = np.arange(len(codes)) - self._start[codes[self._order]]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def per_rank(self) -> int:
        return -(-len(self.rows) // self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.per_rank // self.batch_size

    @property
    def singleton_groups(self) -> list[str]:
        """Weak-label groups of one field (their local crops come from the same field)."""
        if not self.pair:
            return []
        return [n for n, s in zip(self.group_names, self.sizes) if s == 1]

    def summary(self) -> dict:
        return {
            "fields": len(self.rows),
            "groups": len(self.group_names),
            "singleton_groups": self.singleton_groups,
            "paired": self.pair,
            "balanced": self.balance,
            "steps_per_epoch": self.steps_per_epoch,
        }

    def epoch(self, epoch: int) -> EpochPlan:
        """Batches of this process for ``epoch`` (deterministic in seed and epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.rows)
        if self.balance:
            w = 1.0 / self.sizes[self.codes]
            draws = rng.choice(n, size=n, replace=True, p=w / w.sum())
        else:
            draws = rng.permutation(n)
        partners = draws.copy()
        if self.pair:
            code = self.codes[draws]
            size = self.sizes[code]
            r = np.floor(rng.random(n) * (size - 1)).astype(np.int64)
            r += r >= self._pos[draws]  # skip the field itself
            multi = size > 1
            partners[multi] = self._order[(self._start[code] + r)[multi]]
        singleton = self.pair & (partners == draws)
        total = self.per_rank * self.world_size
        pad = np.resize(np.arange(n), total)  # DistributedSampler-style wrap-around
        draws, partners, singleton = draws[pad], partners[pad], singleton[pad]
        take = slice(self.rank, total, self.world_size)
        m = self.steps_per_epoch * self.batch_size
        shape = (self.steps_per_epoch, self.batch_size)
        return EpochPlan(
            global_rows=self.rows[draws[take][:m]].reshape(shape),
            local_rows=self.rows[partners[take][:m]].reshape(shape),
            singleton=np.asarray(singleton[take][:m]).reshape(shape),
        )
