"""`cxrlt build-repo`: checkpoints (or seeded random weights) -> a complete Triton model repository.

Writes, for every network, the ONNX file (parity-checked against PyTorch), its config and
labels; the CLIP image encoder and the cached text tensor; the three Python models; and
`manifest.json` (profile, weights, hashes, parameters, parity, package versions). The same
inputs always give the same repository, byte for byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
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
from cxrlt.contract.monitoring import MONITORING_BASELINE_FILE
from cxrlt.contract.ood_gate import ACTION_PARAMETER, DEFAULT_ACTION, GATE_FILE, THRESHOLD_PARAMETER
from cxrlt.contract.operating_points import OPERATING_POINTS_FILE
from cxrlt.contract.preprocessing import PreprocessConfig, preprocess
from cxrlt.contract.profiles import Profile, QueuePolicy, get_profile
from cxrlt.contract.served import CLASSIFIER_MODEL, FINDINGS_MODEL, MODEL_DESCRIPTIONS, ZEROSHOT_MODEL
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

from exporters.model_configs import TEMPLATES, parameters_block, queue_policy_block, render
from exporters.onnx_export import check_parity, export_onnx
from exporters.precision import PROVIDER_PRECISIONS, Execution, ParityData, ParityLimits, check_execution, is_reference
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
    precision: str = "fp32"  # fp32, bf16 (openvino) or int8 (NNCF post-training quantization): exporters.precision
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

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, not {self.target!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {self.engine!r}")
        member_execution(self.member_execution)
        if self.ood_action not in ("refuse", "flag"):
            raise ValueError(f"ood_action must be refuse or flag, not {self.ood_action!r}")
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
    onnx_path = export_onnx(module, model_dir / "1" / "model.onnx", size, output)
    parity = check_parity(module, onnx_path, inputs)
    served = execution.apply(name, onnx_path) if execution is not None else None
    _write(model_dir / "config.pbtxt", _network_config(options, profile, name, size, output, dim, labels is not None))
    if labels is not None:
        _write(model_dir / "labels.txt", label_file_text(labels))
    if options.target == "embedded":
        shutil.copyfile(TEMPLATES / "onnx_network" / "model.py", model_dir / "1" / "model.py")
    record = {
        "parameters": count_parameters(module),
        "onnx_sha256": file_sha256(onnx_path),
        "parity_max_abs_diff": parity,
        "weights_sha256": state_dict_sha256(module),
    }
    if served is not None:
        record["served_parity"] = served
    if options.engine == "torchscript":
        script = export_torchscript(module, model_dir / "1" / "model.pt", size)
        record["torchscript_parity_max_abs_diff"] = check_torchscript_parity(module, script, inputs)
    return record


def build_text_cache(repository: Path, clip_model: torch.nn.Module, model_name: str, prompts_path: Path, weights_sha256: str) -> dict[str, Any]:
    """Encode the prompt file with the text tower into cxr_zeroshot/1/ (no ONNX export)."""
    prompts = load_prompts(prompts_path)
    tokenizer = tokenizer_for(model_name)
    positive = encode_prompt_ensembles(clip_model, tokenizer, prompts.prompts).numpy()
    negative = encode_prompt_ensembles(clip_model, tokenizer, prompts.negatives).numpy() if prompts.negatives else None
    version_dir = repository / ZEROSHOT_MODEL / "1"
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


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


# What the served answers depend on, as the manifest records it: the weights and files, the text
# cache (prompts), the pipeline settings; and the weight-bound files at the repository root, those
# of WEIGHT_BOUND_FILES it has (fitted on the networks' outputs or features: they travel with them).
IDENTITY_FIELDS = ("models", "text_cache", "classifier", "zeroshot")
WEIGHT_BOUND_FILES = (OPERATING_POINTS_FILE, GATE_FILE, MONITORING_BASELINE_FILE)
IDENTITY_PARAMETER = "repository_sha256"  # the pipeline configs' copy of the identity
PIPELINE_MODELS = (CLASSIFIER_MODEL, ZEROSHOT_MODEL, FINDINGS_MODEL)


def repository_identity(manifest_fields: Mapping[str, Any], files: Mapping[str, str] | str | None = None) -> str:
    """The repository's identity (``repository_sha256``): one hash over what the served answers
    depend on: IDENTITY_FIELDS of the manifest and the SHA-256 of each weight-bound root file
    (``files``: {file name: sha256}, see weight_bound_files; a plain string is the operating points'
    SHA-256). The pipeline configs carry it: e.g. the DICOM node derives its SR UIDs from it."""
    if isinstance(files, str):
        files = {OPERATING_POINTS_FILE: files}
    covered = {field: manifest_fields[field] for field in IDENTITY_FIELDS}
    for name, sha256 in sorted((files or {}).items()):
        covered[f"{Path(name).stem}_sha256"] = sha256  # operating_points.json -> operating_points_sha256
    return sha256_json(covered)


def weight_bound_files(repository: Path | str) -> dict[str, str]:
    """{file name: sha256} of the WEIGHT_BOUND_FILES the repository has at its root."""
    repository = Path(repository)
    return {name: file_sha256(repository / name) for name in WEIGHT_BOUND_FILES if (repository / name).is_file()}


def refresh_repository_identity(repository: Path | str) -> str:
    """Recompute a built repository's identity after an edit (ensemble weights, operating points,
    gate, text cache) and write it into the manifest and the three pipeline configs."""
    from cxrlt.contract.model_config import set_config_parameters

    repository = Path(repository)
    manifest = read_manifest(repository)
    identity = repository_identity(manifest, weight_bound_files(repository))
    for model in PIPELINE_MODELS:
        set_config_parameters(repository / model / "config.pbtxt", {IDENTITY_PARAMETER: identity})
    manifest[IDENTITY_PARAMETER] = identity
    _write(repository / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return identity


def pipeline_parameters(options: BuildOptions, profile: Profile, classifier: ClassifierSettings, zeroshot: ZeroShotSettings,
                        random_weights: bool, identity: str) -> dict[str, dict[str, str]]:
    """The config parameters of the three pipeline models, by model name."""
    queue = options.queue_policy(profile)
    # Clients see the configs, not the manifest: tell them when outputs are not diagnostic.
    flag = {"random_weights": "true" if random_weights else "false", IDENTITY_PARAMETER: identity,
            # the out-of-distribution gate: what to do above its threshold, and the threshold (set when fitted)
            ACTION_PARAMETER: options.ood_action, THRESHOLD_PARAMETER: ""}
    # The pipelines stack every merged request's images into one call per network, sliced to
    # what the network models accept.
    members = {"member_execution": options.member_execution, "member_intra_op_threads": str(options.ort_threads),
               "member_execution_provider": options.execution_provider,
               "member_max_batch_size": str(options.max_batch_size), "member_timeout_ms": str(queue.member_timeout_ms)}
    tasks = {CLASSIFIER_MODEL: (CLASSIFIER_TASK,), ZEROSHOT_MODEL: (ZEROSHOT_TASK,), FINDINGS_MODEL: (CLASSIFIER_TASK, ZEROSHOT_TASK)}
    return {name: {**task_parameters(run, classifier, zeroshot), **members, **flag} for name, run in tasks.items()}


def _bls_configs(out: Path, options: BuildOptions, profile: Profile, classifier: ClassifierSettings, zeroshot: ZeroShotSettings,
                 random_weights: bool, identity: str) -> None:
    queue = options.queue_policy(profile)
    common = dict(max_batch_size=options.max_batch_size, instances=options.bls_instances,
                  queue_policy=queue_policy_block(queue.max_queue_size, queue.timeout_ms))
    params = pipeline_parameters(options, profile, classifier, zeroshot, random_weights, identity)
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
        # One Python model behind all three configs (python_backends.pipeline).
        shutil.copyfile(TEMPLATES / "cxr_pipeline" / "model.py", out / name / "1" / "model.py")


def default_classifier_settings(profile: Profile) -> ClassifierSettings:
    return ClassifierSettings(preprocess=PreprocessConfig(size=profile.image_size))


def default_zeroshot_settings(profile: Profile) -> ZeroShotSettings:
    return ZeroShotSettings(preprocess=PreprocessConfig.clip(profile.clip.image_size))


def build_repository(out: Path | str, options: BuildOptions, on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the repository in `out` and return its manifest.

    The build happens in a sibling staging folder that replaces `out` only when complete,
    so a failed build never leaves a half-written repository behind.
    """
    final = Path(out)
    if final.exists() and any(final.iterdir()) and not (final / MANIFEST).is_file():
        raise FileExistsError(f"{final} is not empty and holds no {MANIFEST}; choose an empty or earlier-built directory")
    out = final.parent / f".{final.name}.building"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        manifest = _build(out, options, on_step or (lambda message: log.info(message)))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    out.rename(final)
    return manifest


