"""Files shipped inside the installed packages (templates, prompts, recipes, label maps).

Everything the project reads at run time comes from its own packages through
`importlib.resources`, never from a checkout or a folder beside it, so a wheel install
works exactly like an editable one.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def package_file(package: str, *parts: str) -> Path:
    """The path of a file or folder shipped in `package` (installed on a file system)."""
    path = Path(str(resources.files(package).joinpath(*parts)))
    if not path.exists():
        raise FileNotFoundError(
            f"{'/'.join(parts)} is missing from the installed package {package!r}; reinstall cxrlt-triton"
        )
    return path


def package_root(package: str) -> Path:
    """The folder that holds `package`: the entry a child interpreter needs on sys.path to import it."""
    return Path(str(resources.files(package))).parent
