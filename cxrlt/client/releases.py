"""Changing which release a server answers with (`cxrlt release`): shadow, canary, promote, rollback,
prune, and the report of a shadow run.

A plan (cxrlt.contract.releases.ReleasePlan) lives in the three pipeline configs' parameters. On a
running server (`url`) a switch reloads each pipeline model with its served config plus the new
plan (Triton's model repository API, explicit model-control mode): the old instance answers until
the new one is ready, so no request fails and each sees one release. In a repository (`repository`)
the configs are rewritten, which is what a server loads at its next start. The repository is read
either way: the switch checks that the release exists there and gives each config the release's own
parameters (operating points, gate threshold, identity), so a client reading a served config learns
what every release it may answer with decides at.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping

from cxrlt.contract.releases import (CANDIDATE_PARAMETERS, ReleasePlan, read_release, release_dir, release_numbers, release_parameters,
                                     version_dir)
from cxrlt.contract.served import ENCODER_MODEL, PIPELINE_MODELS, network_names

ADMIN_METADATA = "triton-grpc-protocol-admin-key"  # Triton's gRPC header for a restricted protocol's key
NETWORK_MODELS = (*network_names(), ENCODER_MODEL)


class ReleaseError(RuntimeError):
    """A release switch that cannot be made; the message says why and what to do."""


@dataclasses.dataclass
class Switch:
    """What a switch did: the plan before and after, and how long the server took to answer with it."""

    before: ReleasePlan
    after: ReleasePlan
    seconds: float
    applied_to: tuple[str, ...]  # "server <url>", "repository <path>"


class ReleaseControl:
    """The releases of one repository, and the plan of the server that serves it (when `url` is given)."""

    def __init__(self, repository: Path | str, url: str | None = None, admin_key: str | None = None,
                 timeout_s: float = 120.0, save: bool | None = None) -> None:
        self.repository = Path(repository)
        if not release_numbers(self.repository):
            raise ReleaseError(f"{self.repository} holds no releases; build one with `cxrlt build-repo --out {self.repository}`")
        self.url, self.timeout_s = url, timeout_s
        self.save = url is None if save is None else save  # a server's switch stays in memory unless asked to save
        self.headers = {ADMIN_METADATA: admin_key} if admin_key else {}
        self._client: Any = None

    # --- reading ------------------------------------------------------------------

    def client(self) -> Any:
        if self._client is None:
            import tritonclient.grpc as grpcclient

            self._client = grpcclient.InferenceServerClient(self.url)
        return self._client

    def configs(self) -> dict[str, dict[str, Any]]:
        """The pipeline models' configs (JSON form): the server's when there is one, else the repository's."""
        if self.url:
            try:
                return {m: self.client().get_model_config(m, as_json=True, client_timeout=self.timeout_s)["config"]
                        for m in PIPELINE_MODELS}
            except Exception as exc:  # noqa: BLE001 - any failure of the server's API
                raise ReleaseError(f"could not read the pipeline configs from {self.url}: {exc}") from None
        from cxrlt.contract.model_config import config_parameters

        return {m: {"parameters": {k: {"string_value": v} for k, v in config_parameters(self.repository / m / "config.pbtxt").items()}}
                for m in PIPELINE_MODELS}

    def plan(self) -> ReleasePlan:
        plans = {_plan_of(config) for config in self.configs().values()}
        if len(plans) != 1:
            raise ReleaseError(f"the pipeline models serve different plans ({', '.join(p.describe() for p in plans)}); "
                               "set one with `cxrlt release promote N`")
        return plans.pop()

    def releases(self) -> list[dict[str, Any]]:
        """Each release the repository holds: its number, identity, weights and where it stands in the plan."""
        plan = self.plan()
        rows = []
        for number in release_numbers(self.repository):
            record = read_release(self.repository, number)
            role = ("live" if number == plan.live else plan.mode if number == plan.candidate else
                    "previous" if number == plan.previous else "")
            rows.append({"release": number, "role": role, "sha256": record.get("repository_sha256", ""),
                         "random_weights": bool(record.get("random_weights")), "seed": record.get("seed"),
                         "checkpoints": record.get("checkpoints"), "operating_points": "operating_points" in record,
                         "ood_gate": "ood_gate" in record})
        return rows

    # --- switching ----------------------------------------------------------------

    def shadow(self, release: int, fraction: float) -> Switch:
        plan = self.plan()
        return self.apply(ReleasePlan(plan.live, release, "shadow", fraction, plan.previous))

    def canary(self, release: int, percent: float) -> Switch:
        plan = self.plan()
        return self.apply(ReleasePlan(plan.live, release, "canary", percent / 100.0, plan.previous))

    def promote(self, release: int) -> Switch:
        plan = self.plan()
        if release == plan.live:
            raise ReleaseError(f"release {release} is already live")
        return self.apply(ReleasePlan(release, previous=plan.live))

    def rollback(self) -> Switch:
        """Back to the release that was live before the last promotion (and no candidate)."""
        plan = self.plan()
        if plan.previous is None:
            raise ReleaseError("there is no earlier live release to roll back to (no promotion was made with this plan); "
                               "promote one by number instead")
        return self.apply(ReleasePlan(plan.previous, previous=plan.live))

    def apply(self, plan: ReleasePlan) -> Switch:
        before = self.plan()
        for number in plan.releases:
            read_release(self.repository, number)  # exists, or says how to build it
        started = time.monotonic()
        applied = []
        if self.url:
            self._load_networks(plan)

            def reload(model: str, config: dict[str, Any]) -> None:
                params = config.setdefault("parameters", {})
                params.update({k: {"string_value": v} for k, v in self._parameters(model, plan, switched=True).items()})
                self._call(f"reload {model}", lambda: self.client().load_model(model, config=json.dumps(config), headers=self.headers,
                                                                                 client_timeout=self.timeout_s))

            # Side by side: Triton's Python backend sleeps 1 s per instance as it unloads one, so models
            # reloaded in turn would add those seconds up (and leave the models on different plans longer).
            configs = self.configs()
            with ThreadPoolExecutor(len(configs)) as reloads:
                list(reloads.map(reload, configs, configs.values()))
            applied.append(f"server {self.url}")
        seconds = time.monotonic() - started
        if self.save:
            from cxrlt.contract.model_config import set_config_parameters

            for model in PIPELINE_MODELS:
                set_config_parameters(self.repository / model / "config.pbtxt", self._parameters(model, plan, switched=False))
            applied.append(f"repository {self.repository}")
        return Switch(before, plan, seconds, tuple(applied))

    def _parameters(self, model: str, plan: ReleasePlan, switched: bool) -> dict[str, str]:
        """A pipeline config's parameters for `plan`: the plan, the live release's own parameters, and
        every held release's as JSON (a release pinned by CXRLT_RELEASE may answer without a switch)."""
        params = {**plan.to_parameters(switched), **release_parameters(read_release(self.repository, plan.live), model)}
        for number in release_numbers(self.repository):
            own = release_parameters(read_release(self.repository, number), model)
            params[f"{CANDIDATE_PARAMETERS}{number}"] = json.dumps(own, sort_keys=True, separators=(",", ":"))
        return params

    def _load_networks(self, plan: ReleasePlan) -> None:
        """Have every network serve each release of the plan (a version added since the server started
        loads when its model is loaded again; the versions already served keep answering)."""
        for model in NETWORK_MODELS:
            missing = [n for n in plan.releases if not self._ready(model, n)]
            if not missing:
                continue
            self._call(f"load {model}", lambda: self.client().load_model(model, headers=self.headers, client_timeout=self.timeout_s))
            still = [n for n in missing if not self._ready(model, n)]
            if still:
                raise ReleaseError(f"{self.url} does not serve {model} version(s) {still} after loading it; is the server "
                                   f"serving {self.repository}, and does {model}/<N>/ exist there?")

    def _ready(self, model: str, version: int) -> bool:
        try:
            return bool(self.client().is_model_ready(model, str(version), headers=self.headers, client_timeout=self.timeout_s))
        except Exception:  # noqa: BLE001 - unknown model or version: not ready
            return False

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - the server's reason, with what we tried
            message = getattr(exc, "message", lambda: str(exc))()
            hint = (" (the model repository API is restricted: pass --admin-key-file)" if "restricted" in str(message).lower() or
                    "permission" in str(message).lower() else
                    " (is the server in explicit model-control mode, `--model-control-mode=explicit`?)"
                    if "explicit" in str(message).lower() or "polling" in str(message).lower() else "")
            raise ReleaseError(f"{what} on {self.url}: {message}{hint}") from None

    # --- storage ------------------------------------------------------------------

    def prune(self, keep: int) -> list[int]:
        """Remove all but the `keep` newest releases; never the live one, a candidate or the previous live
        release (rollback's target). Returns the releases removed."""
        if keep < 1:
            raise ReleaseError("--keep must be at least 1")
        plan = self.plan()
        repository_plan = ReleaseControl(self.repository).plan() if self.url else plan
        protected = {*plan.releases, *repository_plan.releases, *(p for p in (plan.previous, repository_plan.previous) if p)}
        held = release_numbers(self.repository)
        removable = [n for n in held[: max(len(held) - keep, 0)] if n not in protected]
        for number in removable:
            for model in NETWORK_MODELS:
                shutil.rmtree(version_dir(self.repository, model, number), ignore_errors=True)
            shutil.rmtree(release_dir(self.repository, number))
        if self.url and removable:
            for model in NETWORK_MODELS:  # the removed versions unload; the others keep answering
                self._call(f"reload {model}", lambda: self.client().load_model(model, headers=self.headers,
                                                                                 client_timeout=self.timeout_s))
        return removable

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _plan_of(config: Mapping[str, Any]) -> ReleasePlan:
    """The plan a config serves; CXRLT_RELEASE in this process's environment pins it as it pins the
    server's (run inside the server's pod or container, the command sees the same variable)."""
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    return ReleasePlan.from_parameters(params)
