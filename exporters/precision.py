"""Execution choices of a build (execution provider x precision) and the parity gate that admits them.

The reference is onnxruntime FP32 on the exported file (itself checked against PyTorch to 1e-4).
A build that serves anything else (OpenVINO, bf16, int8) measures, per network, max |dlogit| and
max |dp| against that reference on the validation images, and, on the whole served pipeline
(router, TTA, ensemble, gating, zero-shot), max |dp| and the Task 1 mAP difference; it refuses
the precision when a figure is outside ParityLimits, and the manifest records them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cxrlt.contract.preprocessing import PreprocessConfig, preprocess
from cxrlt.contract.served import ENCODER_MODEL, ROUTER_MODEL
from python_backends.onnx_runner import OPENVINO, OnnxRunner
from python_backends.openvino_runner import PRECISION_KEY, PRECISIONS

from exporters.onnx_export import ParityError

# What each execution provider can serve. cuda: FP32 only here (its FP16 is the ngc target's
# TensorRT accelerator), and no GPU was at hand to check anything else. auto: onnxruntime FP32;
# "auto" with no precision asked for is resolved to a concrete setting (possibly openvino bf16)
# before these are checked (exporters.execution_default).
PROVIDER_PRECISIONS = {"auto": ("fp32",), "cpu": ("fp32", "int8"), "cuda": ("fp32",), OPENVINO: PRECISIONS}
REFERENCE = "onnxruntime CPU, FP32"


@dataclasses.dataclass(frozen=True)
class ParityLimits:
    """The gate. |dp| <= 0.01: a probability moves by at most one point, far below the spread of
    any operating point's neighbourhood (thresholds are chosen on validation sets whose sampling
    error in sensitivity alone is several points), and below the 0.015 the challenge's ECE bins
    span; |dmAP| <= 0.005: half the smallest mAP difference the leaderboard's bootstrap separates
    (about 0.01), so a precision never changes a ranking-level figure."""
    max_dp: float = 0.01
    max_dmap: float = 0.005


@dataclasses.dataclass
class ParityData:
    """Validation images (UINT16 [H, W], as a client sends them) with their Task 1 labels when
    known (for mAP), projection hints, and training images for int8 calibration."""
    source: str
    images: list[np.ndarray]
    labels: np.ndarray | None = None
    hints: list[str | None] | None = None
    calibration: list[np.ndarray] | None = None


def check_execution(provider: str, precision: str, engine: str = "onnxruntime") -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if provider not in PROVIDER_PRECISIONS:
        raise ValueError(f"execution_provider must be one of {', '.join(PROVIDER_PRECISIONS)}, not {provider!r}")
    if precision not in PROVIDER_PRECISIONS[provider]:
        raise ValueError(f"execution provider {provider!r} serves precision {', '.join(PROVIDER_PRECISIONS[provider])}, "
                         f"not {precision!r}" + ("; bf16 runs on --execution-provider openvino" if precision == "bf16" else ""))
    if engine != "onnxruntime" and (provider == OPENVINO or precision != "fp32"):
        raise ValueError("--execution-provider openvino and --precision bf16/int8 apply to the ONNX engine, not torchscript")


def is_reference(provider: str, precision: str) -> bool:
    """Whether a build serves exactly the reference (nothing to gate)."""
    return provider in ("auto", "cpu", "cuda") and precision == "fp32"


def record_precision(onnx_path: Path | str, precision: str) -> None:
    """Write the precision into the file's metadata: every runner of it applies the same one."""
    import onnx

    proto = onnx.load(str(onnx_path))
    for entry in list(proto.metadata_props):
        if entry.key == PRECISION_KEY:
            proto.metadata_props.remove(entry)
    entry = proto.metadata_props.add()
    entry.key, entry.value = PRECISION_KEY, precision
    onnx.save(proto, str(onnx_path))


