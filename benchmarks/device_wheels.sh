#!/usr/bin/env bash
# Fill .whl/ with the wheels that the lent GPU machine (image 'cuda': x86-64, CPython 3.12.3, torch 2.11, no
# network) lacks to run ftmods: a wheel of ftmods itself (built from the working tree: the package-dir mapping of
# ftmods.callbacks / ftmods.datamodules makes the bare source tree unimportable as ftmods), the runtime dependencies
# the image does not have, their transitive dependencies, and DeepSpeed (built here from its sdist, no ops compiled:
# they JIT-build on the device).
#
# Run from the repo root on a machine with registry access:   bash benchmarks/device_wheels.sh
# Re-run after changing ftmods' code: the ftmods wheel is always rebuilt, the other wheels are kept once present.
# Then, on the device (carry [".whl"]), start the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
#
# Env: PYTHON (default .venv/bin/python; must import torch and have setuptools + wheel, for the builds),
#      MAX_MIB (default 60: the carried tree counts towards the device tool's 64 MiB).
set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
MAX_MIB=${MAX_MIB:-60}
WHL=.whl
DEEPSPEED_VERSION=0.19.8  # latest; needs torch>=2.0 (no upper cap), so fine with the image's torch 2.11

# Exact pins: the versions of the dev venv. Everything else they need is in the image (checked at the end).
PINS=(
    # ftmods' runtime deps missing from the image
    open_clip_torch==3.3.0
    diffusers==0.42.1
    datasets==5.2.0
    jsonargparse==4.53.0
    torchdata==0.11.0
    # jsonargparse[signatures]
    docstring_parser==0.18.0
    typeshed_client==2.14.0
    # open_clip_torch
    ftfy==6.3.1
    wcwidth==0.9.4
    # datasets
    dill==0.4.1
    multiprocess==0.70.19
    # diffusers
    importlib_metadata==10.2.0
    lazy-importer==0.1.0
    # deepspeed
    hjson==3.1.0
    pydantic==2.14.3
    pydantic_core==2.50.4
    annotated-types==0.8.0
    typing-inspection==0.4.5
    # pydantic / pydantic-core need typing-extensions>=4.16.0 (the latest); the image's version is not known, so
    # carry it (shadows the image's copy with a version at least as new)
    typing_extensions==4.16.0
)

[[ -f pyproject.toml && -d ftmods && -d callbacks && -d datamodules ]] || { echo "run from the ftmods repo root" >&2; exit 1; }
"$PYTHON" -c 'import torch, setuptools, wheel' || { echo "$PYTHON must import torch, setuptools and wheel" >&2; exit 1; }

# /.whl/ stays out of git (idempotent)
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

mkdir -p "$WHL"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Keep one version of each package: drop any wheel (or stray file) that is not a current pin; ftmods is rebuilt.
"$PYTHON" - "$WHL" "$DEEPSPEED_VERSION" "${PINS[@]}" <<'EOF'
import os, sys
from packaging.utils import canonicalize_name, parse_wheel_filename
whl, ds_version, pins = sys.argv[1], sys.argv[2], sys.argv[3:]
keep = {(canonicalize_name(p.split("==")[0]), p.split("==")[1]) for p in pins}
keep.add(("deepspeed", ds_version))
for f in sorted(os.listdir(whl)):
    path = os.path.join(whl, f)
    try:
        name, version, _, _ = parse_wheel_filename(f)
        ok = (name, str(version)) in keep
    except Exception:
        ok = False
    if not ok and os.path.isfile(path):
        print(f"removing {path}")
        os.remove(path)
EOF

