"""Every folder of Python source ships: an editable install hides a package missing from pyproject, a wheel not."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_source_folder_is_a_listed_package():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = cfg["package-dir"]
    assert set(dirs) == listed
    found = set()
    for pkg, folder in dirs.items():
        if pkg.count(".") != 1:
            continue
        for sub in [ROOT / folder, *(p for p in (ROOT / folder).rglob("*") if p.is_dir())]:
            if "__pycache__" in sub.parts or "default" in sub.relative_to(ROOT).parts:
                continue
            if any(sub.glob("*.py")):
                rel = sub.relative_to(ROOT / folder).parts
                found.add(".".join([pkg, *rel]))
                assert (sub / "__init__.py").is_file(), f"{sub} has modules but no __init__.py"
    missing = found - listed
    assert not missing, f"packages with code that a wheel would leave out: {sorted(missing)}"
