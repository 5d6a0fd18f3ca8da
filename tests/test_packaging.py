"""Our `kernels/` folder must never shadow Hugging Face's `kernels` package."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.util, importlib.metadata as md, pathlib;"
    "import transformers.utils.import_utils as t, diffusers.utils.import_utils as d;"
    "import tree_kernels.cascade, rollout;"
    "spec = importlib.util.find_spec('kernels');"
    "ours = pathlib.Path(tree_kernels.cascade.__file__).resolve().parent;"
    "origin = spec.origin if spec is not None else None;"
    "hf = importlib.util.find_spec('kernels') is not None and origin is not None;"
    "installed = any(x.metadata['Name'] == 'kernels' for x in md.distributions());"
    "print(origin is None or ours not in pathlib.Path(origin).resolve().parents,"
    " hf == installed, t.is_kernels_available() == installed,"
    " d.is_kernels_available() == installed)"
)


def probe(cwd: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_probes_unaffected_outside_and_inside_the_checkout(tmp_path):
    # Outside the checkout and inside it (cwd on sys.path), `kernels` is Hugging Face's package
    # where it is installed (transformers >= 5.25 requires it) and nothing otherwise: our folder
    # is only a namespace portion, which loses to any real `kernels` package and which
    # transformers and diffusers treat as absent.
    assert probe(tmp_path) == "True True True True"
    assert probe(ROOT) == "True True True True"


def test_the_wheel_builds_without_warnings_and_ships_the_digits_weights(tmp_path):
    # build with the environment's setuptools when it has one (no index round trip)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ there
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".*", "build", "results", "wandb", "*.egg-info", "__pycache__"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, str(src),
         "-w", str(tmp_path)],
        capture_output=True, text=True, check=True,
    )
    assert "absent from the `packages` configuration" not in out.stderr + out.stdout
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rollout/flow/weights/digits_flow.safetensors" in names
    assert "rollout/flow/weights/digits_classifier.safetensors" in names
    # the native library is built on first use, from its sources in the wheel
    for source in ("cascade_cpu_native.cpp", "fused_cpu.cpp", "layer_cpu.cpp", "sample_cpu.cpp",
                   "cpu_vec.h"):
        assert f"tree_kernels/{source}" in names
