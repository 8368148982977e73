"""Writing a release's weight-bound results into a built repository, and its identity.

Everything fitted on one release's networks (operating points, the gate, the monitoring baseline,
tuned ensemble weights, the text cache) is written into that release (cxrlt.contract.releases):
its files into the release's directory, its pipeline parameters and manifest fields into its
`release.json`, and, when it is the live release, its parameters into the pipeline configs too,
so a plain tritonclient user reading a served config sees the live release's values. Then the
release's identity (`repository_sha256`) is recomputed over all of it, and every release's
parameters are also copied into the configs as `release_parameters_<N>`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from cxrlt.contract.monitoring import MONITORING_BASELINE_FILE
from cxrlt.contract.ood_gate import GATE_FILE
from cxrlt.contract.operating_points import OPERATING_POINTS_FILE
from cxrlt.contract.releases import (CANDIDATE_PARAMETERS, live_release, read_release, release_dir, release_number,
                                     write_release)
from cxrlt.contract.served import PIPELINE_MODELS
from networks.checkpoints import file_sha256

# What the served answers depend on, as the release records it: the weights and files, the text
# cache (prompts), the pipeline settings; and the weight-bound files of WEIGHT_BOUND_FILES the
# release has (fitted on the networks' outputs or features: they travel with them).
IDENTITY_FIELDS = ("models", "text_cache", "classifier", "zeroshot")
WEIGHT_BOUND_FILES = (OPERATING_POINTS_FILE, GATE_FILE, MONITORING_BASELINE_FILE)
IDENTITY_PARAMETER = "repository_sha256"  # the pipeline parameters' copy of the release's identity


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def repository_identity(manifest_fields: Mapping[str, Any], files: Mapping[str, str] | str | None = None) -> str:
    """A release's identity (``repository_sha256``): one hash over what the served answers depend on:
    IDENTITY_FIELDS of its manifest and the SHA-256 of each weight-bound file (``files``: {file name:
    sha256}, see weight_bound_files; a plain string is the operating points' SHA-256). Every answer
    carries it: e.g. the DICOM node derives its SR UIDs from it."""
    if isinstance(files, str):
        files = {OPERATING_POINTS_FILE: files}
    covered = {field: manifest_fields[field] for field in IDENTITY_FIELDS}
    for name, sha256 in sorted((files or {}).items()):
        covered[f"{Path(name).stem}_sha256"] = sha256  # operating_points.json -> operating_points_sha256
    return sha256_json(covered)


def weight_bound_files(directory: Path | str) -> dict[str, str]:
    """{file name: sha256} of the WEIGHT_BOUND_FILES in a release's directory."""
    directory = Path(directory)
    return {name: file_sha256(directory / name) for name in WEIGHT_BOUND_FILES if (directory / name).is_file()}


def update_release(repository: Path | str, release: int | None = None,
                   parameters: Mapping[str, Mapping[str, str]] | None = None,
                   fields: Mapping[str, Any] | None = None) -> str:
    """Record `parameters` ({pipeline model: {key: value}}) and manifest `fields` in a release (default:
    the live one), mirror the parameters into the configs when it is live, and return its refreshed
    identity (also written into its parameters)."""
    from cxrlt.contract.model_config import set_config_parameters

    repository = Path(repository)
    number = release_number(repository, release)
    record = read_release(repository, number)
    record.update(json.loads(json.dumps(dict(fields or {}), default=float)))
    identity = repository_identity(record, weight_bound_files(release_dir(repository, number)))
    record[IDENTITY_PARAMETER] = identity
    stored = record.setdefault("parameters", {})
    for model in PIPELINE_MODELS:
        stored.setdefault(model, {}).update({**(parameters or {}).get(model, {}), IDENTITY_PARAMETER: identity})
    write_release(repository, number, record)
    live = number == live_release(repository)
    for model in PIPELINE_MODELS:
        # every release's own parameters ride in the configs, so a client knows what any answer's release decides at
        own = {f"{CANDIDATE_PARAMETERS}{number}": json.dumps(stored[model], sort_keys=True, separators=(",", ":"))}
        set_config_parameters(repository / model / "config.pbtxt", {**(stored[model] if live else {}), **own})
    return identity