# Pure-python wheels match any platform; binary ones must be cp312 manylinux x86-64.
echo "== downloading ${#PINS[@]} pinned wheels"
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHL" "${PINS[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

# DeepSpeed ships only an sdist: build a pure-python wheel (DS_BUILD_OPS=0; DS_ACCELERATOR=cuda records the CUDA
# accelerator, as a build on a GPU machine would, although this machine has none).
ds_wheel=$WHL/deepspeed-$DEEPSPEED_VERSION-py3-none-any.whl
if [[ ! -f $ds_wheel ]]; then
    echo "== building deepspeed $DEEPSPEED_VERSION"
    DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps \
        --no-build-isolation --no-binary deepspeed "deepspeed==$DEEPSPEED_VERSION" -w "$tmp/ds" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    built=("$tmp"/ds/deepspeed-*.whl)
    [[ ${#built[@]} -eq 1 && $(basename "${built[0]}") == "deepspeed-$DEEPSPEED_VERSION-py3-none-any.whl" ]] \
        || { echo "deepspeed did not build as py3-none-any: ${built[*]}" >&2; exit 1; }
    mv "${built[0]}" "$ds_wheel"
fi

# ftmods from the working tree as it would travel (tracked + untracked-not-ignored files), built out of tree so no
# build/ or egg-info lands in the repo.
echo "== building ftmods"
mkdir -p "$tmp/src"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [[ -e $f ]] && printf '%s\0' "$f"
done | tar --null -T - -cf - | tar -xf - -C "$tmp/src"
"$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation --no-index "$tmp/src" -w "$WHL" \
    >"$tmp/ftmods-build.log" 2>&1 || { cat "$tmp/ftmods-build.log" >&2; exit 1; }
ft_wheel=$(ls "$WHL"/ftmods-*.whl)
ft_files=$(unzip -Z1 "$ft_wheel")
for m in ftmods/__init__.py ftmods/callbacks/__init__.py ftmods/datamodules/__init__.py; do
    grep -qxF "$m" <<<"$ft_files" || { echo "$ft_wheel lacks $m" >&2; exit 1; }
done

# Every Requires-Dist of the carried wheels (markers for CPython 3.12 on Linux x86-64, extras followed) must be met
# by a carried wheel or by a package of the image; one version of each package.
echo "== checking the set"
"$PYTHON" - "$WHL" <<'EOF'
import os, sys, zipfile
from email.parser import Parser
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

# The 'cuda' image's Python packages (device tool's KINDS.md, read 2026-11-17); versions where a session saw them.
IMAGE_VERSIONS = {
    "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "pytorch-lightning": "2.6.6",
    "safetensors": "0.8.0", "sentencepiece": "0.2.2", "tiktoken": "0.14.0", "tokenizers": "0.23.2",
    "torch": "2.11.0", "torchaudio": "2.11.0", "torchmetrics": "1.9.0", "torchvision": "0.26.0",
    "transformers": "5.17.0", "triton": "3.6.0",
}
IMAGE = set(IMAGE_VERSIONS) | set("""
absl-py aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi charset-normalizer
chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit
cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pyyaml
regex requests rich sacrebleu scikit-build-core scikit-image scikit-learn scipy seaborn sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile timm toolz torchdiffeq torch-geometric tqdm treescope typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split())
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
       "os_name": "posix", "platform_machine": "x86_64"}

whl = sys.argv[1]
carried, meta, problems = {}, {}, []
for f in sorted(os.listdir(whl)):
    name, version, _, tags = parse_wheel_filename(f)
    if name in carried:
        problems.append(f"two versions of {name}: {carried[name]} and {version}")
    carried[name] = version
    with zipfile.ZipFile(os.path.join(whl, f)) as z:
        text = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    meta[name] = Parser().parsestr(text)
    rp = meta[name].get("Requires-Python")
    if rp and not SpecifierSet(rp).contains("3.12.3"):
        problems.append(f"{f}: Requires-Python {rp}")
    if not any(t.interpreter in ("py3", "py312", "cp312") or t.abi == "abi3" for t in tags):
        problems.append(f"{f}: not for CPython 3.12")

notes, seen, todo = [], set(), [(n, "") for n in carried]
while todo:
    name, extra = todo.pop()
    if (name, extra) in seen:
        continue
    seen.add((name, extra))
    for line in meta[name].get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate({**ENV, "extra": extra}):
            continue
        dep = canonicalize_name(req.name)
        if dep in carried:
            if not req.specifier.contains(carried[dep], prereleases=True):
                problems.append(f"{name}: needs {req}, carries {carried[dep]}")
            todo += [(dep, e) for e in req.extras]
        elif dep in IMAGE:
            have = IMAGE_VERSIONS.get(dep)
            if have and not req.specifier.contains(Version(have), prereleases=True):
                problems.append(f"{name}: needs {req}, the image has {have}")
            elif not have and str(req.specifier):
                notes.append(f"{name} needs {req} (image version not recorded)")
        else:
            problems.append(f"{name}{'[' + extra + ']' if extra else ''}: needs {req}, in neither .whl nor the image")
for n in sorted(set(carried) & IMAGE):
    notes.append(f"{n} {carried[n]} is carried and shadows the image's copy")
for n in sorted(set(notes)):
    print("note:", n, flush=True)
if problems:
    print("\n".join(["PROBLEMS:"] + sorted(set(problems))), file=sys.stderr)
    sys.exit(1)
print(f"ok: {len(carried)} wheels, one version each, every requirement met by .whl or the image")
EOF

echo "== $WHL"
ls -l "$WHL" | awk 'NR > 1 {printf "%10.1f KiB  %s\n", $5 / 1024, $9}'
total=$(cat "$WHL"/*.whl | wc -c)
awk -v t="$total" -v m="$MAX_MIB" 'BEGIN {printf "total: %.1f MiB (%d bytes; limit %s MiB)\n", t / 1048576, t, m}'
if (( total > MAX_MIB * 1048576 )); then
    echo "$WHL is over $MAX_MIB MiB" >&2
    exit 1
fi