def quantize_int8(onnx_path: Path | str, calibration: Sequence[np.ndarray], transformer: bool) -> dict[str, Any]:
    """NNCF post-training quantization of the file in place (int8 QDQ ONNX, runnable by onnxruntime
    and OpenVINO), calibrated on `calibration` (preprocessed [1, 3, S, S] batches)."""
    import nncf
    import onnx

    model = onnx.load(str(onnx_path))
    input_name = model.graph.input[0].name
    dataset = nncf.Dataset(list(calibration), lambda batch: {input_name: batch})
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    quantized = nncf.quantize(model, dataset, subset_size=len(calibration), preset=nncf.QuantizationPreset.MIXED, **kwargs)
    onnx.save(quantized, str(onnx_path))
    return {"method": f"NNCF {nncf.__version__} post-training quantization (MIXED preset"
                      f"{', transformer' if transformer else ''})", "calibration_images": len(calibration)}


def network_batches(images: Sequence[np.ndarray], config: PreprocessConfig, views: Sequence[str]) -> list[np.ndarray]:
    return [preprocess(image, config, views=tuple(views)) for image in images]


def network_parity(reference: Path, served: Path, provider: str, batches: Sequence[np.ndarray], kind: str,
                   threads: int = 1) -> dict[str, Any]:
    """max |dlogit| and max |dp| of one network, served execution vs the reference, on `batches`.
    kind: "sigmoid" (Task 1 members), "softmax" (router), "embedding" (CLIP: dp is the bound
    5/4 max ||u - u'|| on p = sigmoid(5 cos) that unit embeddings u, u' give)."""
    ref, run = OnnxRunner(reference, threads, "cpu"), OnnxRunner(served, threads, "cpu" if provider == "auto" else provider)
    dlogit, dp = 0.0, 0.0
    for batch in batches:
        a, b = ref.run(batch).astype(np.float64), run.run(batch).astype(np.float64)
        dlogit = max(dlogit, float(np.abs(a - b).max()))
        gap = np.abs(_probabilities(a, kind) - _probabilities(b, kind))
        if kind == "embedding":  # |d sigmoid(5 cos)| <= 5/4 |d cos| and |d cos| <= ||u - u'||
            gap = 1.25 * np.linalg.norm(gap, axis=-1)
        dp = max(dp, float(gap.max()))
    return {"max_abs_dlogit": dlogit, "max_abs_dp": dp, "batches": len(batches), "runtime": run.providers}


