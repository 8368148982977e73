"""Export every network (router, six ensemble members, CLIP image encoder) to ONNX with a parity
check, encode the zero-shot prompts, and write a complete Triton model repository.

With --operating-points-data, the built repository also gets its operating points and
calibration, chosen on that CSV's validation split as `cxrlt operating-points` does. With
--reference-images, it gets its out-of-distribution gate (docs/gate.md), fitted on those images."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxrlt.cli.commands.operating_points import policy_argument
from cxrlt.cli.options import add_engine_argument, add_repo_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="tiny", choices=["tiny", "paper"], help="network sizes (default: tiny)")
    add_repo_argument(parser, "the repository directory to write", "--out", required=True)
    parser.add_argument("--checkpoints", type=Path, help="directory of <model>.pt state_dicts (see networks/checkpoints.py)")
    parser.add_argument("--allow-random", action="store_true", help="serve networks without a checkpoint with random weights")
    parser.add_argument("--target", default="embedded", choices=["embedded", "ngc"],
                        help="embedded: Python-backend onnxruntime (pytriton's server); ngc: onnxruntime_onnx platform")
    parser.add_argument("--tensorrt", action="store_true", help="ngc target: enable the TensorRT FP16 accelerator")
    add_engine_argument(parser, "onnxruntime",
                        "embedded target: run networks with onnxruntime (CUDA provider when onnxruntime-gpu is "
                        "installed) or with PyTorch, as TorchScript (CUDA when PyTorch has it); 'torchscript' "
                        "is an old name of torch")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="torchscript engine device")
    parser.add_argument("--execution-provider", default="auto", choices=["auto", "cpu", "cuda", "openvino"],
                        help="onnxruntime engine: auto (default: without --precision, this host's fastest setting "
                             "that passes the parity gate: on a CPU with bf16 instructions openvino bf16, else openvino "
                             "fp32 where OpenVINO runs on an AVX2 CPU, else onnxruntime FP32, falling back a step when the gate "
                             "refuses; onnxruntime FP32 for the tiny profile and where CUDA is offered), "
                             "cuda (the models fail to load without it; untested here), cpu, or openvino (the "
                             "openvino package runs the ONNX files on the CPU; ngc target: Triton's openvino backend)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "int8"],
                        help="fp32 (default with a named --execution-provider; auto chooses its own without it); bf16 "
                             "(openvino: bf16 inference precision); int8 (openvino or cpu: NNCF post-training "
                             "quantization calibrated on --parity-data's training images). Anything but onnxruntime "
                             "FP32 passes the parity gate first: refused beyond --max-dp / --max-dmap (a build fails)")
    parser.add_argument("--parity-data", type=Path, metavar="CSV",
                        help="a CXR-LT label CSV: the parity gate runs on its validation split (max |dp| and the mAP "
                             "difference of the served pipeline) and int8 calibrates on its training split "
                             "(default: the built-in real and synthetic radiographs, no mAP)")
    parser.add_argument("--parity-images", type=int, default=64, metavar="N",
                        help="with --parity-data: at most N validation images for the gate")
    parser.add_argument("--calibration-images", type=int, default=32, metavar="N",
                        help="with --parity-data and --precision int8: at most N training images to calibrate on")
    parser.add_argument("--max-dp", type=float, default=0.01, help="parity gate: largest |dp| allowed, per network and served pipeline")
    parser.add_argument("--max-dmap", type=float, default=0.005, help="parity gate: largest |dmAP| of the served pipeline allowed")
    parser.add_argument("--fp16", action="store_true", help="torchscript engine on CUDA: float16 autocast")
    parser.add_argument("--clip-model", help="open_clip config for zero-shot, replacing the profile's "
                        "(paper: ViT-B-32 as CheXzero; ViT-L-14 as WhyXrayCLIP)")
    parser.add_argument("--prompts", type=Path, help="zero-shot prompt file (YAML); default: the shipped one")
    parser.add_argument("--seed", type=int, default=0, help="seed of random initialisation (default 0)")
    parser.add_argument("--release", type=int, metavar="N",
                        help="add these weights as release N beside the releases --out already holds (its version "
                             "directories N/ and files; the live release stays: see `cxrlt release`); without it, "
                             "--out is (re)built with release 1 live")
    parser.add_argument("--ort-threads", type=int, default=1, help="onnxruntime intra-op threads per network instance")
    parser.add_argument("--network-instances", type=int, default=1, help="instances of each network model")
    parser.add_argument("--bls-instances", type=int, default=4, help="instances of each Python BLS model")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--queue-delay-us", type=int, default=0,
                        help="dynamic batcher max queue delay (default 0: merge only what queues while busy)")
    parser.add_argument("--max-queue-size", type=int,
                        help="requests each entry model (cxr_findings, cxr_classifier, cxr_zeroshot) may hold waiting; "
                             "more are rejected at once with UNAVAILABLE (default: the profile's, 8)")
    parser.add_argument("--queue-timeout-ms", type=int,
                        help="an entry model rejects a request that waited this long with UNAVAILABLE; clients may ask "
                             "for less (default: the profile's: tiny 2000, paper 60000)")
    parser.add_argument("--member-execution", default="bls", choices=["bls", "in-process"],
                        help="how cxr_classifier and cxr_zeroshot run their networks: bls (default) calls the network "
                             "models, so each member batches across requests and has its own statistics; in-process "
                             "runs the same ONNX files inside the BLS model, with no per-call hop (faster for small "
                             "networks on CPU, e.g. the tiny profile; the network models stay served for direct calls)")
    parser.add_argument("--tta", help="TTA views, e.g. identity,hflip,rot+5,rot-5,zoom1.1,zoom0.9")
    parser.add_argument("--gating-alpha", type=float, help="normal gating exponent (default 0.5)")
    parser.add_argument("--operating-points-data", type=Path, metavar="CSV",
                        help="a CXR-LT label CSV: choose the operating points and calibration on its validation split "
                             "(the split `cxrlt train` held out) and write them into the repository")
    parser.add_argument("--operating-points-policy", type=policy_argument, default="youden", metavar="POLICY",
                        help="with --operating-points-data: youden, f1, sensitivity=X or ppv=X (see `cxrlt operating-points`)")
    parser.add_argument("--reference-images", type=Path, metavar="DIR|CSV",
                        help="fit the out-of-distribution gate on these in-distribution images: a folder (DICOM or "
                             "PNG files below it) or a CXR-LT label CSV (its training split); see docs/gate.md")
    parser.add_argument("--ood-percentile", type=float, default=99.0, metavar="P",
                        help="with --reference-images: the gate's threshold is this percentile of the distances of "
                             "reference images held out of the fit (default 99: about 1 %% of such images refused)")
    parser.add_argument("--ood-action", default="refuse", choices=["refuse", "flag"],
                        help="above the gate's threshold: refuse the image with INVALID_ARGUMENT (default) or only "
                             "report OOD_SCORE (the client flags it); the config parameter ood_action")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from rich.table import Table

    from cxrlt.cli.console import console, warn_random_weights
    from cxrlt.contract.execution import describe_execution
    from cxrlt.contract.preprocessing import parse_tta_views
    from cxrlt.contract.profiles import get_profile
    from exporters.build_repo import BuildOptions, build_repository, default_classifier_settings
    from exporters.precision import ParityLimits
    from cxrlt.contract.prompts import DEFAULT_PROMPTS

    classifier = default_classifier_settings(get_profile(args.profile))
    if args.tta:
        classifier = dataclasses.replace(classifier, tta_views=parse_tta_views(args.tta))
    if args.gating_alpha is not None:
        classifier = dataclasses.replace(classifier, gating_alpha=args.gating_alpha)
    options = BuildOptions(
        profile=args.profile, target=args.target, checkpoints=args.checkpoints, allow_random=args.allow_random,
        seed=args.seed, prompts=args.prompts or DEFAULT_PROMPTS, ort_threads=args.ort_threads,
        network_instances=args.network_instances, bls_instances=args.bls_instances, max_batch_size=args.max_batch_size,
        queue_delay_us=args.queue_delay_us, member_execution=args.member_execution.replace("-", "_"),
        execution_provider=args.execution_provider, tensorrt=args.tensorrt, classifier=classifier,
        precision=args.precision, parity_limits=ParityLimits(args.max_dp, args.max_dmap),
        parity_data=parity_data(args.parity_data, args.parity_images, args.calibration_images, args.precision == "int8")
        if args.parity_data else None,
        engine="torchscript" if args.engine == "torch" else args.engine, device=args.device, fp16=args.fp16, clip_model=args.clip_model,
        max_queue_size=args.max_queue_size, queue_timeout_ms=args.queue_timeout_ms, ood_action=args.ood_action,
        release=args.release or 1,
    )
    with console.status("building repository") as status:
        manifest = build_repository(args.repo, options, on_step=lambda message: status.update(message))
    table = Table(title=f"{args.repo} release {options.release} (profile {args.profile}, target {args.target})")
    for column in ("model", "architecture", "parameters", "max |ONNX - PyTorch|", "weights"):
        table.add_column(column)
    for name, entry in manifest["models"].items():
        table.add_row(name, entry["arch"], f"{entry['parameters']:,}", f"{entry['parity_max_abs_diff']:.2e}",
                      entry["checkpoint"] or "RANDOM")
    console.print(table)
    print_parity(console, manifest)
    console.print(describe_execution(manifest["execution"]), highlight=False)
    if args.operating_points_data:
        add_operating_points(console, args.repo, args.operating_points_data, args.operating_points_policy, options.release)
    if args.reference_images:
        add_gate(console, args.repo, args.reference_images, args.ood_percentile, options.release)
    if manifest["random_weights"]:
        warn_random_weights(manifest["warning"])
    console.print(f"serve it with: cxrlt serve --repo {args.repo}")
    return 0


def parity_data(data_csv: Path, images: int, calibration: int, int8: bool):
    """The parity gate's images from a label CSV: the validation split (as `cxrlt train` held it out), with
    Task 1 labels and hints, and for int8 the training split's first `calibration` images."""
    import numpy as np

    from cxrlt.contract.labels import TASK1_LABELS
    from cxrlt.io.images import load_pixels
    from exporters.precision import ParityData
    from training.job import load_split

    if images < 1 or calibration < 1:
        raise ValueError("--parity-images and --calibration-images must be at least 1")
    data = load_split(data_csv, resized=None)
    val = data.table.subset(data.val[:images])
    hints = [{"frontal": "PA", "lateral": "LL"}.get(p) for p in val.projections]
    train = data.table.subset(data.train[:calibration]) if int8 else None
    return ParityData(f"{data_csv} (validation split, {len(val)} images)", [load_pixels(data.image_root / p) for p in val.image_paths],
                      np.asarray(val.columns(TASK1_LABELS), dtype=np.float64), hints,
                      [load_pixels(data.image_root / p) for p in train.image_paths] if train is not None else None)


