"""Releases: several sets of weights side by side in one model repository, and which one answers.

A release N is everything that belongs to one set of weights, identified by one hash:
- the networks: Triton version directory ``N/`` of the router, the six members and the CLIP
  encoder (their configs load every version: ``version_policy: { all { } }``);
- its weight-bound files in ``cxr_findings/releases/N/``: the text cache and prompts, the
  operating points, the out-of-distribution gate, the monitoring baseline and ``release.json``
  (what it was built from, its pipeline parameters, its ``release_sha256``).

Triton loads only numeric subdirectories of a model directory and refuses any root directory
that is not a model, so the weight-bound files live in a non-numeric subdirectory of a model.

Which release answers is the pipeline configs' *plan* (parameters ``release``, ``release_candidate``,
``release_mode``, ``release_share``, ``release_previous``): the live release answers; a candidate
runs in ``shadow`` beside it on a share of the requests (never changing an answer), or answers as
a ``canary`` for a share of studies, sticky by the study (STUDY_KEY). ``cxrlt release`` changes the
plan by reloading the pipeline models with a new config: each request sees one release.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from cxrlt.contract.served import FINDINGS_MODEL

RELEASES_DIR = "releases"
RELEASE_RECORD = "release.json"
MODES = ("shadow", "canary")
# The Deployment pins the live release through this variable (a ConfigMap value); a plan changed at
# run time (`cxrlt release --url`, parameter release_switched) takes precedence over it.
RELEASE_ENV = "CXRLT_RELEASE"
SWITCHED = "release_switched"
# A pipeline config's copy of each release's own parameters (+ its number; compact JSON), so a client
# reading the served config knows what any release it may be answered by decides at.
CANDIDATE_PARAMETERS = "release_parameters_"


def release_dir(repository: Path | str, number: int) -> Path:
    """Where release `number`'s weight-bound files live."""
    return Path(repository) / FINDINGS_MODEL / RELEASES_DIR / str(int(number))


def version_dir(repository: Path | str, model: str, number: int) -> Path:
    """A network's Triton version directory for release `number`."""
    return Path(repository) / model / str(int(number))


def release_numbers(repository: Path | str) -> list[int]:
    """The releases a repository holds, ascending."""
    home = Path(repository) / FINDINGS_MODEL / RELEASES_DIR
    if not home.is_dir():
        return []
    return sorted(int(p.name) for p in home.iterdir() if p.name.isdigit() and (p / RELEASE_RECORD).is_file())


def read_release(repository: Path | str, number: int) -> dict[str, Any]:
    path = release_dir(repository, number) / RELEASE_RECORD
    if not path.is_file():
        held = release_numbers(repository)
        raise FileNotFoundError(f"{repository} has no release {number} (it holds {held or 'none'}); "
                                f"build it with `cxrlt build-repo --out {repository} --release {number}`")
    return json.loads(path.read_text())


def write_release(repository: Path | str, number: int, record: Mapping[str, Any]) -> None:
    path = release_dir(repository, number) / RELEASE_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def release_parameters(record: Mapping[str, Any], model: str) -> dict[str, str]:
    """The pipeline parameters release `record` sets for `model` (its tuned weights, operating points,
    gate threshold, identity): laid over the config's when that model serves the release."""
    return dict(record.get("parameters", {}).get(model, {}))


def study_key(study_instance_uid: str) -> str:
    """What a client sends as STUDY_KEY: the SHA-256 (hex) of the StudyInstanceUID, the same for every
    image of a study and no identifier (the server never sees the UID)."""
    return hashlib.sha256(str(study_instance_uid).encode("utf-8")).hexdigest()


