"""`cxrlt build-repo`: checkpoints (or seeded random weights) -> a complete Triton model repository.

Writes, for every network, the ONNX file (parity-checked against PyTorch), its config and
labels; the CLIP image encoder and the cached text tensor; the three Python models; and
`manifest.json` (profile, weights, hashes, parameters, parity, package versions). The same
inputs always give the same repository, byte for byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from cxrlt.contract.labels import ALL_LABELS, TASK1_LABELS, TASK2_LABELS, label_file_text
from cxrlt.contract.manifest import MANIFEST, manifest_profile, read_manifest
from cxrlt.contract.ood_gate import ACTION_PARAMETER, DEFAULT_ACTION, THRESHOLD_PARAMETER
from cxrlt.contract.preprocessing import PreprocessConfig, preprocess
from cxrlt.contract.profiles import Profile, QueuePolicy, get_profile
from cxrlt.contract.releases import ReleasePlan, release_dir, release_numbers, version_dir, write_release
from cxrlt.contract.served import CLASSIFIER_MODEL, FINDINGS_MODEL, MODEL_DESCRIPTIONS, PIPELINE_MODELS, ZEROSHOT_MODEL
from cxrlt.contract.prompts import DEFAULT_PROMPTS, load_prompts
from cxrlt.contract.text_cache import ENCODER_RECORD, PROMPTS_FILE, save_text_cache, sha256_text
from networks.checkpoints import file_sha256, state_dict_sha256
from networks.clip import ImageTower, encode_prompt_ensembles, tokenizer_for
from networks.factory import count_parameters
from networks.weights import RANDOM_WEIGHTS_WARNING, load_clip, load_network
from python_backends.classifier import ROUTER_MODEL, ClassifierSettings
from python_backends.in_process import member_execution
from python_backends.tasks import CLASSIFIER_TASK, ZEROSHOT_TASK, task_parameters
from python_backends.zeroshot import ENCODER_MODEL, ZeroShotSettings

from exporters.execution_default import default_settings, next_setting
from exporters.model_configs import TEMPLATES, parameters_block, queue_policy_block, render
from exporters.onnx_export import check_parity, export_onnx
from exporters.precision import (PROVIDER_PRECISIONS, Execution, ParityData, ParityLimits, PrecisionRefused, check_execution,
                                 is_reference)
from exporters.releases import IDENTITY_PARAMETER, release_number, repository_identity, update_release
from exporters.torchscript_export import check_torchscript_parity, export_torchscript

log = logging.getLogger(__name__)

TARGETS = ("embedded", "ngc")
ENGINES = ("onnxruntime", "torchscript")
EXECUTION_PROVIDERS = tuple(PROVIDER_PRECISIONS)  # python_backends.onnx_runner.EXECUTION_PROVIDERS
_PACKAGES = ("torch", "timm", "open_clip_torch", "onnx", "onnxruntime", "openvino", "nncf", "nvidia-pytriton", "numpy")


@dataclasses.dataclass
class BuildOptions:
    profile: str = "tiny"
    target: str = "embedded"
    checkpoints: Path | None = None
    allow_random: bool = False
    seed: int = 0
    prompts: Path = DEFAULT_PROMPTS
    ort_threads: int = 1
    network_instances: int = 1
    bls_instances: int = 4  # in-flight images per BLS model: what lets member batchers merge
    max_batch_size: int = 16
    # 0: never wait for a batch that may not come; requests that queue while a model is busy still merge
    queue_delay_us: int = 0
    # "bls": the BLS models call the network models (per-member batching and statistics);
    # "in_process": they run the networks' ONNX files themselves (no hops; see python_backends.in_process)
    member_execution: str = "bls"
    # onnxruntime's providers on the embedded target: "auto" takes CUDA when onnxruntime-gpu offers
    # it, "cuda" insists (a model fails to load without it), "cpu" never uses a GPU
    # "openvino": the openvino package runs the ONNX files (python_backends.openvino_runner); on the
    # ngc target, Triton's openvino backend
    execution_provider: str = "auto"
    # fp32, bf16 (openvino) or int8 (NNCF post-training quantization): exporters.precision. None:
    # fp32 for a named provider; with "auto", this host's fastest setting that passes the parity
    # gate (exporters.execution_default), resolved here so the build sees a concrete one
    precision: str | None = None
    fallbacks: tuple[tuple[str, str], ...] = ()  # auto's slower settings, tried in turn when the gate refuses
    execution_choice: dict[str, Any] | None = None  # how auto chose (the manifest's execution record); None: as asked
    parity_data: ParityData | None = None  # validation (and calibration) images of the parity gate; None: built-in ones
    parity_limits: ParityLimits = dataclasses.field(default_factory=ParityLimits)
    tensorrt: bool = False
    clip_model: str | None = None  # an open_clip config name replacing the profile's (e.g. "ViT-L-14")
    engine: str = "onnxruntime"  # embedded target: "torchscript" also writes model.pt and runs it with PyTorch
    device: str = "auto"  # torchscript engine: auto (CUDA when PyTorch has it), cpu or cuda
    fp16: bool = False  # torchscript engine on CUDA: autocast to float16
    max_queue_size: int | None = None  # entry models' queue bound; None: the profile's
    queue_timeout_ms: int | None = None  # entry models' queue timeout; None: the profile's
    classifier: ClassifierSettings | None = None  # None: the profile's defaults
    ood_action: str = DEFAULT_ACTION  # above the fitted gate's threshold: "refuse" or "flag" (cxrlt.contract.ood_gate)
    zeroshot: ZeroShotSettings | None = None
    release: int = 1  # the Triton version directories (and releases/ entry) the weights go to

    def __post_init__(self) -> None:
        if self.release < 1:
            raise ValueError(f"release numbers start at 1, not {self.release}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, not {self.target!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {self.engine!r}")
        member_execution(self.member_execution)
        if self.ood_action not in ("refuse", "flag"):
            raise ValueError(f"ood_action must be refuse or flag, not {self.ood_action!r}")
        if self.precision is None and self.execution_provider == "auto":
            settings, self.execution_choice = default_settings(self.profile, self.target, self.engine)
            (self.execution_provider, self.precision), *slower = settings
            self.fallbacks = tuple(slower)
        self.precision = self.precision or "fp32"
        check_execution(self.execution_provider, self.precision, self.engine)
        if self.target == "ngc" and self.tensorrt and self.execution_provider == "openvino":
            raise ValueError("--tensorrt is a GPU accelerator of the onnxruntime backend; it does not combine with openvino")
        if self.member_execution == "in_process" and self.engine != "onnxruntime":
            raise ValueError("member_execution 'in_process' runs the ONNX files with onnxruntime; it does not combine with engine 'torchscript'")
        if self.engine != "onnxruntime" and self.target != "embedded":
            raise ValueError("engine 'torchscript' applies to the embedded target; the ngc target serves ONNX")
        for name in ("max_queue_size", "queue_timeout_ms"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")

    def queue_policy(self, profile: Profile) -> QueuePolicy:
        """The profile's queue bounds with this build's overrides."""
        overrides = {"max_queue_size": self.max_queue_size, "timeout_ms": self.queue_timeout_ms}
        return dataclasses.replace(profile.queue, **{k: v for k, v in overrides.items() if v is not None})


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def parity_inputs(config: PreprocessConfig, seed: int = 0) -> list[np.ndarray]:
    """Random inputs plus real-looking ones through the shared preprocessing."""
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal((2, 3, config.size, config.size), dtype=np.float32)]
    for image in real_looking_images():
        batches.append(preprocess(image, config, views=("identity", "hflip")))
    return batches


BUILT_IN_IMAGES = ("pydicom-data RG1_UNCR (when installed)", "synthetic frontal", "synthetic lateral")


def real_looking_images() -> list[np.ndarray]:
    """The real chest X-ray shipped in pydicom-data and the synthetic frontal and lateral ones."""
    from cxrlt.io.synthetic import synthetic_radiographs

    images = list(synthetic_radiographs().values())
    try:
        from cxrlt.io.images import load_image
        from cxrlt.io.samples import pydicom_data_file

        images.insert(0, load_image(pydicom_data_file()).pixels)
    except Exception as exc:  # pydicom-data missing: parity still runs on the others
        log.warning("real chest X-ray unavailable for parity checks (%s)", exc)
    return images


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _network_config(options: BuildOptions, profile: Profile, name: str, size: int, output: str, dim: int, labels: bool) -> str:
    label_line = 'label_filename: "labels.txt"' if labels else ""
    queue = options.queue_policy(profile)
    common = dict(
        name=name, profile=profile.name, max_batch_size=options.max_batch_size, image_size=size,
        output_name=output, output_dim=dim, label_line=label_line, queue_delay_us=options.queue_delay_us,
        instances=options.network_instances,
        queue_policy=queue_policy_block(queue.network_max_queue_size, queue.member_timeout_ms),
    )
    if options.target == "ngc" and options.execution_provider == "openvino":
        params = {"INFERENCE_NUM_THREADS": str(options.ort_threads), "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY",
                  **({"HINT_BF16": "YES"} if options.precision == "bf16" else {})}
        return render("onnx_network/config.ngc-openvino.pbtxt.template", precision_hint=options.precision,
                      parameters=parameters_block(params), **common)
    if options.target == "ngc":
        optimization = (
            'optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" '
            'parameters { key: "precision_mode" value: "FP16" } } ] } }' if options.tensorrt else ""
        )
        return render("onnx_network/config.ngc.pbtxt.template", optimization=optimization, **common)
    params = {"onnx_file": "model.onnx", "intra_op_threads": str(options.ort_threads), "execution_provider": options.execution_provider,
              "engine": options.engine, "device": options.device, "fp16": "true" if options.fp16 else "false"}
    if not is_reference(options.execution_provider, options.precision):
        params["precision"] = options.precision  # for readers: the runners take it from the file's metadata
    return render("onnx_network/config.pbtxt.template", parameters=parameters_block(params), **common)


def _export_network(out: Path, options: BuildOptions, profile: Profile, name: str, module: torch.nn.Module,
                    size: int, output: str, dim: int, labels: tuple[str, ...] | None, inputs: list[np.ndarray],
                    execution: Execution | None = None) -> dict[str, Any]:
    model_dir = out / name
    onnx_path = export_onnx(module, version_dir(out, name, options.release) / "model.onnx", size, output)
    parity = check_parity(module, onnx_path, inputs)
    served = execution.apply(name, onnx_path) if execution is not None else None
    _write(model_dir / "config.pbtxt", _network_config(options, profile, name, size, output, dim, labels is not None))
    if labels is not None:
        _write(model_dir / "labels.txt", label_file_text(labels))
    if options.target == "embedded":
        shutil.copyfile(TEMPLATES / "onnx_network" / "model.py", version_dir(out, name, options.release) / "model.py")
    record = {
        "parameters": count_parameters(module),
        "onnx_sha256": file_sha256(onnx_path),
        "parity_max_abs_diff": parity,
        "weights_sha256": state_dict_sha256(module),
    }
    if served is not None:
        record["served_parity"] = served
    if options.engine == "torchscript":
        script = export_torchscript(module, version_dir(out, name, options.release) / "model.pt", size)
        record["torchscript_parity_max_abs_diff"] = check_torchscript_parity(module, script, inputs)
    return record


def build_text_cache(version_dir: Path, clip_model: torch.nn.Module, model_name: str, prompts_path: Path, weights_sha256: str) -> dict[str, Any]:
    """Encode the prompt file with the text tower into a release's directory (no ONNX export)."""
    prompts = load_prompts(prompts_path)
    tokenizer = tokenizer_for(model_name)
    positive = encode_prompt_ensembles(clip_model, tokenizer, prompts.prompts).numpy()
    negative = encode_prompt_ensembles(clip_model, tokenizer, prompts.negatives).numpy() if prompts.negatives else None
    version_dir.mkdir(parents=True, exist_ok=True)
    prompt_copy = version_dir / PROMPTS_FILE
    if prompts_path.resolve() != prompt_copy.resolve():
        shutil.copyfile(prompts_path, prompt_copy)
    record = {
        "clip_model": model_name,
        "weights_sha256": weights_sha256,
        "prompts_sha256": sha256_text(prompt_copy),
        "prompts_per_class": [len(p) for p in prompts.prompts],
        "negative_prompts": prompts.negatives is not None,
    }
    save_text_cache(version_dir, prompts.class_names, positive, negative, record)
    return record