def _probabilities(out: np.ndarray, kind: str) -> np.ndarray:
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-out))
    if kind == "softmax":
        e = np.exp(out - out.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """AP as the mean precision at each positive's rank (ties broken by order): NaN without positives."""
    positives = int(y.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-score, kind="stable")
    hits = y[order] > 0
    precision = np.cumsum(hits) / np.arange(1, len(y) + 1)
    return float(precision[hits].sum() / positives)


def mean_ap(labels: np.ndarray, probabilities: np.ndarray) -> float:
    aps = [average_precision(labels[:, c], probabilities[:, c]) for c in range(labels.shape[1])]
    return float(np.nanmean(aps)) if not all(np.isnan(aps)) else float("nan")


def pipeline_parity(make_pipelines: Callable[[Callable], tuple[Any, Any]], reference: dict[str, Path], served: dict[str, Path],
                    provider: str, data: ParityData, threads: int = 1) -> dict[str, Any]:
    """The served pipeline (Task 1 and zero-shot probabilities) on every validation image, with the
    served execution and with the reference; max |dp| and the Task 1 mAP of each when labels are known."""
    sides = {"reference": (reference, "cpu"), "served": (served, "cpu" if provider == "auto" else provider)}
    out: dict[str, np.ndarray] = {}
    for side, (files, prefer) in sides.items():
        runners = {name: OnnxRunner(path, threads, prefer) for name, path in files.items()}

        async def infer(name: str, pixels: np.ndarray, runners: dict = runners) -> np.ndarray:
            return runners[name].run(pixels)

        classifier, zeroshot = make_pipelines(infer)
        hints = data.hints or [None] * len(data.images)
        rows = []
        for image, hint in zip(data.images, hints):
            task1 = asyncio.run(classifier.classify(image, hint))
            task2, _ = asyncio.run(zeroshot.score(image))
            rows.append(np.concatenate([task1.probabilities, task2]))
        out[side] = np.stack(rows).astype(np.float64)
    record: dict[str, Any] = {"images": len(data.images), "source": data.source,
                              "max_abs_dp": float(np.abs(out["served"] - out["reference"]).max())}
    if data.labels is not None:
        ref_map, served_map = (mean_ap(data.labels, out[side][:, :data.labels.shape[1]]) for side in ("reference", "served"))
        record.update(mAP_reference=ref_map, mAP_served=served_map, abs_dmAP=abs(served_map - ref_map))
    return record


class PrecisionRefused(ParityError):
    """The gate refused a served execution (not an export that differs from PyTorch: that is a ParityError)."""


def gate(what: str, record: dict[str, Any], limits: ParityLimits, precision: str, provider: str) -> None:
    """Refuse (PrecisionRefused) when a parity figure is outside the limits."""
    faults = []
    if not record["max_abs_dp"] <= limits.max_dp:
        faults.append(f"max |dp| {record['max_abs_dp']:.3g} > {limits.max_dp:g}")
    if record.get("abs_dmAP") is not None and not record["abs_dmAP"] <= limits.max_dmap:
        faults.append(f"|dmAP| {record['abs_dmAP']:.3g} > {limits.max_dmap:g}")
    if faults:
        raise PrecisionRefused(f"{what}: precision {precision} on {provider} is refused: {'; '.join(faults)} against {REFERENCE} "
                               "(choose another precision or execution provider)")


class Execution:
    """A build's served execution when it is not the reference: per network, the reference file
    kept aside, the int8 quantization or precision metadata applied to the served file, and the
    network's parity gate; then the pipeline's (`pipeline`), once the repository is written."""

    def __init__(self, provider: str, precision: str, data: ParityData, classifier: Any, zeroshot: Any,
                 limits: ParityLimits, threads: int = 1) -> None:
        import tempfile

        self.provider, self.precision, self.data, self.limits, self.threads = provider, precision, data, limits, threads
        self.classifier, self.zeroshot = classifier, zeroshot
        self._folder = tempfile.TemporaryDirectory(prefix="cxrlt-reference-")
        self.reference: dict[str, Path] = {}
        self.served: dict[str, Path] = {}

    def close(self) -> None:
        self._folder.cleanup()

    def _batches(self, name: str, images: Sequence[np.ndarray], views: Sequence[str] | None = None) -> list[np.ndarray]:
        if name == ENCODER_MODEL:
            return network_batches(images, self.zeroshot.preprocess, views or ("identity",))
        return network_batches(images, self.classifier.preprocess, views or self.classifier.tta_views)

    def apply(self, name: str, onnx_path: Path) -> dict[str, Any]:
        reference = self.reference[name] = Path(self._folder.name) / f"{name}.onnx"
        reference.write_bytes(Path(onnx_path).read_bytes())
        self.served[name] = Path(onnx_path)
        record: dict[str, Any] = {"execution_provider": self.provider, "precision": self.precision, "reference": REFERENCE}
        if self.precision == "int8":
            calibration = self._batches(name, self.data.calibration or self.data.images, ("identity",))
            transformer = name == ENCODER_MODEL or name.endswith(("_cait", "_swin"))
            record["quantization"] = quantize_int8(onnx_path, calibration, transformer)
        if self.precision != "fp32":
            record_precision(onnx_path, self.precision)
        kind = "softmax" if name == ROUTER_MODEL else "embedding" if name == ENCODER_MODEL else "sigmoid"
        record.update(network_parity(reference, Path(onnx_path), self.provider, self._batches(name, self.data.images), kind,
                                     self.threads), images=len(self.data.images), source=self.data.source)
        gate(name, record, self.limits, self.precision, self.provider)
        return record

    def pipeline(self, repository: Path, release: int) -> dict[str, Any]:
        """The served pipeline's parity (exporters.precision.pipeline_parity) on a written release; gated."""
        from cxrlt.contract.labels import TASK2_LABELS
        from cxrlt.contract.releases import release_text_cache
        from python_backends.classifier import ClassifierPipeline
        from python_backends.zeroshot import ZeroShotPipeline

        cache = release_text_cache(repository, release, TASK2_LABELS)

        def pipelines(infer: Callable) -> tuple[Any, Any]:
            return ClassifierPipeline(self.classifier, infer), ZeroShotPipeline(self.zeroshot, cache, infer)

        record = pipeline_parity(pipelines, self.reference, self.served, self.provider, self.data, self.threads)
        record["limits"] = dataclasses.asdict(self.limits)
        gate("the served pipeline", record, self.limits, self.precision, self.provider)
        return record
