"""One predictor interface over a training checkpoint, an exported ONNX file or a TorchScript file:
the network, the preprocessing it was trained with, and its stored threshold and temperature."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from railway_defect.data.device import EncodedImage, jpeg_for_device, resolve_scoring_decode, scoring_batch
from railway_defect.data.images import DEFAULT_MAX_PIXELS, decode_image
from railway_defect.data.transforms import build_transform
from railway_defect.models.contract import ModelContract
from railway_defect.utils.decision import Costs, DecisionRule
from railway_defect.utils.errors import UserError
from railway_defect.utils.layout import has_record, job_dirs
from railway_defect.utils.outputs import write_json_atomic
from railway_defect.utils.warning_filters import torchscript_deprecation_silenced

if TYPE_CHECKING:
    from railway_defect.sweeps.summary import JobRow

log = logging.getLogger(__name__)

# key of the JSON that travels inside exported files (ONNX metadata, TorchScript extra file)
METADATA_KEY = "railway_defect"
MODEL_ID_LENGTH = 16
# normalised images (B, 3, H, W): a host array, or a tensor already on the model's device
Batch = np.ndarray | torch.Tensor


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Calibration:
    """The decision rule (threshold on p(positive), or costs) and the softmax temperature, fitted
    by evaluate."""

    threshold: float = 0.5
    temperature: float = 1.0
    # how they were chosen (target recall, split, model hash), for the record
    details: dict[str, Any] = field(default_factory=dict)
    # a K x K cost matrix that decides instead of the threshold (models/decision.py)
    costs: Costs | None = None

    def __post_init__(self) -> None:
        if self.costs is not None:  # JSON gives lists; a rule is compared and hashed
            object.__setattr__(self, "costs", tuple(tuple(float(v) for v in row) for row in self.costs))


def calibration_path(model_path: str | Path) -> Path:
    """The sidecar beside a model file (checkpoints/best.ckpt -> checkpoints/best.ckpt.calibration.json),
    or inside an ensemble's sweep directory (<sweep>/calibration.json)."""
    model_path = Path(model_path)
    if model_path.is_dir():
        return model_path / "calibration.json"
    return model_path.with_name(f"{model_path.name}.calibration.json")


def write_calibration(
    model_path: str | Path, calibration: Calibration, model_sha256: str, contract: ModelContract
) -> Path:
    """The sidecar: threshold and temperature for the model file with this hash, and the contract
    they complete (for the record: the model file's own contract is the one read)."""
    path = calibration_path(model_path)
    record = {**asdict(calibration), "model_sha256": model_sha256}
    record["contract"] = contract.with_rule(rule_of(contract, calibration)).to_dict()
    write_json_atomic(path, record)
    return path


