"""Installed import names live under ``dreamlab.`` only, for regular and editable installs.

``guidance`` and ``renderers`` are unrelated PyPI distributions; installing top-level modules
with those names would break users' environments.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN_TOP_LEVEL = ("guidance", "renderers", "cuda_ext", "assets")

PROBE = """
import importlib.util, json, sys
sys.path = [p for p in sys.path if p not in ('', '.')]
found = {name: importlib.util.find_spec(name) is not None for name in %r}
import dreamlab.guidance, dreamlab.renderers, dreamlab.renderers.gaussians
from dreamlab.priors.builtin import ASSET_DIR
print(json.dumps({"forbidden": found, "guidance": dreamlab.guidance.__file__,
                  "builtin_weights": (ASSET_DIR / "builtin_prior.json").is_file()}))
""" % (FORBIDDEN_TOP_LEVEL,)


def _probe(python: str, cwd: Path, env_path: str | None = None) -> dict:
    import json
    import os

    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if env_path:
        env["PYTHONPATH"] = env_path
    out = subprocess.run(
        [python, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_regular_install_exposes_only_dreamlab(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO)],
        check=True, capture_output=True, text=True,
    )
    top_level = {p.name for p in target.iterdir()}
    assert "dreamlab" in top_level
    assert not top_level & set(FORBIDDEN_TOP_LEVEL), top_level
    result = _probe(sys.executable, tmp_path, env_path=str(target))
    assert not any(result["forbidden"].values()), result
    assert result["guidance"].startswith(str(target))
    assert result["builtin_weights"], "the builtin prior's weights must ship as package data"
    for name in ("rasterizer.cu", "rasterizer.h", "bindings.cpp"):  # built lazily on a GPU
        shipped = target / "dreamlab" / "cuda_ext" / name
        assert shipped.is_file(), f"{name} must ship as package data"


def test_editable_install_exposes_only_dreamlab(tmp_path: Path) -> None:
    # The test environment itself is an editable install (README's command (b)).
    result = _probe(sys.executable, tmp_path)
    assert not any(result["forbidden"].values()), result
    assert Path(result["guidance"]).resolve().parent == REPO / "guidance"
    assert result["builtin_weights"]
