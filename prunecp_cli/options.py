"""Parameter objects of the Python API: where the model and data come from, how to run, what to prune.

Every API function in :mod:`prunecp_cli.api` takes these objects (or plain paths, which become
them) instead of long keyword tails, so that an option shared by several commands is declared in
one place: here, and once in ``commands/_common.py`` for the command line. Nothing here imports
torch, so the command line builds and checks them before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prunecp_cli.errors import UsageError

CHANNEL_CHOICES = (1, 3)
"""The channel counts ``--channels`` converts between."""


@dataclass(frozen=True)
class Preprocess:
    """How pixels are turned into model inputs.

    Attributes:
        image_size: for folders, resize the short side and centre-crop to this size (None: as stored).
        mean: per-channel means subtracted after scaling to [0, 1] (None: no normalisation); one value
            (used for every channel) or one per channel.
        std: per-channel standard deviations divided by, counted like ``mean``.
        channels: convert inputs to this many channels, 1 or 3 (None: as stored; folders: the model's
            input channels when known).

    Raises:
        UsageError: ``channels`` is not 1 or 3, or a ``std`` value is not positive.
    """

    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channels: int | None = None

    def __post_init__(self) -> None:
        if self.channels is not None and self.channels not in CHANNEL_CHOICES:
            raise UsageError(f"{{channels}} {self.channels}: give 1 (grayscale) or 3 (RGB)", arguments={"channels": "channels"})
        if self.std is not None and any(not v > 0 for v in self.std):
            raise UsageError(f"{{std}} {','.join(f'{v:g}' for v in self.std)}: standard deviations must be positive", arguments={"std": "std"})

    def check_channels(self, channels: int, path: Path, *, hint: str = "") -> None:
        """Check that ``mean`` and ``std`` fit inputs of ``channels`` channels.

        Args:
            channels: channel count of the model inputs built from the data.
            path: the data, named in the message.
            hint: text appended to the message (e.g. a layout hint).

        Raises:
            UsageError: ``mean`` or ``std`` has neither one value nor one per channel.
        """
        for option, values in (("--mean", self.mean), ("--std", self.std)):
            if values is not None and len(values) not in (1, channels):
                raise UsageError(
                    f"{option} gives {len(values)} values but {path} has {channels} channel"
                    f"{'' if channels == 1 else 's'}; give one value "
                    f"per channel (or one for all){hint}"
                )


@dataclass(frozen=True)
class ModelSource:
    """A model to open: a prunecp file rebuilds itself; a dense checkpoint needs ``arch``.

    Attributes:
        checkpoint: the file.
        arch: ``torchvision:NAME`` or ``package.module:factory`` (dense checkpoints; for a prunecp file
            it must equal the file's own and then also allows building it).
        arch_kwargs: keyword arguments of the architecture factory.
        input_shape: shape of one input example when no data say it.
        trust_arch: build a file's ``module:factory`` even when it is not a trusted source.
    """

    checkpoint: str | Path
    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    input_shape: list[int] | None = None
    trust_arch: bool = False

    @classmethod
    def of(cls, value: str | Path | ModelSource) -> ModelSource:
        """``value`` itself, or a source for the path ``value``."""
        return value if isinstance(value, ModelSource) else cls(value)


@dataclass(frozen=True)
class DataSource:
    """Data to read: an ``.npz``/tensor file, an image folder or one image.

    Attributes:
        path: the file or folder.
        preprocess: how pixels become inputs.
        max_samples: use at most this many examples (a seeded random subset; scoring only).
        groups: a ``.npy``/``.txt`` file with one group label per example, in the data's order (``calibrate``:
            Mondrian calibration by these groups).
    """

    path: str | Path
    preprocess: Preprocess = field(default_factory=Preprocess)
    max_samples: int | None = None
    groups: str | Path | None = None

    @classmethod
    def of(cls, value: str | Path | DataSource | None, *, preprocess: Preprocess | None = None) -> DataSource | None:
        """``value`` itself, None, or a source for the path ``value`` with ``preprocess``."""
        if value is None or isinstance(value, DataSource):
            return value
        return cls(value, preprocess=preprocess or Preprocess())


@dataclass(frozen=True)
class RunOptions:
    """How to run: where, in what batches, with which seed, reporting to whom.

    Attributes:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: examples per forward pass (None: the step's own default).
        seed: seed of every random choice.
        reporter: a :class:`prunecp_cli.runtime.Reporter` (None: silent).
    """

    device: str = "auto"
    batch_size: int | None = None
    seed: int = 0
    reporter: Any = None

    def batch(self, default: int) -> int:
        """The batch size, or ``default`` when none was set."""
        return self.batch_size if self.batch_size is not None else default

    @property
    def rep(self):
        """The reporter (silent when none was given)."""
        if self.reporter is not None:
            return self.reporter
        from prunecp_cli.reporting import SILENT

        return SILENT


@dataclass(frozen=True)
class PruneOptions:
    """What to remove, and the constraints on it.

    Attributes:
        ratio: fraction of channels (``granularity="weight"``: of weights) to remove.
        target_flops: fraction of the dense FLOPs to keep (instead of ``ratio``).
        scope: ``local`` (per group) or ``global`` (one ranking across groups).
        max_layer_ratio: most any group may lose.
        round_to: keep channel counts multiples of this.
        protect: fraction of each group's top channels never removed (None: 0.1 global, 0 local).
        ignore: layers to keep whole (the classifier is always kept).
        bn_recalibrate: re-estimate BatchNorm on the score data (None: when data are given).
        granularity: ``channel`` (physical removal) or ``weight`` (unstructured zeros, no speed-up).
        strict: refuse (exit 3) when some groups must be kept whole because their channel mapping
            cannot be followed, instead of pruning the rest and saying so.
        allocation: how groups share a FLOPs target with global scope: ``rank`` (every group about the
            same share) or ``measured`` (shares chosen by the measured output damage per FLOP saved, on
            the score data; :mod:`prunecp_cli.pipeline.allocation`).
    """

    ratio: float | None = None
    target_flops: float | None = None
    scope: str = "local"
    max_layer_ratio: float = 0.9
    round_to: int = 1
    protect: float | None = None
    ignore: tuple[str, ...] = ()
    bn_recalibrate: bool | None = None
    granularity: str = "channel"
    strict: bool = False
    allocation: str = "rank"


@dataclass(frozen=True)
class RiskOptions:
    """Learn-then-Test: prune as far as ``P(risk <= max_risk) >= 1 - delta`` is certified.

    Attributes:
        risk_data: data for the test only, disjoint from everything else.
        max_risk: epsilon, the tolerated risk (not for ``set-size``).
        delta: failure probability of the guarantee.
        risk: ``disagreement``, ``error``, ``excess-error`` or ``set-size``.
        grid: increasing levels, a list or ``"0.05,0.1"`` / ``"START:STOP:STEP"`` (None: 0.05 … 0.95).
        grid_kind: ``ratio`` (fraction removed) or ``flops`` (fraction of FLOPs removed).
        pvalue: ``binomial``, ``wsr``, ``hb``, ``hoeffding`` or ``bentkus`` (None: binomial for 0/1 losses,
            wsr for bounded ones).
        max_set_size: the bound B on the mean set size, for ``set-size``.
        cert: the certificate whose nonconformity, alpha and delta make the sets, for ``set-size``.
    """

    risk_data: str | Path
    max_risk: float | None = None
    delta: float = 0.05
    risk: str = "disagreement"
    grid: Any = None
    grid_kind: str = "ratio"
    pvalue: str | None = None
    max_set_size: float | None = None
    cert: str | Path | None = None


LOSSES = ("ce", "conftr", "kd", "kd+ce")
DISTILLING = ("kd", "kd+ce")
"""The losses that distil the dense teacher (``kd`` needs no labels)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings (defaults and their sources: prunecp_cli.finetune).

    Attributes:
        epochs: passes over the fine-tuning data.
        lr: peak learning rate (cosine-annealed to 0).
        momentum: SGD Nesterov momentum.
        weight_decay: L2 weight decay.
        batch_size: examples per step (per process under torchrun).
        loss: ``ce``, ``conftr``, ``kd`` (distil the dense model's softened outputs; no labels) or
            ``kd+ce`` (distillation plus ``ce_weight`` × cross-entropy).
        conftr_alpha: ConfTr's training miscoverage.
        conftr_temperature: ConfTr's sigmoid temperature T.
        conftr_size_weight: ConfTr's λ on the size loss.
        ce_weight: weight of cross-entropy added to the ConfTr or ``kd+ce`` objective.
        kd_temperature: distillation temperature T (the loss is scaled by T²).
        seed: shuffling and batch-split seed.
    """

    epochs: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    loss: str = "ce"
    conftr_alpha: float = 0.01
    conftr_temperature: float = 0.5
    conftr_size_weight: float = 0.5
    ce_weight: float = 1.0
    seed: int = 0
    kd_temperature: float = 4.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise UsageError(f"{{loss}} {self.loss!r}: use one of {', '.join(LOSSES)}", arguments={"loss": "loss"})
        if self.epochs < 0:
            raise UsageError(f"{{epochs}} {self.epochs} must be at least 0", arguments={"epochs": "epochs"})
        if self.lr <= 0:
            raise UsageError(f"{{lr}} {self.lr} must be positive", arguments={"lr": "lr"})
        if not self.kd_temperature > 0:
            raise UsageError(f"{{kd_temperature}} {self.kd_temperature} must be positive",
                             arguments={"kd_temperature": "kd_temperature"})
        if self.loss == "conftr":
            from prunecp_cli.conformal.quantile import min_calibration_size

            need = 2 * min_calibration_size(self.conftr_alpha)
            if self.batch_size < need:
                raise UsageError(
                    f"{{loss}} conftr at training alpha {self.conftr_alpha} needs batches of at least {need} "
                    f"(half of each batch calibrates); got {{finetune_batch_size}} {self.batch_size}", arguments={"loss": "loss", "finetune_batch_size": "finetune_batch_size"}
                )

    @property
    def distils(self) -> bool:
        """Whether the loss distils the dense teacher."""
        return self.loss in DISTILLING

    @property
    def needs_labels(self) -> bool:
        """Whether the fine-tuning data must be labelled (every loss but ``kd``)."""
        return self.loss != "kd"

    def to_json(self) -> dict:
        """The settings as a JSON object (recorded in the model metadata)."""
        return asdict(self)
