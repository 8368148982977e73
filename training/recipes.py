"""Training recipes: one YAML file per trained network, read into a validated `Recipe`.

A recipe names what it trains and how; the data (`--data CSV`) and the output folder
(`--out DIR`) come from the command line, so one recipe serves every data set. Keys:

    extends       optional: a recipe file (relative to this one) whose keys this one starts
                  from; a key set here replaces the base's whole (no deep merge, so a recipe
                  that names `loss: {name: db, ...}` gets no stray ASL parameters). The
                  checked-in recipes extend `_shared.yaml`; files named `_*.yaml` are bases,
                  not recipes
    name          a label for logs (default: the file's stem)
    task          multilabel (30 Task 1 findings) | projection (the router) | clip (dual branch)
    profile       tiny | paper (cxrlt.contract.profiles): network sizes and the image size
    model         the checkpoint name = the served model name (projection_router,
                  ensemble_<projection>_<member>, clip); `cxrlt build-repo --checkpoints OUT`
                  reads OUT/<model>.pt. Head ablations use a name no served model has.
    model_kwargs  optional: training-time arguments of the network that do not change its
                  weights' shapes (e.g. CaiT's layer-scale init_values, drop_path_rate); the
                  trainer checks the checkpoint still loads into the served spec
    arch, head    optional: train another architecture than the profile's spec of `model`
                  (e.g. convnextv2_csra with head {lam: 0.1}); the ConvNeXt-V2 backbone is the
                  profile's PCAM member's
    projection    frontal | lateral | all: which images train and validate it
    pcam_checkpoint  CaiT only: the PCAM checkpoint whose ConvNeXt-V2 backbone is loaded
                  and frozen (a relative path is looked up in the output folder, then the
                  working directory)
    init_weights  optional: a local file of pretrained weights to start from, as the papers do
                  (nothing is downloaded): the timm variant's ImageNet weights for the router,
                  PCAM / CSRA / MLP (their ConvNeXt-V2) and SwinV2 (timm drops the 1000-class
                  classifier); an open_clip state_dict (e.g. CheXzero's) for task clip. Not for
                  CaiT members, whose backbone is the frozen PCAM one
    loss          {name: asl|db|bce|ce, ...parameters of training.losses.create_loss}
    sampler       {name: repeat_factor, threshold, max_repeat} | {name: none}
    optimizer     {name: adamw, lr, weight_decay, betas}
    schedule      {warmup_epochs, min_lr_ratio}: linear warm-up then cosine, per step
    ema           {decay, warmup}: EMA of the weights (saved as ema_state_dict, served)
    epochs, batch_size, grad_clip (max global norm; 0 = off)
                  batch_size is the images of one optimiser step over all processes together
    accumulate_steps  gradient accumulation: each optimiser step is this many forward/backward
                  passes per process (default 1), so a machine with fewer GPUs or less memory
                  reaches the same batch_size (training.distributed)
    augment       training.data.Augment parameters ({} = the paper's: its defaults)
    profile_overrides  optional: {profile: {key: value, ...}} merged over the recipe when it
                  trains that profile, below what the command line sets (e.g. the tiny
                  profile's synthetic data keeps only the flip of the paper's augmentation)
    precision     auto (bf16 on a GPU that has it, else fp16; fp32 on CPU) | fp32 | bf16 | fp16
    tta           validation views, as served (cxrlt.contract.preprocessing.TTA_VIEWS)
    val_fraction, split_seed   the patient-level split (training.data.patient_split)
    seed, threads (torch CPU threads; null = torch's default), num_workers, cache_images
    clip          task clip only: {asl_weight, holdout: [classes], val_zeroshot: bool}
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn

import yaml

from cxrlt.contract.labels import PROJECTIONS, TASK1_LABELS
from cxrlt.contract.preprocessing import parse_tta_views
from cxrlt.contract.profiles import PROFILES, NetworkSpec, Profile, get_profile
from cxrlt.contract.resources import package_file
from cxrlt.contract.served import ROUTER_MODEL

CONFIG_DIR = package_file("training", "configs")
TASKS = ("multilabel", "projection", "clip")
PROJECTION_FILTERS = (*PROJECTIONS, "all")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SAMPLERS = ("none", "repeat_factor")
LOSSES_MULTILABEL = ("asl", "db", "bce")
CLIP_MODEL = "clip"

_DEFAULTS: dict[str, Any] = {
    "name": None,
    "task": "multilabel",
    "profile": "tiny",
    "model": None,
    "arch": None,
    "head": {},
    "model_kwargs": {},
    "projection": "all",
    "pcam_checkpoint": None,
    "init_weights": None,
    "loss": {"name": "asl"},
    "sampler": {"name": "none"},
    "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
    "schedule": {"warmup_epochs": 1, "min_lr_ratio": 0.01},
    "ema": {"decay": 0.999, "warmup": True},
    "epochs": 10,
    "batch_size": 32,
    "accumulate_steps": 1,
    "grad_clip": 1.0,
    "augment": {},
    "precision": "auto",
    "tta": ["identity", "hflip"],
    "val_fraction": 0.1,
    "split_seed": 0,
    "seed": 0,
    "threads": None,
    "num_workers": 0,
    "cache_images": False,
    "clip": {},
}
_CLIP_DEFAULTS = {"asl_weight": 1.5, "holdout": [], "val_zeroshot": True}


class RecipeError(ValueError):
    """A recipe file is malformed; the message names the file and the key."""


@dataclasses.dataclass
class Recipe:
    name: str
    task: str
    profile: str
    model: str
    arch: str | None
    head: dict
    model_kwargs: dict
    projection: str
    pcam_checkpoint: str | None
    init_weights: str | None
    loss: dict
    sampler: dict
    optimizer: dict
    schedule: dict
    ema: dict
    epochs: int
    batch_size: int
    accumulate_steps: int
    grad_clip: float
    augment: dict
    precision: str
    tta: list
    val_fraction: float
    split_seed: int
    seed: int
    threads: int | None
    num_workers: int
    cache_images: bool
    clip: dict
    source: str | None = None  # the YAML file it came from

    # ------------------------------------------------------------------ derived

    @property
    def profile_spec(self) -> Profile:
        return get_profile(self.profile)

    @property
    def image_size(self) -> int:
        profile = self.profile_spec
        return profile.clip.image_size if self.task == "clip" else profile.image_size

    @property
    def num_outputs(self) -> int:
        return len(PROJECTIONS) if self.task == "projection" else len(TASK1_LABELS)

    def network_spec(self) -> NetworkSpec:
        """The architecture to build: the profile's spec of `model`, or `arch` + `head` on the
        profile's ConvNeXt-V2 backbone."""
        profile = self.profile_spec
        if self.arch is None:
            spec = profile.network_specs()[self.model]
            return NetworkSpec(spec.arch, {**spec.kwargs, **self.model_kwargs})
        backbone = profile.members["pcam"].kwargs["backbone"]
        return NetworkSpec(self.arch, {"backbone": backbone, **self.head, **self.model_kwargs})

    def served_spec(self) -> NetworkSpec | None:
        """The spec `cxrlt build-repo` rebuilds this checkpoint with (None: not served)."""
        specs = self.profile_spec.network_specs()
        return specs.get(self.model) if self.arch is None else None

    def checkpoint_name(self) -> str:
        return self.model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # deep copies of the values


