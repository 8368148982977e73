"""The CLI's rough edges, each fixed: the extra `cxrlt train` asks for, the demo's sample image
found with no download and no warning, and the demo's one random-weights warning."""

from __future__ import annotations

import argparse
import socket
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cxrlt.cli.main import main, missing_extra
from cxrlt.contract.labels import ALL_LABELS
from cxrlt.io.samples import REAL_CXR, pydicom_data_file


def _missing(name: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(f"No module named '{name}'", name=name)


def test_train_without_torch_asks_for_the_train_extra(monkeypatch, capsys):
    import cxrlt.cli.commands.train as train_command

    def run(args):
        raise _missing("torch")

    monkeypatch.setattr(train_command, "run", run)
    assert main(["train", "--config", "router", "--data", "labels.csv"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'cxrlt-triton[train]'" in err and "torch is not installed" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("module", "command", "extra"), [
    ("torch", "train", "train"), ("sklearn", "train", "train"), ("torch", "zeroshot-proxy", "train"),
    ("torch", "build-repo", "export"), ("pytriton", "serve", "serve"), ("tritonclient", "classify", "client"),
    ("pydicom_data", "demo", "all"), ("torch", "demo", "all"),
    ("locust", "bench", "loadtest"),  # no one extra holds all that bench needs: the module's own
    ("torch", None, "export"),
])
def test_the_extra_named_is_the_commands_when_it_brings_the_module(module, command, extra):
    assert f"pip install 'cxrlt-triton[{extra}]'" in missing_extra(_missing(module), command)


def test_a_module_of_no_extra_gets_no_advice():
    assert missing_extra(_missing("no_such_thing"), "train") is None


def test_the_sample_cxr_is_found_offline_with_no_warning(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("pydicom_data_file tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = pydicom_data_file()
    assert path.name == REAL_CXR and path.is_file() and path.stat().st_size > 7_000_000


def test_a_file_no_package_has_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="pip install pydicom-data"):
        pydicom_data_file("no_such_file.dcm")


def test_the_demo_image_is_the_local_sample():
    from cxrlt.cli.commands.demo import _demo_image

    assert _demo_image() == pydicom_data_file(REAL_CXR)


def _outcome() -> dict:
    result = SimpleNamespace(probabilities={label: 0.5 for label in ALL_LABELS}, hint="PA", hint_used=True,
                             projection="frontal", projection_score=0.9, model_name="cxr_findings", model_version="1",
                             latency_ms=12.0, random_weights=True)
    loaded = SimpleNamespace(pixels=np.zeros((4, 5), np.uint16), dataset=None)
    return {"result": result, "warm": SimpleNamespace(latency_ms=3.0), "loaded": loaded, "endpoint": "127.0.0.1:1"}


def test_the_demo_warns_about_random_weights_once(monkeypatch, capsys, tmp_path):
    from cxrlt.cli.commands import demo

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(demo, "_repository", lambda args, workdir, timings: (tmp_path, {"random_weights": True}))
    monkeypatch.setattr(demo, "_classify_on_server", lambda *args: _outcome())
    args = argparse.Namespace(image=Path("x.dcm"), keep=False, ready_timeout_s=1.0)
    assert demo.run(args) == 0
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert output.count("NOT DIAGNOSTIC") == 1 and output.count("random weights") == 1, output
    assert all(label in captured.out for label in ALL_LABELS) and "hint used: yes" in captured.out


def test_the_demo_prints_no_warning_for_trained_weights(monkeypatch, capsys, tmp_path):
    from cxrlt.cli.commands import demo

    outcome = _outcome()
    outcome["result"].random_weights = False
    monkeypatch.setattr(demo, "_repository", lambda args, workdir, timings: (tmp_path, {"random_weights": False}))
    monkeypatch.setattr(demo, "_classify_on_server", lambda *args: outcome)
    assert demo.run(argparse.Namespace(image=Path("x.dcm"), keep=False, ready_timeout_s=1.0)) == 0
    captured = capsys.readouterr()
    assert "NOT DIAGNOSTIC" not in captured.out + captured.err
