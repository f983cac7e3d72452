#!/usr/bin/env bash
# The one command sent to a lent GPU machine (docs/gpu.md), with the kit carried:
#
#   make device-kit                       # here, once: .whl/ (about 9 MiB)
#   device run, carry [".whl"]:  bash bench/device/run_on_device.sh
#
# Installs the kit with `pip install --no-index --no-deps --target` (the machine is offline),
# runs the image's own python3 and torch with only the kit on PYTHONPATH (no venv, the
# checkout's abmll_tune kept off the path: the check runs the installed package), prints
# the versions it found, runs bench/device/gpu_check.py within --budget-s seconds (default 480:
# 8 of the call's 10 minutes) and, beside it, the bf16 training test on the machine's CPU
# (torch there is not the one pinned here). JSON and logs go to $OUT when it is set
# (bench_results/device otherwise).
#
#   bash bench/device/run_on_device.sh --cpu-smoke --kit DIR --python PY   # the rehearsal here
#                                                                   # (make device-rehearsal)
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)

budget_s=480
kit=.whl
python=${PYTHON:-python3}
smoke=()
bf16_test=1
while [ $# -gt 0 ]; do
    case "$1" in
    --cpu-smoke) smoke=(--cpu-smoke) ;;
    --budget-s) budget_s=$2; shift ;;
    --kit) kit=$2; shift ;;
    --python) python=$2; shift ;;
    --no-bf16-test) bf16_test=0 ;;
    *)
        echo "usage: bash bench/device/run_on_device.sh [--cpu-smoke] [--budget-s S] [--kit DIR] [--python PY] [--no-bf16-test]" >&2
        exit 2
        ;;
    esac
    shift
done

out=${OUT:-$REPO/bench_results/device}
mkdir -p "$out"
log=$out/device_run.log
: >"$log"
exec > >(tee -a "$log") 2>&1
started=$(date +%s)
say() { echo "[run_on_device +$(($(date +%s) - started))s] $*"; }

shopt -s nullglob
wheels=("$kit"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    say "no wheels in $kit: run 'make device-kit' here and carry $kit"
    exit 3
fi
# a kit built from other sources would run old code beside this tree's configs
if ! "$python" bench/device/device_kit.py --check-kit "$kit"; then
    exit 3
fi
site=$(mktemp -d)/site
say "installing ${#wheels[@]} wheels from $kit into $site"
if ! "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$site" "${wheels[@]}"; then
    say "the kit did not install (one wheel per package? built for this Python?)"
    exit 3
fi
# only the kit on the path: the image's packages come from the interpreter's own
# site-packages, and neither the checkout nor a project venv can shadow the installed copy
export PYTHONPATH=$site
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR=
# (run from the kit's folder: `python -` puts the current directory first on the path)
(cd "$(dirname "$site")" && "$python" -) <<'EOF' || { say "the kit's packages do not import"; exit 3; }
import importlib.metadata as md, sys, torch
import torchtune.training, torchtune.datasets, datasets, omegaconf  # noqa: F401
import abmll_tune.recipes
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for name in ("abmll-tune", "torchtune", "torchao", "torchdata", "omegaconf", "datasets",
             "huggingface-hub", "numpy", "pyarrow", "fsspec", "safetensors", "tiktoken"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} MISSING")
print("abmll_tune.recipes from", abmll_tune.recipes.__path__[0])
EOF

# The bf16 training test on this machine's CPU, in the background (4 threads: the GPU
# parts are launch- and GPU-bound), so that torch's version there is measured too.
bf16_pid=
if [ $bf16_test = 1 ] && [ ${#smoke[@]} -eq 0 ] && "$python" -c "import pytest" 2>/dev/null; then
    say "bf16 test on the CPU, in the background: $out/bf16_test.log"
    OMP_NUM_THREADS=4 timeout -s INT $((budget_s - 30)) "$python" -m pytest -q -rA -p no:cacheprovider \
        "tests/test_training_paths.py::test_bf16_trains_with_finite_losses_near_fp32" \
        >"$out/bf16_test.log" 2>&1 &
    bf16_pid=$!
fi

say "gpu_check, budget ${budget_s} s"
# the check stops itself at its budget; the timeout is the guard (SIGTERM: the JSON keeps
# the parts that finished; SIGKILL 20 s later if it does not end)
timeout -k 20 $((budget_s + 60)) "$python" bench/device/gpu_check.py "${smoke[@]}" \
    --budget-s "$budget_s" --out "$out/gpu_check.json"
status=$?
if [ -n "$bf16_pid" ]; then
    wait "$bf16_pid"
    say "bf16 test exit $?: $(tail -n 1 "$out/bf16_test.log")"
    grep -E "bf16 NLL" "$out/bf16_test.log" || true
fi
say "gpu_check exit $status; JSON: $out/gpu_check.json"
exit $status
