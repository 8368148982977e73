"""What runs a repository's networks: this host's CPU features and whether OpenVINO runs here (what
`cxrlt build-repo --execution-provider auto` chooses from: exporters.execution_default), and the
one line that names a manifest's `execution` record (`cxrlt serve`, `cxrlt build-repo`).

Light on purpose, as the whole contract: /proc/cpuinfo is read, and openvino imported, only when
asked, and once per process.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Mapping

# The instructions the choice depends on, the ones the measured gains come from first: AMX's bf16
# tiles (the issue's 4x on a Xeon), AVX-512's bf16 dot product, the VNNI int8 dot products, AVX2.
CPU_FEATURES = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx2")
BF16_FEATURES = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


def parse_cpu_features(cpuinfo: str) -> tuple[str, ...]:
    """The CPU_FEATURES among the first `flags` line of a /proc/cpuinfo text (every core lists the same)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            return tuple(feature for feature in CPU_FEATURES if feature in flags)
    return ()


@functools.lru_cache(maxsize=None)
def cpu_features(cpuinfo: Path = CPUINFO) -> tuple[str, ...]:
    """This host's CPU_FEATURES; none where there is no /proc/cpuinfo to read (another OS, a sandbox)."""
    if not sys.platform.startswith("linux"):
        return ()
    try:
        return parse_cpu_features(cpuinfo.read_text(errors="replace"))
    except OSError:
        return ()


@functools.lru_cache(maxsize=None)
def openvino_runs() -> bool:
    """Whether the openvino package is installed and offers its CPU device here."""
    try:
        import openvino
    except ImportError:
        return False
    try:
        return "CPU" in openvino.Core().available_devices
    except Exception:  # noqa: BLE001 - a plugin that fails to load means OpenVINO cannot run here
        return False


def cuda_offered() -> bool:
    """Whether onnxruntime offers CUDA here: where the networks' "auto" provider runs them."""
    try:
        import onnxruntime
    except ImportError:  # a client-only install
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def setting_name(provider: str, precision: str, cuda: bool = False) -> str:
    """'openvino bf16', 'onnxruntime CPU fp32', ...; `cuda`: whether 'auto' takes CUDA where it runs."""
    if provider == "openvino":
        return f"openvino {precision}"
    device = {"cpu": "CPU", "cuda": "CUDA"}.get(provider, "CUDA" if cuda else "CPU")
    return f"onnxruntime {device} {precision}"


def describe_execution(record: Mapping[str, Any] | None, cuda: bool = False) -> str:
    """`execution: openvino bf16 (CPU: avx512_bf16 avx512_vnni avx2; chosen by auto: ...)` from a
    manifest's `execution` record; repositories from before the record serve onnxruntime FP32."""
    record = record or {"execution_provider": "auto", "precision": "fp32"}
    setting = (f"PyTorch ({record['engine']}) {record['precision']}" if record.get("engine", "onnxruntime") != "onnxruntime"
               else setting_name(record["execution_provider"], record["precision"], cuda))
    line = f"execution: {setting}"
    if record.get("chosen") != "auto":
        return line
    details = [f"CPU: {' '.join(record.get('cpu_features') or ['no feature detected'])}",
               f"chosen by auto: {record['reason']}" if record.get("reason") else "chosen by auto"]
    if record.get("fallback_from"):
        details.append(f"the parity gate refused {record['fallback_from']}")
    return f"{line} ({'; '.join(details)})"