def _merge(base: dict, override: Mapping) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_override(data: dict, assignment: str) -> None:
    """Apply 'a.b=value' (value parsed as YAML) to a nested dict, in place."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {assignment!r} must look like key=value or section.key=value")
    parts = key.strip().split(".")
    target = data
    for part in parts[:-1]:
        if not isinstance(target.get(part), dict):
            target[part] = {}
        target = target[part]
    value = yaml.safe_load(raw)
    if isinstance(value, str):  # YAML 1.1 reads '1e-4' as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    target[parts[-1]] = value


def resolve_config_path(path: str | Path) -> Path:
    """A recipe path as given, else the name of a checked-in recipe ('frontal_pcam[.yaml]')."""
    path = Path(path)
    for candidate in (path, CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise RecipeError(
        f"recipe {str(path)!r} not found; give a YAML path or one of: {', '.join(sorted(list_recipes()))}"
    )


def list_recipes() -> dict[str, Path]:
    """The checked-in recipes by name (bases, `_*.yaml`, are not recipes)."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml")) if not p.name.startswith("_")}


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of keys, not {type(data).__name__}")
    return data


def _read_extended(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A recipe file's keys over those of the file it `extends` (recursively); top-level keys
    replace the base's whole."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise RecipeError(f"recipe {path} extends itself: {chain}")
    data = _read_yaml(path)
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise RecipeError(f"{path}: extends must be a file name, not {base_name!r}")
    base_path = path.parent / base_name
    if not base_path.is_file():
        raise RecipeError(f"{path}: extends {base_name!r}, but {base_path} does not exist")
    return {**_read_extended(base_path, (*seen, path)), **data}


def load_recipe(path: str | Path, overrides: Mapping[str, Any] | None = None,
                assignments: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read and validate a recipe YAML; `overrides` (nested dict) and `assignments`
    ('key.sub=value') are applied on top."""
    path = resolve_config_path(path)
    data = _read_extended(path)
    explicit: dict = _merge({}, overrides or {})  # what the caller sets wins over the file
    for assignment in assignments:
        set_override(explicit, assignment)
    data = _with_profile_overrides(data, explicit, str(path))
    return recipe_from_dict(data, source=str(path), default_name=path.stem)


def _with_profile_overrides(data: dict, explicit: Mapping, where: str) -> dict:
    """The recipe with its `profile_overrides` for the profile it trains merged in, then
    `explicit` on top; the profile is the one `explicit` or the recipe names."""
    by_profile = data.get("profile_overrides") or {}
    if not isinstance(by_profile, dict) or not all(isinstance(v, dict) for v in by_profile.values()):
        raise RecipeError(f"{where}: profile_overrides must map a profile name to a mapping of recipe keys")
    unknown = sorted(set(by_profile) - set(PROFILES))
    if unknown:
        raise RecipeError(f"{where}: profile_overrides names unknown profile(s) {unknown}; profiles: {sorted(PROFILES)}")
    base = {k: v for k, v in data.items() if k != "profile_overrides"}
    profile = explicit.get("profile", base.get("profile", _DEFAULTS["profile"]))
    return _merge(_merge(base, by_profile.get(profile, {})), explicit)


def recipe_from_dict(data: Mapping[str, Any], source: str | None = None, default_name: str = "recipe") -> Recipe:
    where = source or "recipe"
    if "profile_overrides" in data:
        data = _with_profile_overrides(dict(data), {}, where)
    unknown = sorted(set(data) - set(_DEFAULTS))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(_DEFAULTS)}")
    merged = _merge(_DEFAULTS, data)
    merged["name"] = merged["name"] or default_name

    def fail(key: str, message: str) -> NoReturn:
        raise RecipeError(f"{where}: {key}: {message}")

    _check_model(merged, fail)
    _check_optimisation(merged, fail)
    _check_validation(merged, fail)
    merged["epochs"], merged["batch_size"] = int(merged["epochs"]), int(merged["batch_size"])
    merged["accumulate_steps"] = int(merged["accumulate_steps"])
    merged["grad_clip"] = float(merged["grad_clip"] or 0.0)
    merged["val_fraction"] = float(merged["val_fraction"])
    return Recipe(**merged, source=source)


def _check_model(merged: dict[str, Any], fail: Callable[[str, str], NoReturn]) -> None:
    """Task, profile, projection and the model it writes (a served network, CLIP or an ablation)."""
    if merged["task"] not in TASKS:
        fail("task", f"must be one of {TASKS}, not {merged['task']!r}")
    try:
        profile = get_profile(merged["profile"])
    except ValueError as exc:
        fail("profile", str(exc))
    if merged["projection"] not in PROJECTION_FILTERS:
        fail("projection", f"must be one of {PROJECTION_FILTERS}, not {merged['projection']!r}")
    task = merged["task"]
    if merged["model"] is None:
        merged["model"] = {"projection": ROUTER_MODEL, "clip": CLIP_MODEL}.get(task)
        if merged["model"] is None:
            fail("model", "is required: the served model name, e.g. ensemble_frontal_pcam")
    model = merged["model"]
    specs = profile.network_specs()
    if task == "clip":
        if not str(model).startswith(CLIP_MODEL):
            fail("model", f"a clip recipe writes {CLIP_MODEL!r} (clip.pt), not {model!r}")
        merged["clip"] = _merge(_CLIP_DEFAULTS, merged["clip"] or {})
        unknown_holdout = [c for c in merged["clip"]["holdout"] if c not in TASK1_LABELS]
        if unknown_holdout:
            fail("clip.holdout", f"unknown Task 1 classes {unknown_holdout}")
    elif merged["arch"] is None:
        if model not in specs:
            fail("model", f"{model!r} is not a served network of profile {profile.name!r}; choose from "
                          f"{sorted(specs)} or give `arch` for an ablation")
        expected_task = "projection" if model == ROUTER_MODEL else "multilabel"
        if task != expected_task:
            fail("task", f"{model} is trained with task {expected_task!r}, not {task!r}")
    else:
        from networks.factory import list_architectures

        if merged["arch"] not in list_architectures():
            fail("arch", f"unknown architecture {merged['arch']!r}; registered: {list_architectures()}")
        if model in specs:
            fail("model", f"an `arch` ablation must not overwrite the served network {model!r}; name it differently")
    if task == "multilabel" and model in specs and model != ROUTER_MODEL:
        served_projection = model.split("_")[1]
        if merged["projection"] != served_projection:
            fail("projection", f"{model} serves {served_projection} images; set projection: {served_projection}")
    is_cait = merged["arch"] is None and task == "multilabel" and model in specs and specs[model].arch == "cait_on_convnextv2"
    if is_cait and not merged["pcam_checkpoint"]:
        fail("pcam_checkpoint", "a CaiT member needs the PCAM checkpoint whose backbone it freezes")
    if merged["pcam_checkpoint"] and not is_cait:
        fail("pcam_checkpoint", "only CaiT members (cait_on_convnextv2) load a frozen PCAM backbone")
    if merged["init_weights"] and is_cait:
        fail("init_weights", "a CaiT member starts from the frozen PCAM backbone (pcam_checkpoint); "
                             "give init_weights to the PCAM recipe instead")


def _check_optimisation(merged: dict[str, Any], fail: Callable[[str, str], NoReturn]) -> None:
    """Loss, sampler, optimiser, schedule, EMA, epochs and precision."""
    task = merged["task"]
    loss = merged["loss"]
    if not isinstance(loss, dict) or "name" not in loss:
        fail("loss", "must be a mapping with a 'name'")
    allowed = {"projection": ("ce",), "clip": ("asl",)}.get(task, LOSSES_MULTILABEL)
    if loss["name"] not in allowed:
        fail("loss.name", f"task {task} takes one of {allowed}, not {loss['name']!r}")
    sampler = merged["sampler"] = merged["sampler"] or {"name": "none"}
    if sampler.get("name", "none") not in SAMPLERS:
        fail("sampler.name", f"must be one of {SAMPLERS}, not {sampler.get('name')!r}")
    if merged["optimizer"].get("name", "adamw") != "adamw":
        fail("optimizer.name", "only adamw is supported")
    numbers = {"optimizer": ("lr", "weight_decay", "eps"), "schedule": ("warmup_epochs", "min_lr_ratio"),
               "ema": ("decay",), "sampler": ("threshold", "max_repeat")}
    for section, keys in numbers.items():
        for key in keys:
            if key in merged[section]:
                try:
                    merged[section][key] = float(merged[section][key])
                except (TypeError, ValueError):
                    fail(f"{section}.{key}", f"must be a number, not {merged[section][key]!r}")
    for key in ("lr", "weight_decay"):
        if merged["optimizer"].get(key, -1.0) < 0:
            fail(f"optimizer.{key}", "must be given and non-negative")
    if not 0.0 <= merged["ema"].get("decay", 0.0) < 1.0:
        fail("ema.decay", "must be in [0, 1)")
    if int(merged["epochs"]) < 1 or int(merged["batch_size"]) < 1:
        fail("epochs/batch_size", "must be positive integers")
    if int(merged["accumulate_steps"]) < 1:
        fail("accumulate_steps", "must be a positive integer (1 = no accumulation)")
    if merged["precision"] not in PRECISIONS:
        fail("precision", f"must be one of {PRECISIONS}")


def _check_validation(merged: dict[str, Any], fail: Callable[[str, str], NoReturn]) -> None:
    """Test-time augmentation, the validation split and the training augmentation."""
    try:
        merged["tta"] = list(parse_tta_views(merged["tta"]))
    except ValueError as exc:
        fail("tta", str(exc))
    if merged["task"] in ("projection", "clip") and merged["tta"] != ["identity"]:
        fail("tta", "the served router and CLIP encoder see the untransformed image only; set tta: [identity]")
    if not 0.0 < float(merged["val_fraction"]) < 1.0:
        fail("val_fraction", "must be in (0, 1)")
    from training.data import Augment

    try:
        Augment(**merged["augment"])
    except TypeError as exc:
        fail("augment", f"{exc}; keys are {[f.name for f in dataclasses.fields(Augment)]}")
