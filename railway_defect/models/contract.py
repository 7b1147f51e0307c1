"""ModelContract: what a model needs besides its weights to see an image as training did, and to
turn its probabilities into a label. It is built once per run (from the data module and the
backbone spec), is the one argument of DefectClassifier that says so, and travels inside every
artefact: checkpoints, ONNX/TorchScript metadata and the calibration file. `from_dict` is the one
reader of all of them, old checkpoints included (`from_hparams`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from railway_defect.models.backbones import get_spec
from railway_defect.utils.decision import Costs, DecisionRule, check_costs
from railway_defect.utils.errors import UserError

# what checkpoints from before decode sizes were recorded were decoded with: the data default
DEFAULT_DECODE_SIZE = 256


@dataclass(frozen=True)
class ModelContract:
    """Args:
    class_names, positive_class: the labels in output order; the class precision, recall and
        the threshold refer to.
    input_size: the square side the network sees (data.image_size).
    decode_size: the shorter side images are decoded to first (data.cache_size), then resized.
    harmonize: the storage form every image is brought to first (data.harmonize).
    mean, std: the input normalisation of the backbone.
    threshold: the decision rule: p(positive) at which a photo is called positive (the recipe's
        model.decision_threshold; evaluate's calibration file may supersede it).
    backbone: the architecture, for the record.
    costs: a K x K cost matrix (true x predicted) that decides instead of the threshold (evaluate
        costs=...; models/decision.py).
    ordinal: the classes are ordered, in `class_names` order (data.ordinal): the report then
        counts errors by distance.
    """

    class_names: tuple[str, ...]
    positive_class: str
    input_size: int
    decode_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    harmonize: str = "none"
    threshold: float = 0.5
    backbone: str | None = None
    costs: Costs | None = None
    ordinal: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        if self.costs is not None:
            object.__setattr__(self, "costs", check_costs(self.costs, self.class_names))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.positive_class not in self.class_names:
            raise UserError(
                f"positive class {self.positive_class!r} is not one of the classes {list(self.class_names)}."
            )
        if not 0.0 <= self.threshold <= 1.0:  # evaluate's calibrated threshold may be 0 or 1
            raise UserError(f"threshold={self.threshold} must be a probability, between 0 and 1.")

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.positive_class)

    @property
    def rule(self) -> DecisionRule:
        return DecisionRule(self.positive_index, self.threshold, self.costs)

    @classmethod
    def for_backbone(
        cls,
        backbone: str,
        class_names: list[str] | tuple[str, ...],
        positive_class: str,
        input_size: int | None = None,
        decode_size: int | None = None,
        harmonize: str = "none",
        threshold: float = 0.5,
        ordinal: bool = False,
    ) -> ModelContract:
        """The contract of `backbone` on this data: its normalisation, and its native input size
        unless the data says otherwise (decode size: the input size unless given)."""
        if not 0.0 < threshold < 1.0:
            raise UserError(f"model.decision_threshold={threshold} must be between 0 and 1.")
        spec = get_spec(backbone)
        input_size = int(input_size or spec.input_size)
        return cls(
            tuple(class_names),
            positive_class,
            input_size,
            int(decode_size or input_size),
            spec.mean,
            spec.std,
            harmonize,
            float(threshold),
            backbone,
            ordinal=ordinal,
        )

    def with_rule(self, rule: DecisionRule) -> ModelContract:
        return replace(self, threshold=float(rule.threshold), costs=rule.costs)

    def without_rule(self) -> ModelContract:
        """What models must share to be averaged or compared: everything but the decision rule."""
        return replace(self, threshold=0.5, costs=None)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples): JSON and `torch.load(weights_only=True)` read them."""
        return {k: _plain(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelContract:
        """A contract from any artefact: this layout, or the flat keys of checkpoints and exports
        written before contracts existed (cache_size, decision_threshold; no mean/std: the
        backbone's)."""
        if "decode_size" not in data and "cache_size" in data:
            data = {**data, "decode_size": data.get("cache_size") or DEFAULT_DECODE_SIZE}
        if "threshold" not in data and "decision_threshold" in data:
            data = {**data, "threshold": data["decision_threshold"]}
        if "mean" not in data or "std" not in data or not data.get("input_size"):
            spec = get_spec(data["backbone"])
            data = {
                "mean": spec.mean,
                "std": spec.std,
                **data,
                "input_size": data.get("input_size") or spec.input_size,
            }
        data = {**data, "decode_size": data.get("decode_size") or DEFAULT_DECODE_SIZE}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> ModelContract:
        """The contract of a checkpoint: its `contract` entry, or (checkpoints written before
        contracts, e.g. at 9b081f6) the flat constructor arguments it stored instead."""
        if "contract" in hparams:
            return cls.from_dict(dict(hparams["contract"]))
        return cls.from_dict(dict(hparams))


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value