PIPELINE_TASKS = {CLASSIFIER_MODEL: (CLASSIFIER_TASK,), ZEROSHOT_MODEL: (ZEROSHOT_TASK,), FINDINGS_MODEL: (CLASSIFIER_TASK, ZEROSHOT_TASK)}


def release_parameters(classifier: ClassifierSettings, random_weights: bool, identity: str) -> dict[str, dict[str, str]]:
    """The pipeline parameters that belong to one release's weights, by model name: its ensemble weights
    (tuned on its networks' outputs), the weights' provenance and identity, and the gate threshold (set
    when a gate is fitted; the operating points join when chosen). They live in the release's record
    and, for the live one, in the configs too; the other settings (TTA, gating, preprocessing, the
    zero-shot scoring) are the configs' own, shared by every release."""
    # Clients see the configs, not the manifest: tell them when outputs are not diagnostic.
    flag = {"random_weights": "true" if random_weights else "false", IDENTITY_PARAMETER: identity, THRESHOLD_PARAMETER: ""}
    weights = {k: v for k, v in classifier.to_parameters().items() if k.startswith("weights_")}
    return {name: {**(weights if CLASSIFIER_TASK in run else {}), **flag} for name, run in PIPELINE_TASKS.items()}


def pipeline_parameters(options: BuildOptions, profile: Profile, classifier: ClassifierSettings, zeroshot: ZeroShotSettings,
                        released: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """The config parameters of the three pipeline models, by model name: their tasks' settings, how
    they run, the release plan (this build's release live), and the live release's own parameters
    (`released`)."""
    queue = options.queue_policy(profile)
    # The pipelines stack every merged request's images into one call per network, sliced to
    # what the network models accept.
    members = {"member_execution": options.member_execution, "member_intra_op_threads": str(options.ort_threads),
               "member_execution_provider": options.execution_provider,
               "member_max_batch_size": str(options.max_batch_size), "member_timeout_ms": str(queue.member_timeout_ms),
               # the out-of-distribution gate: what to do above its threshold
               ACTION_PARAMETER: options.ood_action, **ReleasePlan(options.release).to_parameters()}
    return {name: {**task_parameters(PIPELINE_TASKS[name], classifier, zeroshot), **values, **members}
            for name, values in released.items()}


def _bls_configs(out: Path, options: BuildOptions, profile: Profile, classifier: ClassifierSettings, zeroshot: ZeroShotSettings,
                 released: Mapping[str, Mapping[str, str]]) -> None:
    queue = options.queue_policy(profile)
    common = dict(max_batch_size=options.max_batch_size, instances=options.bls_instances,
                  queue_policy=queue_policy_block(queue.max_queue_size, queue.timeout_ms))
    params = pipeline_parameters(options, profile, classifier, zeroshot, released)
    # A plain tritonclient user reads the contract from the served config's description.
    texts = {
        name: render(f"{name}/config.pbtxt.template", parameters=parameters_block({**values, "description": MODEL_DESCRIPTIONS[name]}), **common)
        for name, values in params.items()
    }
    labels = {CLASSIFIER_MODEL: TASK1_LABELS, ZEROSHOT_MODEL: TASK2_LABELS, FINDINGS_MODEL: ALL_LABELS}
    for name, text in texts.items():
        _write(out / name / "config.pbtxt", text)
        _write(out / name / "labels.txt", label_file_text(labels[name]))
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        # One Python model behind all three configs (python_backends.pipeline); it is the code, not
        # weights, so it stays version 1 whatever the releases.
        shutil.copyfile(TEMPLATES / "cxr_pipeline" / "model.py", out / name / "1" / "model.py")


def default_classifier_settings(profile: Profile) -> ClassifierSettings:
    return ClassifierSettings(preprocess=PreprocessConfig(size=profile.image_size))


def default_zeroshot_settings(profile: Profile) -> ZeroShotSettings:
    return ZeroShotSettings(preprocess=PreprocessConfig.clip(profile.clip.image_size))


# The manifest fields that describe the whole repository (what every release must share: the
# network configs are common to all their versions); the others belong to each release.
REPOSITORY_FIELDS = ("profile", "clip_model", "target", "image_size", "queue_policy", "execution")


def build_repository(out: Path | str, options: BuildOptions, on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the repository in `out` and return its manifest (release `options.release`'s).

    The build happens in a sibling staging folder that replaces `out` only when complete,
    so a failed build never leaves a half-written repository behind. When `out` already holds
    releases and `options.release` is a new number, the new release is added beside them instead
    (its version directories and release files move in; configs and the live release stay).
    """
    final = Path(out)
    if final.exists() and any(final.iterdir()) and not (final / MANIFEST).is_file():
        raise FileExistsError(f"{final} is not empty and holds no {MANIFEST}; choose an empty or earlier-built directory")
    held = release_numbers(final) if final.exists() else []
    if held and options.release in held:
        raise FileExistsError(f"{final} already holds release {options.release} (releases {held}); build another number "
                              f"with --release, or remove it first with `cxrlt release prune`")
    if held and options.release == 1 and held != [1]:
        raise FileExistsError(f"{final} holds releases {held}; add one with --release N, or remove the directory to start anew")
    staging = final.parent / f".{final.name}.building"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _build(staging, options, on_step or (lambda message: log.info(message)))
        if held and options.release not in held:
            _check_compatible(final, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if held and options.release not in held:
        _move_release_in(staging, final, options.release)
        shutil.rmtree(staging, ignore_errors=True)
        update_release(final, options.release)  # its parameters join the configs (release_parameters_N)
        return manifest
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return manifest


def _check_compatible(repository: Path, manifest: Mapping[str, Any]) -> None:
    root = read_manifest(repository, release=min(release_numbers(repository)))
    differ = [f"{field} {_shared(root, field)!r} -> {_shared(manifest, field)!r}" for field in REPOSITORY_FIELDS
              if _shared(root, field) != _shared(manifest, field)]
    if differ:
        raise ValueError(f"release {manifest['release']} cannot join {repository}: its releases share the network configs, "
                         f"but {'; '.join(differ)}. Build it with the same options, or into a new repository")


def _shared(manifest: Mapping[str, Any], field: str) -> Any:
    """What releases must share of a repository field: of `execution`, the setting the configs name,
    not each release's parity figures or how auto came to it."""
    value = manifest.get(field)
    if field == "execution" and value:
        return {key: value.get(key) for key in ("execution_provider", "precision")}
    return value


def _move_release_in(staging: Path, final: Path, number: int) -> None:
    """Move release `number`'s version directories and files from a complete staging build into `final`."""
    for model_dir in sorted(p for p in staging.iterdir() if p.is_dir()):
        source = version_dir(staging, model_dir.name, number)
        if source.is_dir() and model_dir.name not in PIPELINE_MODELS:
            source.rename(version_dir(final, model_dir.name, number))
    target = release_dir(final, number)
    target.parent.mkdir(parents=True, exist_ok=True)
    release_dir(staging, number).rename(target)


def _build(out: Path, options: BuildOptions, step: Callable[[str], None]) -> dict[str, Any]:
    """The build at `options`' setting; when the parity gate refuses a setting auto chose, again from
    scratch at the next slower one (exporters.execution_default): the refused files are not served."""
    while True:
        try:
            return _build_at(out, options, step)
        except PrecisionRefused as refusal:
            slower = next_setting(options, refusal)
            if slower is None:
                raise
            options = slower
            step(f"the parity gate refused {options.execution_choice['refused'][-1]['setting']}; "
                 f"building {options.execution_provider} {options.precision}")
            shutil.rmtree(out)
            out.mkdir()


def _build_at(out: Path, options: BuildOptions, step: Callable[[str], None]) -> dict[str, Any]:
    profile = get_profile(options.profile, options.clip_model)
    classifier = options.classifier or default_classifier_settings(profile)
    zeroshot = options.zeroshot or default_zeroshot_settings(profile)
    inputs = parity_inputs(classifier.preprocess, options.seed)
    with contextlib.ExitStack() as stack:
        execution = None
        if not is_reference(options.execution_provider, options.precision):
            data = options.parity_data or ParityData("built-in: " + ", ".join(BUILT_IN_IMAGES), real_looking_images())
            execution = Execution(options.execution_provider, options.precision, data, classifier, zeroshot,
                                  options.parity_limits, options.ort_threads)
            stack.callback(execution.close)
        return _build_models(out, options, profile, classifier, zeroshot, inputs, execution, step)


def _build_models(out: Path, options: BuildOptions, profile: Profile, classifier: ClassifierSettings, zeroshot: ZeroShotSettings,
                  inputs: list[np.ndarray], execution: Execution | None, step: Callable[[str], None]) -> dict[str, Any]:
    names = list(profile.network_specs())
    models: dict[str, Any] = {}
    for name in names:
        step(f"exporting {name}")
        module, source = load_network(profile, name, options.checkpoints, options.seed, options.allow_random)
        labels = ("frontal", "lateral") if name == ROUTER_MODEL else TASK1_LABELS
        models[name] = {
            "arch": profile.network_specs()[name].arch,
            "checkpoint": source.checkpoint,
            **_export_network(out, options, profile, name, module, profile.image_size, "logits", len(labels), labels, inputs,
                              execution),
        }

    step(f"exporting {ENCODER_MODEL}")
    clip_model, clip_source = load_clip(profile, options.checkpoints, options.seed, options.allow_random)
    tower = ImageTower(clip_model).eval()
    clip_weights = state_dict_sha256(clip_model)
    clip_inputs = parity_inputs(zeroshot.preprocess, options.seed)
    dim = int(tower(torch.from_numpy(clip_inputs[0][:1])).shape[-1])
    models[ENCODER_MODEL] = {
        "arch": f"open_clip:{profile.clip.model_name}",
        "checkpoint": clip_source.checkpoint,
        **_export_network(out, options, profile, ENCODER_MODEL, tower, profile.clip.image_size, "image_embeds", dim, None, clip_inputs,
                          execution),
        "weights_sha256": clip_weights,
    }
    encoder_record = {"clip_model": profile.clip.model_name, "weights_sha256": clip_weights, "dim": dim, "checkpoint": clip_source.checkpoint}
    _write(version_dir(out, ENCODER_MODEL, options.release) / ENCODER_RECORD, json.dumps(encoder_record, indent=2, sort_keys=True) + "\n")

    step("encoding zero-shot prompts")
    files = release_dir(out, options.release)
    text_cache = build_text_cache(files, clip_model, profile.clip.model_name, Path(options.prompts), clip_weights)

    random_weights = any(m["checkpoint"] is None for m in models.values())
    identity = repository_identity({"models": models, "text_cache": text_cache, "classifier": classifier.to_parameters(),
                                    "zeroshot": zeroshot.to_parameters()})
    step("writing Python models")
    released = release_parameters(classifier, random_weights, identity)
    _bls_configs(out, options, profile, classifier, zeroshot, released)
    execution_record = execution_record_of(options)
    if execution is not None:
        step("checking the served pipeline's parity")
        execution_record["pipeline_parity"] = execution.pipeline(out, options.release)

    manifest = {
        "release": options.release,
        "profile": profile.name,
        "clip_model": profile.clip.model_name,
        "target": options.target,
        "seed": options.seed,
        "checkpoints": str(options.checkpoints) if options.checkpoints else None,
        "random_weights": random_weights,
        "warning": RANDOM_WEIGHTS_WARNING if random_weights else None,
        "image_size": profile.image_size,
        "models": models,
        "text_cache": text_cache,
        "classifier": classifier.to_parameters(),
        "zeroshot": zeroshot.to_parameters(),
        "queue_policy": dataclasses.asdict(options.queue_policy(profile)),
        IDENTITY_PARAMETER: identity,
        "execution": execution_record,
        "packages": _package_versions(),
    }
    _write(out / MANIFEST, json.dumps({field: manifest[field] for field in REPOSITORY_FIELDS}, indent=2, sort_keys=True) + "\n")
    write_release(out, options.release, {**manifest, "parameters": released})
    return manifest


def execution_record_of(options: BuildOptions) -> dict[str, Any]:
    """The manifest's `execution`: the setting served and, when auto chose it, how (and what the gate refused)."""
    engine = {"engine": options.engine} if options.engine != "onnxruntime" else {}  # PyTorch runs the networks
    return {"execution_provider": options.execution_provider, "precision": options.precision, **engine,
            **(options.execution_choice or {})}


def rebuild_text_cache(repository: Path | str, prompts: Path | str | None = None, release: int | None = None) -> dict[str, Any]:
    """`cxrlt build-text-cache`: re-encode prompts for a release (default: the live one) with its own CLIP weights."""
    repository = Path(repository)
    number = release_number(repository, release)
    manifest = read_manifest(repository, number)
    profile = manifest_profile(manifest)
    checkpoint = manifest["models"][ENCODER_MODEL]["checkpoint"]
    clip_model, _ = load_clip(profile, Path(checkpoint).parent if checkpoint else None, manifest["seed"], allow_random=checkpoint is None)
    weights = state_dict_sha256(clip_model)
    encoder = json.loads((version_dir(repository, ENCODER_MODEL, number) / ENCODER_RECORD).read_text())
    if weights != encoder["weights_sha256"]:
        raise RuntimeError(
            f"the CLIP weights at {checkpoint or 'seeded random init'} no longer match the served image encoder; "
            f"rebuild the whole repository with `cxrlt build-repo`"
        )
    files = release_dir(repository, number)
    prompts_path = Path(prompts) if prompts else files / PROMPTS_FILE
    record = build_text_cache(files, clip_model, profile.clip.model_name, prompts_path, weights)
    update_release(repository, number, fields={"text_cache": record})  # the prompts are part of what is served
    return record
