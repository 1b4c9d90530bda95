#!/usr/bin/env bash
# One device command for the GPU machine: unpack the carried sites, print versions, then run the
# stages named on the command line, in order, writing everything under $OUT.
#
#   bash bench/gpu.sh tests 1b          # carry: site-tuneboard.tgz site-unsloth.tgz
#
# Stages:
#   tests        pytest -m gpu on the GPU test modules (GPU_TESTS; they need no web stack)
#   1b           throughput, Llama-3.2-1B shape, fixed + variable data, all arms
#   8b           throughput, Llama-3.1-8B shape, fixed + variable data, all arms
#   8b-fixed     the same, fixed-length data only (8b-variable: variable only)
#   8b-capped    8B shape, fixed-length data, the process capped at 22.5 GiB (a 24 GB card)
#   longest      longest single sequence, 8B shape, under a 22.5 GiB cap, all arms
#   longest-caps the same at each of LONGEST_CAPS (default 7.5,11,14.5), every (cap, arm) search
#                at once on the one card (each capped; memory is measured, not speed); LONGEST_SHAPE
#   profile      8B step time and top operators per memory policy (bench/profile_step.py)
#   dpo          DPO pairs/s, 8B shape, 22.5 GiB cap: TRL, Unsloth, Tuneboard (bench/preference.py)
#   smoke        the CPU smoke run (checks the harness itself)
#   ladder-first the consumer ladder's first stage (bench/ladder.py): Qwen2.5-7B, Gemma-2-9B,
#                Llama-3.2-3B, Llama-3.2-1B at 7.5 and 11 GiB, fixed 2048, Unsloth vs Tuneboard
#   ladder       the ladder at every cap (LADDER_CAPS, default 7.5,11,14.5,22.5): Unsloth and the
#                standard recipe run under the largest cap, and their peak decides the smaller
#                ones (their memory does not depend on the cap); Tuneboard at each
#   ladder-CAP   the ladder at one cap (7.5, 11, 14.5, 22.5): LADDER_SHAPES (default all six),
#                LADDER_DATA (default fixed; fixed,variable), BENCH_ARMS; LADDER_ARGS passes options
# Env: GPU_TESTS_S: at most this long for the tests stage. BENCH_BUDGET_S (default 560): the whole command ends by then; arms that would start too
# late are listed as skipped. BENCH_ARMS (default standard,unsloth,tuneboard). BENCH_ARGS: extra
# arguments for every bench/train.py call (e.g. "--steps 5 --warmup 2"). BENCH_DEADLINE: an
# absolute end (epoch seconds) instead of BENCH_BUDGET_S, for several calls in one command.
# STREAM: a name for this run's log/work files, so that two runs (one per GPU, with
# CUDA_VISIBLE_DEVICES) can share one command; see bench/README.md.
# The model cache (/tmp/tuneboard-bench-cache) survives between calls only while the machine
# stays warm; a fresh machine rebuilds it (8B: about a minute on the GPU).
# $OUT gets at most 8 files: gpu.log, work.tgz (every arm's JSON and log) and <stage>.md/.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
DEADLINE=${BENCH_DEADLINE:-$(( $(date +%s) + ${BENCH_BUDGET_S:-560} ))}
STREAM=${STREAM:-}  # a name: this run's log, work dir and work.tgz get it (two runs at once)
WORK=/tmp/tuneboard-bench-work${STREAM:+-$STREAM}
CACHE=/tmp/tuneboard-bench-cache
ARMS=${BENCH_ARMS:-standard,unsloth,tuneboard}
mkdir -p "$WORK" "$CACHE"
exec > >(tee -a "$OUT/gpu${STREAM:+-$STREAM}.log") 2>&1

unpack() {  # tarball, target dir: unpack once per machine (the stamp names the tarball's size)
  local stamp
  [ -f "$1" ] || { echo "missing $1 (carry it)"; return 1; }
  stamp="$2/.unpacked-$(stat -c %s "$1")"
  # One stream unpacks, the other waits for it (two at once broke Unsloth's site on 2026-11-30).
  (
    flock 9
    [ -f "$stamp" ] && exit 0
    rm -rf "$2" && mkdir -p "$2" && tar xzf "$1" -C "$2" && touch "$stamp"
  ) 9>"$2.lock"
}
unpack site-tuneboard.tgz /tmp/site-tuneboard || exit 1
unpack site-unsloth.tgz /tmp/site-unsloth || echo "no Unsloth site: its arm will be skipped"
export PYTHONPATH=$PWD:/tmp/site-tuneboard
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 \
  HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=warning

echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null) stages: $*"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# The host paces our step (bench/RESULTS.md, sessions 9-11): say which CPU and how busy it is.
echo "host: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs," \
  "$(lscpu 2>/dev/null | sed -n 's/^NUMA node(s): *//p') NUMA node(s), load $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - <<'EOF'
import importlib.metadata as m, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for p in ["transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel", "triton", "pydantic",
          "datasets", "safetensors", "tokenizers"]:
    try:
        print(f"  {p} {m.version(p)}")
    except Exception as exc:
        print(f"  {p} missing ({exc})")
EOF

bench() {  # name, then bench/train.py arguments
  local name=$1; shift
  # shellcheck disable=SC2086
  python3 bench/train.py --name "$name" --out "$OUT" --work "$WORK" --cache "$CACHE" \
    --site /tmp/site-tuneboard --unsloth-site /tmp/site-unsloth --arms "$ARMS" \
    --deadline "$DEADLINE" --quiet-children "$@" ${BENCH_ARGS:-}
}

