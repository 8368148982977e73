"""Sample images that ship with installed packages, found on this machine only.

`pydicom.data.get_testdata_file` tries to download a file it does not find locally (and warns
when that fails, e.g. offline); it also checks pydicom-data's files against hashes of its own
release. Here nothing is downloaded and nothing warns: the file is looked up in pydicom's own
test files and in pydicom-data's installed data folder (the `pydicom-data` entry point of
`pydicom.data.external_sources`, which is how pydicom itself finds it), or a clear error says
how to get it.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

# The real chest radiograph the demo, the load tests and the parity checks use: a PA CR,
# 1955 x 1841, MONOCHROME1, 15-bit, uncompressed.
REAL_CXR = "RG1_UNCR.dcm"


def pydicom_data_file(name: str = REAL_CXR) -> Path:
    """The local path of `name` from pydicom's test files or the installed pydicom-data package.

    Never downloads and never warns. Raises FileNotFoundError, naming `pip install pydicom-data`,
    when neither has it.
    """
    for folder in _data_folders():
        matches = sorted(folder.rglob(name))
        if matches:
            return matches[0]
    raise FileNotFoundError(f"{name} is not installed on this machine; `pip install pydicom-data` "
                            "(or the 'all' extra) provides it")


def _data_folders() -> list[Path]:
    """pydicom's own test-file folder, then each installed external data source's folder."""
    folders: list[Path] = []
    try:
        import pydicom.data

        folders.append(Path(pydicom.data.__file__).parent / "test_files")
    except ImportError:
        pass
    sources = sorted(metadata.entry_points(group="pydicom.data.external_sources"),
                     key=lambda entry: entry.name != "pydicom-data")  # pydicom-data first, as pydicom does
    for entry in sources:
        try:
            store = entry.load()()
        except Exception:  # noqa: BLE001 - a broken third-party source is skipped, as if absent
            continue
        data_path = getattr(store, "data_path", None)
        if data_path is not None and Path(data_path).is_dir():
            folders.append(Path(data_path))
    return [folder for folder in folders if folder.is_dir()]
