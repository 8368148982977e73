"""A stand-in for `triton_python_backend_utils`, to unit-test model.py adapters without Triton.

BLS requests are answered by the callables registered in `MODELS` (model name ->
function(inputs dict) -> outputs dict, or raising to produce an error response).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Callable

import numpy as np

MODELS: dict[str, Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]] = {}


class TritonError:
    INTERNAL, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, CANCELLED = range(5)

    def __init__(self, message: str, code: int = 0):
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors, error: TritonError | None = None):
        self.output_tensors, self._error = list(output_tensors), error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class FakeRequest:
    """What Triton hands `execute`: named input tensors."""

    def __init__(self, **inputs: np.ndarray):
        self.inputs = [Tensor(k, v) for k, v in inputs.items()]


class InferenceRequest:
    def __init__(self, model_name: str, requested_output_names, inputs, timeout: int = 0, model_version: int = -1):
        self.model_name, self.outputs, self.inputs = model_name, list(requested_output_names), list(inputs)
        self.timeout = timeout  # microseconds, as Triton's
        self.model_version = model_version

    async def async_exec(self) -> InferenceResponse:
        # MODELS[(name, version)] serves that version only; MODELS[name] every version
        model = MODELS.get((self.model_name, self.model_version)) or MODELS.get(self.model_name)
        if model is None:
            return InferenceResponse([], TritonError(f"Request for unknown model: '{self.model_name}' is not found", TritonError.UNAVAILABLE))
        try:
            result = model({t.name(): t.as_numpy() for t in self.inputs})
        except ValueError as exc:
            return InferenceResponse([], TritonError(str(exc), TritonError.INVALID_ARG))
        except Exception as exc:
            return InferenceResponse([], TritonError(str(exc), TritonError.INTERNAL))
        return InferenceResponse([Tensor(name, result[name]) for name in self.outputs])


class Metric:
    """One labelled metric of a fake MetricFamily: a counter's or gauge's value, or a histogram's
    observations (`calls` counts the messages a real stub would send to Triton)."""

    def __init__(self, family: "MetricFamily", labels: dict[str, str], buckets: list[float] | None = None):
        self.family, self.labels, self.buckets = family, dict(labels), buckets
        self._value, self.observations, self.calls = 0.0, [], 0

    def increment(self, value: float) -> None:
        if self.family.kind != MetricFamily.COUNTER or value < 0:
            raise ValueError("increment: a counter only goes up")
        self._value += value
        self.calls += 1

    def set(self, value: float) -> None:
        if self.family.kind != MetricFamily.GAUGE:
            raise ValueError("set: gauges only")
        self._value = value
        self.calls += 1

    def observe(self, value: float) -> None:
        if self.family.kind != MetricFamily.HISTOGRAM:
            raise ValueError("observe: histograms only")
        self.observations.append(float(value))
        self.calls += 1

    def value(self) -> float:
        return self._value


class MetricFamily:
    """pb_utils.MetricFamily as the stub has it: COUNTER, GAUGE, HISTOGRAM; one family per name (a
    second with the same name and kind is the same family, as Triton shares it across instances)."""

    COUNTER, GAUGE, HISTOGRAM = "COUNTER", "GAUGE", "HISTOGRAM"
    REGISTRY: dict[str, "MetricFamily"] = {}

    def __init__(self, name: str, description: str, kind: str):
        known = MetricFamily.REGISTRY.get(name)
        if known is not None and known.kind != kind:
            raise ValueError(f"metric family {name!r} exists with another kind")
        self.name, self.description, self.kind = name, description, kind
        self.metrics: dict[tuple, Metric] = known.metrics if known is not None else {}
        MetricFamily.REGISTRY[name] = self

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> Metric:  # noqa: N802 - the stub's name
        if (self.kind == MetricFamily.HISTOGRAM) != (buckets is not None):
            raise ValueError("a histogram metric needs buckets, and only a histogram takes them")
        key = tuple(sorted(labels.items()))
        if key not in self.metrics:
            self.metrics[key] = Metric(self, labels, buckets)
        return self.metrics[key]


def metric(name: str, **labels: str) -> Metric | None:
    """The fake metric of family `name` with exactly these labels, or None."""
    family = MetricFamily.REGISTRY.get(name)
    return family.metrics.get(tuple(sorted(labels.items()))) if family is not None else None


def reset_metrics() -> None:
    MetricFamily.REGISTRY.clear()


def get_input_tensor_by_name(request, name):
    return next((t for t in request.inputs if t.name() == name), None)


def get_output_tensor_by_name(response, name):
    return next((t for t in response.output_tensors if t.name() == name), None)


def install() -> types.ModuleType:
    module = sys.modules[__name__]
    sys.modules["triton_python_backend_utils"] = module
    return module


def load_model_py(path: Path) -> types.ModuleType:
    """Import a triton_models/<model>/model.py with this fake as its pb_utils."""
    install()
    spec = importlib.util.spec_from_file_location(f"model_under_test_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
