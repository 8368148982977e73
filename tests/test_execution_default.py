"""The embedded default of a CPU build: this host's CPU features, the setting `--execution-provider auto`
chooses per profile, the fallback when the parity gate refuses it, and the line `cxrlt serve` prints.
No export and no server: the build itself is replaced where the fallback is checked."""

from __future__ import annotations

import logging

import pytest

from cxrlt.contract.execution import cpu_features, describe_execution, parse_cpu_features
from exporters.execution_default import REFERENCE_SETTING, cpu_default

# Excerpts of /proc/cpuinfo's flags lines.
XEON_AMX = ("flags\t\t: fpu vme sse4_2 avx f16c avx2 avx512f avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile "
            "amx_int8 avx512_fp16 tsc_deadline_timer")
EPYC = ("flags\t\t: fpu vme sse4_2 avx fma bmi1 avx2 smep avx512f avx512dq avx512bw avx512vl avx512_bf16 clzero "
        "avx512vbmi gfni vaes avx512_vnni avx512_bitalg rdpid fsrm")
HASWELL = "flags\t\t: fpu vme sse4_1 sse4_2 avx f16c fma bmi1 avx2 bmi2 erms"
GRAVITON = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"


@pytest.mark.parametrize("text, features", [
    (f"processor\t: 0\n{XEON_AMX}\n\nprocessor\t: 1\n{XEON_AMX}\n",
     ("amx_bf16", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx2")),
    (f"processor\t: 0\nmodel name\t: AMD EPYC\n{EPYC}\n", ("avx512_bf16", "avx512_vnni", "avx2")),
    (HASWELL, ("avx2",)),
    (GRAVITON, ()),  # no flags line: no x86 feature
    ("", ()),
])
def test_cpu_features_are_read_from_the_flags_line(text, features):
    assert parse_cpu_features(text) == features


def test_no_cpuinfo_file_or_another_os_means_no_features(tmp_path, monkeypatch):
    assert cpu_features(tmp_path / "missing") == ()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(EPYC)
    assert cpu_features(cpuinfo) == ("avx512_bf16", "avx512_vnni", "avx2")
    monkeypatch.setattr("sys.platform", "darwin")
    assert cpu_features(tmp_path / "cpuinfo-elsewhere") == ()


def _never_asked() -> bool:
    raise AssertionError("openvino probed where the answer does not depend on it")


OV_BF16, OV_FP32 = ("openvino", "bf16"), ("openvino", "fp32")


@pytest.mark.parametrize("profile, features, openvino, cuda, settings", [
    ("paper", ("amx_bf16", "amx_tile", "avx512_bf16", "avx512_vnni", "avx2"), True, False, (OV_BF16, OV_FP32, REFERENCE_SETTING)),
    ("paper", ("avx512_bf16", "avx512_vnni", "avx2"), True, False, (OV_BF16, OV_FP32, REFERENCE_SETTING)),
    ("paper", ("avx512_vnni", "avx2"), True, False, (OV_FP32, REFERENCE_SETTING)),
    ("paper", ("avx2",), True, False, (OV_FP32, REFERENCE_SETTING)),
    ("paper", (), True, False, (REFERENCE_SETTING,)),  # no AVX2 (or not x86): OpenVINO's gain unmeasured
    ("paper", ("avx512_bf16", "avx2"), False, False, (REFERENCE_SETTING,)),  # OpenVINO cannot run
    ("paper", ("avx512_bf16", "avx2"), None, True, (REFERENCE_SETTING,)),  # CUDA: onnxruntime CUDA, unchanged
    ("tiny", ("amx_bf16", "avx512_bf16", "avx2"), None, False, (REFERENCE_SETTING,)),  # served = reference
])
def test_the_default_per_profile_features_openvino_and_cuda(profile, features, openvino, cuda, settings):
    choice = cpu_default(profile, features, _never_asked if openvino is None else lambda: openvino, cuda)
    assert choice.settings == settings and choice.reason
    assert REFERENCE_SETTING == ("auto", "fp32")  # the last rung: onnxruntime FP32, which no gate refuses


@pytest.fixture
def epyc_host(monkeypatch):
    """This development machine as the choice sees it: avx512_bf16, no AMX, OpenVINO, no CUDA."""
    import exporters.execution_default as default

    monkeypatch.setattr(default, "cpu_features", lambda: ("avx512_bf16", "avx512_vnni", "avx2"))
    monkeypatch.setattr(default, "openvino_runs", lambda: True)
    monkeypatch.setattr(default, "cuda_offered", lambda: False)


def test_auto_without_precision_resolves_before_the_checks_and_explicit_settings_stay(epyc_host):
    from exporters.build_repo import BuildOptions

    paper = BuildOptions(profile="paper")
    assert (paper.execution_provider, paper.precision, paper.fallbacks) == ("openvino", "bf16", (OV_FP32, REFERENCE_SETTING))
    assert paper.execution_choice == {"chosen": "auto", "reason": "bf16 instructions and OpenVINO",
                                      "cpu_features": ["avx512_bf16", "avx512_vnni", "avx2"]}
    tiny = BuildOptions(profile="tiny")
    assert (tiny.execution_provider, tiny.precision, tiny.fallbacks) == ("auto", "fp32", ())
    for explicit in (dict(precision="fp32"), dict(execution_provider="cpu"), dict(execution_provider="openvino", precision="bf16")):
        options = BuildOptions(profile="paper", **explicit)
        assert options.execution_choice is None and options.fallbacks == () and options.precision == explicit.get("precision", "fp32")
    with pytest.raises(ValueError, match="serves precision fp32"):  # auto with a precision is onnxruntime's: fp32 only
        BuildOptions(profile="paper", precision="bf16")


def test_the_cli_tells_an_explicit_precision_from_the_default(tmp_path):
    from cxrlt.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["build-repo", "--out", str(tmp_path)]).precision is None
    assert parser.parse_args(["build-repo", "--out", str(tmp_path), "--precision", "fp32"]).precision == "fp32"


def _refusing(refused_settings, seen):
    """A stand-in for one build at a setting: the parity gate refuses `refused_settings`."""
    from exporters.build_repo import execution_record_of
    from exporters.precision import PrecisionRefused

    def build_at(out, options, step):
        seen.append((options.execution_provider, options.precision))
        (out / f"{options.execution_provider}-{options.precision}.onnx").write_text("served file")
        if (options.execution_provider, options.precision) in refused_settings:
            raise PrecisionRefused(f"ensemble_frontal_pcam: precision {options.precision} on {options.execution_provider} is "
                                   "refused: max |dp| 0.0123 > 0.01 against onnxruntime CPU, FP32")
        return {"release": options.release, "execution": execution_record_of(options)}

    return build_at


def test_a_refused_auto_setting_falls_back_a_step_warns_and_is_recorded(epyc_host, monkeypatch, tmp_path, caplog):
    import exporters.build_repo as build_repo

    seen, steps = [], []
    monkeypatch.setattr(build_repo, "_build_at", _refusing({OV_BF16}, seen))
    with caplog.at_level(logging.WARNING, logger="exporters.execution_default"):
        manifest = build_repo.build_repository(tmp_path / "repo", build_repo.BuildOptions(profile="paper"), steps.append)
    assert seen == [OV_BF16, OV_FP32]
    execution = manifest["execution"]
    assert (execution["execution_provider"], execution["precision"], execution["fallback_from"]) == ("openvino", "fp32", "openvino bf16")
    assert execution["refused"][0]["setting"] == "openvino bf16" and "max |dp| 0.0123 > 0.01" in execution["refused"][0]["gate"]
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["openvino-fp32.onnx"]  # the refused build's files are gone
    assert "refused openvino bf16" in caplog.text and "max |dp| 0.0123" in caplog.text and "falling back to openvino fp32" in caplog.text
    assert any("refused openvino bf16" in step for step in steps)
    assert describe_execution(execution) == ("execution: openvino fp32 (CPU: avx512_bf16 avx512_vnni avx2; chosen by auto: "
                                             "bf16 instructions and OpenVINO; the parity gate refused openvino bf16)")


def test_the_ladder_ends_at_the_reference_and_explicit_settings_fail(epyc_host, monkeypatch, tmp_path):
    import exporters.build_repo as build_repo
    from exporters.onnx_export import ParityError
    from exporters.precision import PrecisionRefused

    seen = []
    monkeypatch.setattr(build_repo, "_build_at", _refusing({OV_BF16, OV_FP32}, seen))
    manifest = build_repo.build_repository(tmp_path / "auto", build_repo.BuildOptions(profile="paper"))
    assert seen == [OV_BF16, OV_FP32, REFERENCE_SETTING]
    assert manifest["execution"]["fallback_from"] == "openvino bf16"
    assert [r["setting"] for r in manifest["execution"]["refused"]] == ["openvino bf16", "openvino fp32"]

    seen.clear()
    with pytest.raises(PrecisionRefused):  # asked for by name: a refusal fails the build, as before
        build_repo.build_repository(tmp_path / "explicit", build_repo.BuildOptions(profile="paper", execution_provider="openvino",
                                                                                   precision="bf16"))
    assert seen == [OV_BF16] and not (tmp_path / "explicit").exists()

    def export_differs(out, options, step):  # an ONNX file that differs from PyTorch is no setting's fault
        seen.append((options.execution_provider, options.precision))
        raise ParityError("projection_router: ONNX differs from PyTorch")

    seen.clear()
    monkeypatch.setattr(build_repo, "_build_at", export_differs)
    with pytest.raises(ParityError, match="ONNX differs"):
        build_repo.build_repository(tmp_path / "export", build_repo.BuildOptions(profile="paper"))
    assert seen == [OV_BF16]


def test_releases_share_the_setting_not_each_ones_parity_figures():
    from exporters.build_repo import _shared

    one = {"execution": {"execution_provider": "openvino", "precision": "bf16", "pipeline_parity": {"max_abs_dp": 1e-3}}}
    two = {"execution": {"execution_provider": "openvino", "precision": "bf16", "pipeline_parity": {"max_abs_dp": 2e-3},
                         "fallback_from": None}}
    assert _shared(one, "execution") == _shared(two, "execution") == {"execution_provider": "openvino", "precision": "bf16"}
    assert _shared({}, "execution") is None and _shared({"profile": "paper"}, "profile") == "paper"


EPYC_AUTO_BF16 = {"execution_provider": "openvino", "precision": "bf16", "chosen": "auto", "reason": "bf16 instructions and OpenVINO",
                  "cpu_features": ["avx512_bf16", "avx512_vnni", "avx2"]}


@pytest.mark.parametrize("record, cuda, line", [
    (EPYC_AUTO_BF16, False, "execution: openvino bf16 (CPU: avx512_bf16 avx512_vnni avx2; chosen by auto: bf16 instructions and OpenVINO)"),
    ({"execution_provider": "auto", "precision": "fp32", "chosen": "auto", "reason": "tiny profile, no gain at 64 px",
      "cpu_features": []}, False,
     "execution: onnxruntime CPU fp32 (CPU: no feature detected; chosen by auto: tiny profile, no gain at 64 px)"),
    ({"execution_provider": "cpu", "precision": "int8"}, False, "execution: onnxruntime CPU int8"),
    ({"execution_provider": "auto", "precision": "fp32"}, True, "execution: onnxruntime CUDA fp32"),
    ({"execution_provider": "auto", "precision": "fp32", "engine": "torchscript"}, False, "execution: PyTorch (torchscript) fp32"),
    (None, False, "execution: onnxruntime CPU fp32"),  # a repository from before the record
])
def test_the_execution_line_names_the_setting(record, cuda, line):
    assert describe_execution(record, cuda) == line


def test_serve_prints_the_setting_and_notes_another_cpu(monkeypatch):
    import cxrlt.cli.commands.serve as serve
    import cxrlt.contract.execution as execution

    monkeypatch.setattr(execution, "cuda_offered", lambda: False)
    monkeypatch.setattr(execution, "cpu_features", lambda: ("avx512_bf16", "avx512_vnni", "avx2"))
    assert serve.execution_lines(EPYC_AUTO_BF16) == [
        "execution: openvino bf16 (CPU: avx512_bf16 avx512_vnni avx2; chosen by auto: bf16 instructions and OpenVINO)"]
    assert serve.execution_lines({"execution_provider": "cpu", "precision": "fp32"}) == ["execution: onnxruntime CPU fp32"]
    monkeypatch.setattr(execution, "cpu_features", lambda: ("avx2",))
    first, note = serve.execution_lines(EPYC_AUTO_BF16)
    assert "auto chose it for a CPU with avx512_bf16 avx512_vnni avx2; this one has avx2" in note