def print_parity(console, manifest: dict) -> None:
    """The parity gate's figures, when the build serves anything but onnxruntime FP32."""
    execution = manifest.get("execution", {})
    pipeline = execution.get("pipeline_parity")
    if not pipeline:
        return
    worst = max(manifest["models"].items(), key=lambda item: item[1]["served_parity"]["max_abs_dp"])
    dmap = (f"; mAP {pipeline['mAP_served']:.4f} vs {pipeline['mAP_reference']:.4f} (|dmAP| {pipeline['abs_dmAP']:.4f})"
            if "abs_dmAP" in pipeline else "")
    console.print(f"parity of {execution['execution_provider']} {execution['precision']} against onnxruntime FP32 on "
                  f"{pipeline['images']} images: worst network {worst[0]} max |dlogit| {worst[1]['served_parity']['max_abs_dlogit']:.2e}, "
                  f"max |dp| {worst[1]['served_parity']['max_abs_dp']:.2e}; served pipeline max |dp| {pipeline['max_abs_dp']:.2e}"
                  f"{dmap} (limits |dp| <= {pipeline['limits']['max_dp']:g}, |dmAP| <= {pipeline['limits']['max_dmap']:g})")


def add_operating_points(console, repo: Path, data: Path, policy, release: int) -> None:
    """Choose the operating points on `data`'s validation split, in process, and write them into `repo`'s `release`."""
    from cxrlt.cli.commands.operating_points import print_choice
    from evaluation.operating_points import operating_points_from_data, write_operating_points

    with console.status("choosing operating points on the validation split"):
        choice = operating_points_from_data(repo, data, policy, engine="onnxruntime",
                                            source={"classified_by": "in process (onnxruntime), after build-repo"}, release=release)
    print_choice(console, choice, "val")
    record = write_operating_points(repo, choice.points, release)
    console.print(f"wrote {record['file']} of release {release}; repository_sha256 {record['repository_sha256'][:12]}...")


def add_gate(console, repo: Path, source: Path, percentile: float, release: int) -> None:
    """Fit the out-of-distribution gate on `source`'s images, in process, and write it into `repo`."""
    from evaluation.ood_sets import reference_images
    from exporters.ood_gate import fit_repository_gate

    with console.status("fitting the out-of-distribution gate on the reference images"):
        record = fit_repository_gate(repo, reference_images(source), str(source), percentile=percentile, release=release)
    console.print(f"wrote {record['file']} of release {release}: Mahalanobis distance of the CLIP embeddings, fitted on "
                  f"{record['fit_images']} images, threshold {record['threshold']:.2f} (the {record['percentile']:g}th "
                  f"percentile of {record['heldout_images']} held-out ones); repository_sha256 {record['repository_sha256'][:12]}...")
