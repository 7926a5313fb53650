#!/usr/bin/env bash
# Fetch the wheels bench/gpu_check.sh installs on a GPU machine that has PyTorch but no
# package registry (the device tool's image: Python 3.12, x86-64; see its README):
# zarr, numcodecs, dask, distributed, dask-jobqueue and those of their requirements the
# image lacks, at the versions this checkout is tested with. They land in .whl/ (ignored
# by git, carried to the machine: well under its 64 MiB limit).
#
#   bench/gpu_wheels.sh            # then: run bench/gpu_check.sh there, with .whl carried
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  dask==2026.8.0 distributed==2026.8.0 dask-jobqueue==0.9.0
  partd==1.4.2 locket==1.0.0 tblib==3.2.2 tornado==6.6.1 zict==3.0.0 importlib_metadata==10.2.0
)
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl && mkdir .whl
for w in "${WHEELS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 -d .whl "$w"
done
ls -1 .whl
du -sh .whl