def read_calibration(model_path: Path, model_sha256: str) -> Calibration | None:
    """The sidecar's calibration, or None when there is none or it was fitted on another file."""
    path = calibration_path(model_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        calibration = Calibration(
            float(data["threshold"]), float(data["temperature"]), data.get("details", {}), data.get("costs")
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("Ignoring unreadable %s (%s).", path, e)
        return None
    if data.get("model_sha256") != model_sha256:
        log.warning(
            "Ignoring %s: it was fitted for another version of %s; run evaluate again.", path, model_path.name
        )
        return None
    return calibration


def rule_of(contract: ModelContract, calibration: Calibration) -> DecisionRule:
    """The rule a model decides by: its classes' positive index with the calibration's threshold
    and costs."""
    return DecisionRule(contract.positive_index, calibration.threshold, calibration.costs)


class Predictor:
    """A loaded model that scores images the way training evaluated them: `decode` (storage form
    and cache size of the run), `preprocess` (resize, normalise), `probabilities` (temperature and
    test-time flips); subclasses (checkpoint, ONNX, TorchScript, ensemble) only implement `logits`.
    Get one with `load_predictor`.

    Args:
        path, sha256: the model file (or sweep directory) and its content hash (the `model` column).
        contract: classes, positive class, preprocessing and threshold of the model.
        calibration: operating threshold and temperature (from evaluate, else 0.5 and 1).
        kind: checkpoint | onnx | torchscript | ensemble.
    """

    def __init__(self, path: Path, sha256: str, contract: ModelContract, calibration: Calibration, kind: str):
        self.path, self.sha256, self.calibration, self.kind = path, sha256, calibration, kind
        self.contract = contract
        self.transform = build_transform([], contract.input_size, contract.mean, contract.std)
        # JPEGs kept as bytes by `decode` and decoded on input_device in batches (decode=gpu|auto)
        self.decode_on_device = False

    @property
    def input_device(self) -> torch.device:
        """Where the network takes its input (the CPU for ONNX Runtime)."""
        return getattr(self, "device", torch.device("cpu"))

    @property
    def rule(self) -> DecisionRule:
        return rule_of(self.contract, self.calibration)

    @property
    def model_id(self) -> str:
        """The `model` column: a short hash of the model file's content."""
        return self.sha256[:MODEL_ID_LENGTH]

    def logits(self, batch: Batch) -> np.ndarray:
        """(B, 3, H, W) float32 normalised images (an array, or a tensor on input_device) ->
        (B, num_classes) logits."""
        raise NotImplementedError

    def decode(self, data: bytes) -> np.ndarray | EncodedImage:
        """Image file bytes -> the RGB array training would have cached (raises DecodeError), or
        with decode_on_device, a plain JPEG's bytes that `preprocess` decodes on the device."""
        if self.decode_on_device and (jpeg := jpeg_for_device(data, DEFAULT_MAX_PIXELS)) is not None:
            return jpeg
        return self.decode_on_cpu(data)

    def decode_on_cpu(self, data: bytes) -> np.ndarray:
        """Image file bytes -> the RGB array training would have cached (raises DecodeError)."""
        return decode_image(data, self.contract.decode_size, mode=self.contract.harmonize)

    def preprocess(self, images: list[np.ndarray | EncodedImage]) -> Batch:
        """Decoded RGB arrays -> one normalised batch, exactly as training's evaluation path; with
        JPEG bytes among them, the batch is made on input_device (data.device.scoring_batch)."""
        if any(isinstance(image, EncodedImage) for image in images):
            c = self.contract
            return scoring_batch(images, self.input_device, c.decode_size, c.input_size, c.mean, c.std)
        return torch.stack([self.transform(image=image)["image"] for image in images]).numpy()

    def probabilities(
        self, batch: Batch, temperature: float | None = None, flips: tuple[int, ...] = ()
    ) -> np.ndarray:
        """Softmax of logits / temperature, averaged over the batch and its flips along `flips`
        (axes of the image: -1 horizontal, -2 vertical)."""
        temperature = self.calibration.temperature if temperature is None else temperature
        views = [batch, *(_flipped(batch, axis) for axis in flips)]
        probs = [torch.softmax(torch.from_numpy(self.logits(v)) / temperature, dim=1) for v in views]
        return torch.stack(probs).mean(dim=0).numpy()

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "model_path": str(self.path),
            "format": self.kind,
            "classes": list(self.contract.class_names),
            "positive_class": self.contract.positive_class,
            "threshold": self.calibration.threshold,
            "costs": _plain(self.calibration.costs),
            "ordinal": self.contract.ordinal,
            "temperature": self.calibration.temperature,
            "input_size": self.contract.input_size,
        }


class CheckpointPredictor(Predictor):
    """A Lightning checkpoint of DefectClassifier; the only kind that can explain (Grad-CAM).
    Scores and explains with the bare network (models.network: Lightning is not imported); the
    Lightning module, which the review notebooks use, is loaded when first asked for."""

    def __init__(self, path: Path, sha256: str, device: str = "auto"):
        from railway_defect.models.network import load_network

        self.device = _torch_device(device)
        self._network, contract, hparams = load_network(path, self.device)
        self.channels_last = bool(hparams.get("channels_last", True))
        super().__init__(path, sha256, contract, _recipe_calibration(contract), "checkpoint")

    @functools.cached_property
    def model(self) -> nn.Module:
        """The checkpoint's DefectClassifier (a LightningModule), in eval mode on this device."""
        from railway_defect.models.module import load_classifier

        return load_classifier(self.path, self.device)

    def _images(self, batch: Batch) -> torch.Tensor:
        images = _tensor(batch).to(self.device)
        # as the module trained: a no-op when the batch already is
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    @torch.inference_mode()
    def logits(self, batch: Batch) -> np.ndarray:
        return self._network(self._images(batch)).float().cpu().numpy()

    def network(self) -> nn.Module:
        """Normalised images -> logits as a plain module, for export."""
        return self._network

    @torch.inference_mode()
    def features(self, batch: Batch) -> np.ndarray:
        """The backbone's pooled features (what the head sees): where photos look alike to the model."""
        from railway_defect.models.network import pooled_features

        network = self._network
        return (
            pooled_features(network.backbone, self._images(batch), network.flip_invariant)
            .float()
            .cpu()
            .numpy()
        )


def _recipe_calibration(contract: ModelContract) -> Calibration:
    """The threshold the training recipe set (model.decision_threshold; 0.5 for older checkpoints)."""
    threshold = contract.threshold
    details = {} if threshold == 0.5 else {"threshold": "model.decision_threshold of the training recipe"}
    return Calibration(threshold, 1.0, details, contract.costs)


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


class AveragedProbabilities(nn.Module):
    """Several networks as one: the log of their mean class probabilities, so that a softmax of
    the output is exactly the ensemble's probabilities (one graph when exported)."""

    def __init__(self, networks: list[nn.Module]):
        super().__init__()
        self.networks = nn.ModuleList(networks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([net(images).softmax(dim=1) for net in self.networks]).mean(dim=0)
        return probs.clamp_min(1e-12).log()


class EnsemblePredictor(Predictor):
    """The models of a cross-validation sweep (one per fold and seed): probabilities averaged.
    Each saw a different part of the data, so their mean is steadier than any one of them."""

    def __init__(self, path: Path, members: list[CheckpointPredictor]):
        preprocessing = {json.dumps(m.contract.without_rule().to_dict(), sort_keys=True) for m in members}
        if len(preprocessing) > 1:
            raise UserError(f"The models in {path} differ in classes or preprocessing; pass one run instead.")
        self.members = members
        sha256 = hashlib.sha256("".join(m.sha256 for m in members).encode()).hexdigest()
        rules = {(m.calibration.threshold, m.calibration.costs) for m in members}
        calibration = members[0].calibration if len(rules) == 1 else Calibration()
        contract = members[0].contract.with_rule(rule_of(members[0].contract, calibration))
        super().__init__(path, sha256, contract, calibration, "ensemble")

    def logits(self, batch: Batch) -> np.ndarray:
        probs = np.mean(
            [torch.softmax(torch.from_numpy(m.logits(batch)), 1).numpy() for m in self.members], 0
        )
        return np.log(np.clip(probs, 1e-12, None))

    def network(self) -> nn.Module:
        return AveragedProbabilities([m.network() for m in self.members]).eval()

    @property
    def input_device(self) -> torch.device:
        return self.members[0].device


class OnnxPredictor(Predictor):
    def __init__(self, path: Path, sha256: str):
        import onnxruntime as ort

        try:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
            self.session = ort.InferenceSession(str(path), providers=providers)
            metadata = json.loads(self.session.get_modelmeta().custom_metadata_map[METADATA_KEY])
        except Exception as e:
            raise UserError(f"{path} is not an ONNX file exported by railway_defect.export ({e}).") from e
        self.input_name = self.session.get_inputs()[0].name
        super().__init__(
            path, sha256, ModelContract.from_dict(metadata), _embedded_calibration(metadata), "onnx"
        )

    def logits(self, batch: Batch) -> np.ndarray:
        if isinstance(batch, torch.Tensor):
            batch = batch.cpu().numpy()
        return self.session.run(None, {self.input_name: batch.astype(np.float32, copy=False)})[0]


class TorchScriptPredictor(Predictor):
    def __init__(self, path: Path, sha256: str, device: str = "auto"):
        self.device = _torch_device(device)
        extra = {f"{METADATA_KEY}.json": ""}
        with torchscript_deprecation_silenced():
            self.module = torch.jit.load(str(path), map_location=self.device, _extra_files=extra).eval()
        metadata = json.loads(extra[f"{METADATA_KEY}.json"])
        super().__init__(
            path, sha256, ModelContract.from_dict(metadata), _embedded_calibration(metadata), "torchscript"
        )

    @torch.inference_mode()
    def logits(self, batch: Batch) -> np.ndarray:
        return self.module(_tensor(batch).to(self.device)).float().cpu().numpy()


def _tensor(batch: Batch) -> torch.Tensor:
    return batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch)


def _flipped(batch: Batch, axis: int) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.flip(axis)
    return np.ascontiguousarray(np.flip(batch, axis=axis))


def _torch_device(device: str) -> torch.device:
    """`auto`: CUDA when available, else the CPU."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def _embedded_calibration(metadata: dict[str, Any]) -> Calibration:
    return Calibration(
        float(metadata.get("threshold", 0.5)),
        float(metadata.get("temperature", 1.0)),
        costs=metadata.get("costs"),
    )


def _plain(costs: Costs | None) -> list[list[float]] | None:
    return None if costs is None else [list(row) for row in costs]


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith(f"extra/{METADATA_KEY}.json") for name in archive.namelist())


def model_checkpoints(folder: Path) -> list[Path]:
    """The model of a run directory (its best.ckpt), or of a cross-validation sweep directory: the
    final weights of every finished job (last.ckpt: the weights its out-of-fold predictions came
    from, which evaluate calibrates the ensemble on; best.ckpt may have been selected on those very
    images). The jobs must be one recipe: they differ in fold or seed only."""
    from railway_defect.sweeps.summary import read_job, recipe_key

    if has_record(folder) or (folder / "checkpoints").is_dir():
        checkpoint = folder / "checkpoints" / "best.ckpt"
        if not checkpoint.is_file():
            raise UserError(f"{folder} has no checkpoints/best.ckpt; pass a checkpoint file instead.")
        return [checkpoint]
    jobs = [read_job(d) for d in job_dirs(folder)] if any(folder.iterdir()) else []
    finished = [j for j in jobs if j.ok and j.checkpoint and Path(j.checkpoint).is_file()]
    if not finished:
        raise UserError(
            f"{folder} is neither a run directory nor a sweep with finished jobs; pass a checkpoint, "
            "a run directory or a cross-validation sweep directory."
        )
    recipes = {recipe_key(j) for j in finished}
    if len(recipes) > 1:
        raise UserError(
            f"{folder} holds {len(recipes)} different recipes; an ensemble is the folds (and seeds) of one "
            "recipe: pass a sweep of one recipe, or one job's run directory."
        )
    return [_final_weights(j) for j in finished]


def _final_weights(job: JobRow) -> Path:
    """A finished job's last.ckpt (its final epoch), else best.ckpt (the same weights when nothing
    was selected)."""
    last = job.final_checkpoint
    return Path(last) if last and Path(last).is_file() else Path(str(job.checkpoint))


def _set_decode(predictor: Predictor, decode: str) -> None:
    """decode (auto | cpu | gpu): whether JPEGs are decoded on the model's device."""
    try:
        on_device = resolve_scoring_decode(decode, predictor.input_device.type, predictor.contract.harmonize)
    except ValueError as e:
        raise UserError(f"{e}.") from None
    predictor.decode_on_device = on_device
    if on_device:
        log.info("Decoding JPEGs on %s in batches (decode=%s).", predictor.input_device, decode)