def _build(out: Path, options: BuildOptions, step: Callable[[str], None]) -> dict[str, Any]:
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
    _write(out / ENCODER_MODEL / "1" / ENCODER_RECORD, json.dumps(encoder_record, indent=2, sort_keys=True) + "\n")

    step("encoding zero-shot prompts")
    text_cache = build_text_cache(out, clip_model, profile.clip.model_name, Path(options.prompts), clip_weights)

    random_weights = any(m["checkpoint"] is None for m in models.values())
    identity = repository_identity({"models": models, "text_cache": text_cache, "classifier": classifier.to_parameters(),
                                    "zeroshot": zeroshot.to_parameters()})
    step("writing Python models")
    _bls_configs(out, options, profile, classifier, zeroshot, random_weights, identity)
    execution_record = {"execution_provider": options.execution_provider, "precision": options.precision}
    if execution is not None:
        step("checking the served pipeline's parity")
        execution_record["pipeline_parity"] = execution.pipeline(out)

    manifest = {
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
    _write(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def rebuild_text_cache(repository: Path | str, prompts: Path | str | None = None) -> dict[str, Any]:
    """`cxrlt build-text-cache`: re-encode prompts for a built repository with its own CLIP weights."""
    repository = Path(repository)
    manifest = read_manifest(repository)
    profile = manifest_profile(manifest)
    checkpoint = manifest["models"][ENCODER_MODEL]["checkpoint"]
    clip_model, _ = load_clip(profile, Path(checkpoint).parent if checkpoint else None, manifest["seed"], allow_random=checkpoint is None)
    weights = state_dict_sha256(clip_model)
    encoder = json.loads((repository / ENCODER_MODEL / "1" / ENCODER_RECORD).read_text())
    if weights != encoder["weights_sha256"]:
        raise RuntimeError(
            f"the CLIP weights at {checkpoint or 'seeded random init'} no longer match the served image encoder; "
            f"rebuild the whole repository with `cxrlt build-repo`"
        )
    prompts_path = Path(prompts) if prompts else repository / ZEROSHOT_MODEL / "1" / PROMPTS_FILE
    record = build_text_cache(repository, clip_model, profile.clip.model_name, prompts_path, weights)
    manifest["text_cache"] = record
    _write(repository / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    refresh_repository_identity(repository)  # the prompts are part of what is served
    return record