def sticky_share(key: str) -> float:
    """A value in [0, 1) fixed by `key` (a STUDY_KEY): the same study always draws the same."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


@dataclasses.dataclass(frozen=True)
class ReleasePlan:
    live: int
    candidate: int | None = None
    mode: str | None = None  # "shadow" or "canary" while there is a candidate
    share: float = 0.0  # shadow: the fraction of requests also run on the candidate; canary: of studies it answers
    previous: int | None = None  # the release before the last promotion (what rollback returns to)

    def __post_init__(self) -> None:
        if self.live < 1:
            raise ValueError(f"release numbers start at 1, not {self.live}")
        if (self.candidate is None) != (self.mode is None):
            raise ValueError("a candidate release needs a mode (shadow or canary), and a mode needs a candidate")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"release_mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.candidate is not None and self.candidate == self.live:
            raise ValueError(f"release {self.live} is already live; a candidate must be another release")
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"the share of a candidate is a fraction in [0, 1], not {self.share}")

    @property
    def releases(self) -> tuple[int, ...]:
        """Every release this plan runs (the live one first)."""
        return (self.live,) if self.candidate is None else (self.live, self.candidate)

    def route(self, study_uid: str | None, draw: float) -> tuple[int, int | None]:
        """(the release that answers, the release that runs in shadow or None) for one request.

        Canary studies are chosen by their STUDY_KEY, so a study never mixes releases; a
        request without one, and every shadow choice, uses `draw` (uniform in [0, 1))."""
        if self.candidate is None or self.share <= 0.0:
            return self.live, None
        if self.mode == "canary":
            chosen = (sticky_share(study_uid) if study_uid else draw) < self.share
            return (self.candidate if chosen else self.live), None
        return self.live, (self.candidate if draw < self.share else None)

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], environ: Mapping[str, str] | None = None) -> "ReleasePlan":
        """The plan in a pipeline config's parameters. `CXRLT_RELEASE` (when set) pins the live release
        of a config no switch has changed at run time; a repository from before releases serves 1."""
        environ = os.environ if environ is None else environ
        switched = params.get(SWITCHED, "").strip().lower() == "true"
        pinned = environ.get(RELEASE_ENV, "").strip()
        live = pinned if pinned and not switched else params.get("release", "1")
        candidate = params.get("release_candidate", "").strip()
        mode = params.get("release_mode", "").strip().lower()
        previous = params.get("release_previous", "").strip()
        try:
            return cls(int(live), int(candidate) if candidate else None, mode or None,
                       float(params.get("release_share", "0") or 0), int(previous) if previous else None)
        except ValueError as exc:
            raise ValueError(f"the release plan of this config is not valid ({exc}); "
                             f"set it with `cxrlt release`") from None

    def to_parameters(self, switched: bool = False) -> dict[str, str]:
        return {"release": str(self.live), "release_candidate": "" if self.candidate is None else str(self.candidate),
                "release_mode": self.mode or "", "release_share": repr(float(self.share)),
                "release_previous": "" if self.previous is None else str(self.previous),
                SWITCHED: "true" if switched else "false"}

    def describe(self) -> str:
        text = f"release {self.live} live"
        if self.candidate is not None:
            what = "of requests also run on" if self.mode == "shadow" else "of studies answered by"
            text += f", {self.share:.0%} {what} release {self.candidate} ({self.mode})"
        return text


def live_release(repository: Path | str) -> int:
    """The release the repository's pipeline configs serve (their plan's `release`)."""
    from cxrlt.contract.model_config import config_parameters

    config = Path(repository) / FINDINGS_MODEL / "config.pbtxt"
    return ReleasePlan.from_parameters(config_parameters(config), environ={}).live if config.is_file() else 1


def release_number(repository: Path | str, release: int | None = None) -> int:
    """`release`, or the live release's number when None."""
    return live_release(repository) if release is None else int(release)


def files_of(repository: Path | str, release: int | None = None) -> Path:
    """The directory of a release's weight-bound files (default: the live release's)."""
    return release_dir(repository, release_number(repository, release))


def served_parameters(repository: Path | str, model: str, release: int | None = None) -> dict[str, str]:
    """What pipeline `model` runs release `release` (default: the live one) with: its config's
    parameters under the release's own (python_backends.pipeline lays them the same way)."""
    from cxrlt.contract.model_config import config_parameters

    params = config_parameters(Path(repository) / model / "config.pbtxt")
    number = ReleasePlan.from_parameters(params, environ={}).live if release is None else release
    return {**params, **release_parameters(read_release(repository, number), model)}


def release_text_cache(repository: Path | str, release: int, expected_classes: Sequence[str]) -> Any:
    """Release `release`'s text cache, checked against its CLIP image encoder."""
    from cxrlt.contract.served import ENCODER_MODEL
    from cxrlt.contract.text_cache import ENCODER_RECORD, load_text_cache

    return load_text_cache(release_dir(repository, release), expected_classes,
                           version_dir(repository, ENCODER_MODEL, release) / ENCODER_RECORD, repository)
