#!/usr/bin/env bash
# Issue 6's GPU checks prepared for a lent GPU machine (which reaches no network and has a
# small time budget), so the next session with a GPU spends its minutes measuring. Session 25
# ran it on an H200 (experiments/results/throughput_h200.md): `run` took 461 s, `input` 69 s.
#
#   bash experiments/gpu_session.sh fetch   # here, with PyPI: wheels -> .whl/, data -> .devdata/
#   bash experiments/gpu_session.sh run     # on the GPU machine: B/16 bf16 throughput + profile
#   bash experiments/gpu_session.sh input   # on the GPU machine: the input-pipeline benchmark
#
# With the `device` tool, two calls: run(command="bash experiments/gpu_session.sh run",
# timeout_s=590, carry=[".whl"]), then the same with `input` and carry=[".whl",
# ".devdata/tfds_n800_s0_w2"], timeout_s=300. Logs go to $OUT (the tool's folder that comes
# back), or to /tmp/gpu_session without it. Each batch size and the profile have their own
# `timeout`, so a slow compile costs those rows (whatever printed stays in its log), not the
# call. `run` takes ~8 minutes on an H100: 40-60 s of compile per row (XLA's dot merger as is
# and off, at each batch size), 2 rounds of 10 steps a row, then a 3-step profile; `input`
# about a minute (14 workers over 51,200 images). With the machine's start that is most of a
# session's 15 device minutes: run `input` only if `run` left 4 or more.
#
# The machines lent so far (sessions 7 and 13) had Python 3.12 with jax and optax installed
# and lacked flipjax's other dependencies: `fetch` downloads those as Python-$PYVER wheels
# (--no-deps: the ones the machine has are kept) and, with the project's .venv when there is
# one (it needs flipjax's dependencies), builds the 800-image
# `facecaption15m/flat` fixture that `input` reads (experiments/conversion_benchmark.py).
# Environment: PYVER (default 3.12), BATCHES (default "512 768"), PEAK_GFLOPS (default 989000,
# H100/H200 dense bf16), JAX_PLATFORMS (default cuda,cpu).
set -uo pipefail
script="$(realpath "$0")"
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_session}"
DATA=.devdata/tfds_n800_s0_w2
# Not in the machine's image (/work/.library/device/KINDS.md lists it), or (flax) maybe
# another version there.
WHEELS=(grain==0.2.18 array_record==0.8.6 zstandard flax==0.12.12 ml_collections
        tensorflow_datasets==4.9.10 tensorflow_metadata immutabledict toml portpicker
        tensorboardX dm-tree)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

install_wheels() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
}

case "${1:-}" in
  fetch)
    set -e
    python3 -m pip download -q --no-deps --python-version "${PYVER:-3.12}" \
      --implementation cp "${PLATFORMS[@]}" --only-binary=:all: -d .whl "${WHEELS[@]}"
    python3 -m pip wheel -q --no-deps -w .whl promise  # sdist only: built here
    python="$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )"
    "$python" -m experiments.conversion_benchmark --num_images=800 --workers=2 \
      --workdir=.devdata --output=/tmp/gpu_session_conversion.md
    du -sh .whl "$DATA"
    ;;
  run)
    mkdir -p "$OUT"
    install_wheels
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 JAX_PLATFORMS="${JAX_PLATFORMS:-cuda,cpu}"
    { nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
      python3 -c "import sys, jax, flax, optax; print('Python', sys.version.split()[0], \
'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
    } 2>&1 | tee "$OUT/machine.txt"
    flags=(--variants=B/16 --dtype=bfloat16 --steps=10 --rounds=2 --noopen_clip
           --peak_gflops="${PEAK_GFLOPS:-989000}" --layouts=unrolled/none/cudnn --gelus=tanh)
    batches="${BATCHES:-512 768}"
    for batch in $batches; do
      timeout 200 python3 experiments/throughput.py "${flags[@]}" --batch="$batch" \
        --compile_options= --compile_options=xla_gpu_dot_merger_threshold_mb=0 \
        --output="$OUT/throughput_b$batch.md" 2>&1 | tail -n 40 > "$OUT/throughput_b$batch.log"
      cat "$OUT/throughput_b$batch.md" 2> /dev/null || tail -n 15 "$OUT/throughput_b$batch.log"
    done
    timeout 150 python3 experiments/profile_step.py "${flags[@]/--steps=10/--steps=3}" \
      --batch="${batches%% *}" --compile_options=xla_gpu_dot_merger_threshold_mb=0 --top=20 \
      --profile_dir=/tmp/gpu_profile > "$OUT/profile.log" 2>&1
    tail -n 45 "$OUT/profile.log"
    cp /tmp/gpu_profile/train_step.hlo.txt "$OUT/" 2> /dev/null
    ;;
  input)
    mkdir -p "$OUT"
    install_wheels
    timeout 240 python3 -m experiments.input_pipeline_benchmark --data_dir="$DATA" \
      --batch=256 --warmup=20 --batches=200 --repeats=1 --workers=14 --grain_threads=0 \
      --output="$OUT/input_pipeline.md" > "$OUT/input.log" 2>&1
    cat "$OUT/input_pipeline.md" 2> /dev/null || tail -n 20 "$OUT/input.log"
    ;;
  *)
    sed -n '2,/^set -uo/p' "$script" | sed '$d'

    exit 2
    ;;
esac
