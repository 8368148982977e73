"""What `cxrlt build-repo --execution-provider auto` builds when no --precision is given: the fastest
setting that passes the parity gate (exporters.precision) on this host.

The candidates, fastest first, as measured (loadtest/README.md, "Execution provider and precision";
one paper-size member, batch 2, on an AMD EPYC with avx512_bf16 and avx512_vnni but no AMX):
OpenVINO bf16 1.0-1.9 s, OpenVINO FP32 1.7-2.3 s, onnxruntime FP32 2.3-3.6 s; on a Xeon with AMX,
bf16 ran 4x faster than onnxruntime FP32. A build tries them in turn: when the gate refuses one,
it falls back to the next (exporters.build_repo), and the last, onnxruntime FP32, is the reference
itself, which no gate refuses.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

from cxrlt.contract.execution import BF16_FEATURES, cpu_features, cuda_offered, openvino_runs, setting_name

log = logging.getLogger(__name__)

# onnxruntime FP32. "auto", not "cpu": a repository built on a CPU host still takes CUDA where it
# is served on a GPU (python_backends.onnx_runner.select_providers), as before this choice existed.
REFERENCE_SETTING = ("auto", "fp32")
Setting = tuple[str, str]  # (execution provider, precision)


@dataclasses.dataclass(frozen=True)
class DefaultChoice:
    settings: tuple[Setting, ...]  # fastest first; ends with REFERENCE_SETTING
    reason: str


def cpu_default(profile: str, features: Sequence[str], openvino_usable: Callable[[], bool], cuda: bool) -> DefaultChoice:
    """The settings to try for `profile` on a host with these CPU features; `openvino_usable` is asked
    only when the answer depends on it (importing openvino costs about half a second)."""
    if cuda:
        return DefaultChoice((REFERENCE_SETTING,), "CUDA offered")
    if profile == "tiny":
        # At 64 px the networks cost less than the Python-backend hops around them, so no provider
        # or precision changes a served figure measurably; and a tiny build serves exactly the
        # onnxruntime FP32 reference (the tests compare served with reference to 1e-6).
        return DefaultChoice((REFERENCE_SETTING,), "tiny profile, no gain at 64 px")
    if not openvino_usable():
        return DefaultChoice((REFERENCE_SETTING,), "OpenVINO cannot run here")
    if any(feature in features for feature in BF16_FEATURES):
        return DefaultChoice((("openvino", "bf16"), ("openvino", "fp32"), REFERENCE_SETTING), "bf16 instructions and OpenVINO")
    if "avx2" in features:
        return DefaultChoice((("openvino", "fp32"), REFERENCE_SETTING), "OpenVINO, no bf16 instructions")
    return DefaultChoice((REFERENCE_SETTING,), "no AVX2: OpenVINO's gain is unmeasured here")


def default_settings(profile: str, target: str, engine: str) -> tuple[tuple[Setting, ...], dict[str, Any]]:
    """This host's settings to try, fastest first, and the manifest's record of the choice."""
    if target != "embedded" or engine != "onnxruntime":  # the choice is the embedded onnxruntime runners'
        reason = "ngc target, Triton's onnxruntime backend" if target != "embedded" else f"{engine} engine"
        return (REFERENCE_SETTING,), {"chosen": "auto", "reason": reason}
    features = cpu_features()
    choice = cpu_default(profile, features, openvino_runs, cuda_offered())
    return choice.settings, {"chosen": "auto", "reason": choice.reason, "cpu_features": list(features)}


def next_setting(options: Any, refusal: Exception) -> Any | None:
    """`options` (exporters.build_repo.BuildOptions) at the next slower setting after the parity gate
    refused its own, the refusal recorded; None when it has none (an explicit setting, or the last)."""
    if not options.fallbacks:
        return None
    refused = setting_name(options.execution_provider, options.precision)
    (provider, precision), *slower = options.fallbacks
    choice = dict(options.execution_choice)
    choice.setdefault("fallback_from", refused)
    choice["refused"] = [*choice.get("refused", []), {"setting": refused, "gate": str(refusal)}]
    log.warning("the parity gate refused %s (%s); falling back to %s", refused, refusal, setting_name(provider, precision))
    return dataclasses.replace(options, execution_provider=provider, precision=precision, fallbacks=tuple(slower),
                               execution_choice=choice)