def _open_model(path: Path, members: list[Path], device: str) -> Predictor:
    """The predictor for a model file by its kind, or the ensemble of `members` (a sweep's checkpoints)."""
    if members:
        return EnsemblePredictor(path, [CheckpointPredictor(p, file_sha256(p), device) for p in members])
    sha256 = file_sha256(path)
    if path.suffix.lower() == ".onnx":
        return OnnxPredictor(path, sha256)
    if _is_torchscript(path):
        return TorchScriptPredictor(path, sha256, device)
    return CheckpointPredictor(path, sha256, device)


def load_predictor(
    path: str | Path | None, device: str = "auto", threshold: float | None = None, decode: str = "cpu"
) -> Predictor:
    """A checkpoint (.ckpt), ONNX (.onnx) or TorchScript file exported by this project, a run
    directory (its best.ckpt) or a cross-validation sweep directory (the ensemble of its fold
    models), with its calibration: the sidecar beside the file (inside the sweep directory) if it
    was fitted on this very model, else what the file carries (exports; a checkpoint's
    model.decision_threshold), else threshold 0.5 and temperature 1. `threshold` overrides."""
    if not path:
        raise UserError("Give the model: ckpt_path=PATH/checkpoints/best.ckpt (or model_path=model.onnx).")
    path = Path(path).expanduser()
    members = model_checkpoints(path) if path.is_dir() else []
    if len(members) == 1:  # a run directory, or a sweep of one job
        path, members = members[0], []
    if not path.exists():
        raise UserError(f"Model file {path} does not exist.")
    predictor = _open_model(path, members, device)
    calibration = read_calibration(path, predictor.sha256) or predictor.calibration
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise UserError(f"threshold={threshold} must be between 0 and 1.")
        calibration = Calibration(float(threshold), calibration.temperature, {"threshold": "given"})
        if predictor.calibration.costs is not None:
            log.warning("threshold=%s replaces the stored cost matrix as the decision rule.", threshold)
    predictor.calibration = calibration
    _set_decode(predictor, decode)
    log.info(
        "Model %s (%s, %s): threshold %.4g, temperature %.4g.",
        path,
        predictor.kind,
        predictor.model_id,
        calibration.threshold,
        calibration.temperature,
    )
    return predictor
