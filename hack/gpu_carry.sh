#!/usr/bin/env bash
# The Python wheels bench/gpu.py needs on the GPU machine and its image lacks, into .whl/ (git-ignored
# through .git/info/exclude), then the size check of the carry.
#
# The machine (an H200, Python 3.12, no network) has torch 2.11, accelerate 1.15, pyarrow, pandas,
# xxhash, huggingface_hub, tokenizers and safetensors, but not trl, bitsandbytes, datasets (nor its dill
# and multiprocess), pydantic (kubetune's API models) or liger-kernel, and transformers 5.17 where
# kubetune is built and tested on 5.24 (regex, typing-extensions and fsspec ride along at the
# versions transformers, pydantic and datasets ask for). Versions are uv.lock's (liger-kernel, not
# locked, is pinned here). bitsandbytes' wheel (43 MB, a library per CUDA version) is slimmed to its CUDA 13 and CPU
# libraries: the machine's torch is a CUDA 13.0 build.
#
# The carry is what travels with a device run: the git working tree (tracked files and untracked ones
# not ignored) plus .whl/. The script fails when it exceeds 64 MiB. Then run bench/gpu.py on the
# machine with carry [".whl"] and the command this prints (also in bench/gpu.py's docstring).
#
#   bash hack/gpu_carry.sh            # PYTHON=... to choose the interpreter whose pip downloads
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHL=.whl
LIMIT=$((64 * 1024 * 1024))

# The locked packages, by name as uv.lock spells them.
LOCKED=(trl bitsandbytes transformers peft datasets dill multiprocess pydantic pydantic-core
	annotated-types typing-inspection typing-extensions regex fsspec)
EXTRA=(liger-kernel==0.8.5)

mapfile -t PINS < <("$PY" - "${LOCKED[@]}" <<'EOF'
import sys, tomllib
with open("uv.lock", "rb") as f:
    lock = tomllib.load(f)
versions = {}
for pkg in lock["package"]:
    versions.setdefault(pkg["name"], set()).add(pkg["version"])
for name in sys.argv[1:]:
    found = versions.get(name)
    if not found or len(found) != 1:
        sys.exit(f"uv.lock: expected one version of {name}, found {sorted(found or [])}")
    print(f"{name}=={found.pop()}")
EOF
)
if ((${#PINS[@]} != ${#LOCKED[@]})); then
	echo "could not read the versions of ${LOCKED[*]} from uv.lock" >&2
	exit 1
fi

mkdir -p "$WHL"
if ! git check-ignore -q "$WHL/probe.whl"; then
	echo "/$WHL/" >>"$(git rev-parse --git-path info/exclude)"
	echo "added /$WHL/ to $(git rev-parse --git-path info/exclude)"
fi
rm -f "$WHL"/*.whl # one version of each: two would stop the install there

PLATFORMS=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
	manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
	PLATFORMS+=(--platform "${p}_x86_64")
done
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
	--implementation cp "${PLATFORMS[@]}" -d "$WHL" "${PINS[@]}" "${EXTRA[@]}"

# bitsandbytes: drop the libraries of other CUDA versions, ROCm and XPU, and their RECORD lines.
"$PY" - "$WHL" <<'EOF'
import glob, re, sys, zipfile, os
(wheel,) = glob.glob(os.path.join(sys.argv[1], "bitsandbytes-*.whl"))
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
drop = re.compile(r"libbitsandbytes_\w+\.so$")
slim = wheel + ".slim"
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    names = [i.filename for i in src.infolist()]
    if not any(keep.search(n) and "cuda130" in n for n in names):
        sys.exit(f"{wheel}: no CUDA 13.0 library; the GPU machine's torch is a CUDA 13.0 build")
    gone = {n for n in names if drop.search(n) and not keep.search(n)}
    for info in src.infolist():
        if info.filename in gone:
            continue
        data = src.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if line.split(",", 1)[0] not in gone).encode()
        dst.writestr(info, data)
os.replace(slim, wheel)
print(f"{os.path.basename(wheel)}: kept {sorted(n.rsplit('/', 1)[-1] for n in names if keep.search(n))}")
EOF

# What travels: the working tree git would send (tracked + untracked-not-ignored) and the wheels.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null |
	awk '{s += $1} END {print s + 0}')
wheels=$(du -cb "$WHL"/*.whl | tail -1 | cut -f1)
total=$((tree + wheels))
ls -l "$WHL"
printf 'carry: working tree %.1f MiB + .whl %.1f MiB = %.1f MiB (limit 64 MiB)\n' \
	"$(echo "$tree / 1048576" | bc -l)" "$(echo "$wheels / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)"
if ((total > LIMIT)); then
	echo "carry over 64 MiB: the device run would be refused" >&2
	exit 1
fi
echo 'device run: carry [".whl"], timeout_s 600, command:'
"$PY" bench/gpu.py --device-command