ladder() {  # name, then bench/ladder.py arguments; --reuse: a stage called again resumes
  local name=$1; shift
  # shellcheck disable=SC2086
  python3 bench/ladder.py --name "$name" --out "$OUT" --work "$WORK" --cache "$CACHE" \
    --site /tmp/site-tuneboard --unsloth-site /tmp/site-unsloth --deadline "$DEADLINE" \
    --reuse --quiet-children "$@" ${LADDER_ARGS:-}
}

status=0
for stage in "$@"; do
  left=$(( DEADLINE - $(date +%s) ))
  echo "== stage $stage ($left s left)"
  limit=$(( left > 30 ? left - 20 : 10 ))  # for the stages that run one long process
  case $stage in
    tests)
      limit=$(( limit < ${GPU_TESTS_S:-$limit} ? limit : ${GPU_TESTS_S:-$limit} ))
      # SIGINT: pytest stops and still prints its summary of what ran.
      timeout -s INT -k 20 "$limit" python3 -m pytest -m gpu -q -s -rA -p no:cacheprovider ${GPU_TESTS:-tests/worker/test_gpu_recipe.py tests/worker/test_gpu_preference.py tests/worker/test_gpu_multi.py tests/playground/test_gpu_inference.py tests/worker/test_gpu_evaluation.py tests/worker/test_gpu_kernels.py}
      rc=$?; [ $rc -eq 5 ] && echo "(no GPU tests collected)" && rc=0
      [ $rc -ne 0 ] && status=$rc ;;
    1b) bench throughput-1b --shapes 1b --min-arm-s 30 || status=$? ;;
    8b) bench throughput-8b --shapes 8b --min-arm-s 90 || status=$? ;;
    8b-fixed) bench throughput-8b-fixed --shapes 8b --data fixed --min-arm-s 90 || status=$? ;;
    8b-capped) bench throughput-8b-capped --shapes 8b --data fixed --cap-gib 22.5 --min-arm-s 60 \
      || status=$? ;;
    8b-variable) bench throughput-8b-variable --shapes 8b --data variable --min-arm-s 90 \
      || status=$? ;;
    longest) bench longest-8b --shapes 8b --cap-gib 22.5 --longest --reuse --min-arm-s 60 || status=$? ;;
    longest-caps)  # every (cap, arm) a search of its own, all at once: memory is what they
      # measure, not speed, so they may share the card (LONGEST_CAPS, default 7.5,11,14.5;
      # LONGEST_SHAPE, default 8b; the first search builds the model, the others wait for it)
      shape=${LONGEST_SHAPE:-8b} caps=${LONGEST_CAPS:-7.5,11,14.5} pids=()
      for cap in ${caps//,/ }; do for arm in ${ARMS//,/ }; do
        dir="$WORK/longest-$cap-$arm"; mkdir -p "$dir"
        # shellcheck disable=SC2086
        python3 bench/train.py --name "longest-$shape-$cap-$arm" --out "$dir" --work "$dir" \
          --cache "$CACHE" --site /tmp/site-tuneboard --unsloth-site /tmp/site-unsloth \
          --arms "$arm" --shapes "$shape" --cap-gib "$cap" --longest --reuse \
          --deadline "$DEADLINE" --min-arm-s 30 --quiet-children ${BENCH_ARGS:-} \
          >"$dir/search.log" 2>&1 &
        pids+=($!)
      done; done
      for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
      for f in "$WORK"/longest-*/longest-"$shape"-*.md; do echo "## $(basename "$f" .md)"; cat "$f"
      done | tee "$OUT/longest-caps.md" ;;
    profile) timeout -k 20 "$limit" python3 bench/profile_step.py \
      --shape 8b --cache "$CACHE" --out "$OUT" ${PROFILE_ARGS:-} || status=$? ;;
    dpo) python3 bench/preference.py --shape 8b --cap-gib 22.5 --out "$OUT" --work "$WORK" \
      --cache "$CACHE" --site /tmp/site-tuneboard --unsloth-site /tmp/site-unsloth \
      --deadline "$DEADLINE" ${PREFERENCE_ARGS:-} || status=$? ;;
    smoke) python3 bench/train.py --smoke --name smoke --out "$OUT" --work "$WORK" \
      --cache "$CACHE" || status=$? ;;
    ladder-first) ladder ladder-first --shapes qwen7b,gemma9b,3b,1b --caps 7.5,11 --data fixed \
      --arms "${BENCH_ARMS:-unsloth,tuneboard}" --fit-probes 2 || status=$? ;;
    ladder) ladder ladder --caps "${LADDER_CAPS:-7.5,11,14.5,22.5}" \
      --shapes "${LADDER_SHAPES:-1b,3b,8b,qwen7b,mistral7b,gemma9b}" \
      --data "${LADDER_DATA:-fixed}" --arms "$ARMS" || status=$? ;;
    ladder-7.5|ladder-11|ladder-14.5|ladder-22.5) ladder "$stage" --caps "${stage#ladder-}" \
      --shapes "${LADDER_SHAPES:-1b,3b,8b,qwen7b,mistral7b,gemma9b}" \
      --data "${LADDER_DATA:-fixed}" --arms "$ARMS" || status=$? ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
done
# Per-arm JSON and child logs, one file (adapters and checkpoints under *.run are left out).
tar czf "$OUT/work${STREAM:+-$STREAM}.tgz" -C "$WORK" --exclude='*.run' . 2>/dev/null
echo "== done, status $status, $(( DEADLINE - $(date +%s) )) s to spare"
exit $status
