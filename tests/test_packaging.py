"""The one installed name: pyproject.toml lists every package folder of the tree under ``popstack``, maps each room
folder to its package, and the wheel's console scripts name functions that exist. (``make wheel-check`` builds and
installs the wheel and checks site-packages itself.)"""

from __future__ import annotations

import importlib

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

from tests.helpers import ROOT


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def package_name(folder) -> str:
    """The import name of a package folder of the repository, through pyproject.toml's ``package-dir``."""
    rel = folder.relative_to(ROOT).as_posix()
    for name, src in sorted(_setuptools()["tool"]["setuptools"]["package-dir"].items(), key=lambda kv: -len(kv[1])):
        if rel == src or rel.startswith(src + "/"):
            return name + rel[len(src):].replace("/", ".")
    return rel.replace("/", ".")


def test_every_package_folder_is_in_the_wheel():
    listed = set(_setuptools()["tool"]["setuptools"]["packages"])
    mapped = set(_setuptools()["tool"]["setuptools"]["package-dir"].values())
    folders = {p.parent for p in ROOT.glob("**/__init__.py")
               if p.relative_to(ROOT).parts[0] in {"popstack", *mapped}}
    assert {package_name(f) for f in folders} == listed
    assert all(name.split(".")[0] == "popstack" for name in listed)


def test_each_listed_package_imports_under_popstack():
    for name in _setuptools()["tool"]["setuptools"]["packages"]:
        module = importlib.import_module(name)
        assert module.__name__ == name


def test_console_scripts_point_at_functions():
    for script, target in _setuptools()["project"]["scripts"].items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), script


def test_public_api_at_the_top():
    import popstack
    from popstack.pipeline.inference import Predictor

    assert popstack.Predictor is Predictor
    assert callable(popstack.train)
    assert sorted(popstack.__all__) == ["Predictor", "train"]
