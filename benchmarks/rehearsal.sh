#!/usr/bin/env bash
# The T4 rehearsal of issue 17, on the GPU machine, in named stages (several may be given, run in order):
#
#   bash benchmarks/rehearsal.sh build train-a        # 8B model, then notebook/fast/packing + a second headline pair
#   bash benchmarks/rehearsal.sh train-b               # third headline pair with the 60-step job
#   bash benchmarks/rehearsal.sh tests-t4              # the GPU suite under the cap, fp16 (tests-bare: uncapped)
#   bash benchmarks/rehearsal.sh infer                 # decoding: plain generate, for_inference, --cuda_graphs
#   bash benchmarks/rehearsal.sh build train-c         # --fast --packing and hf --fast, beside the notebook config
#   bash benchmarks/rehearsal.sh build profile         # one profiled step at 2 x 4 and 8 x 1 (fast mode's split)
#   bash benchmarks/rehearsal.sh build infer-profile   # one profiled batch-1 generate per decoding path
#   TEST_DTYPE=fp16 TESTS_K=compiled_decoding bash benchmarks/rehearsal.sh tests-bare   # fp16-trained, uncapped
#   SPLIT=test_gpu.py bash benchmarks/rehearsal.sh tests-t4   # x2 kind: half the suite per GPU, in parallel
#
# Run after the bundle prefix of ../shared/gpu/prefix.txt, with `.gpu/` carried: .gpu/t4.sh (a copy of
# ../shared/gpu/t4.sh: MPS caps each process to 10 SMs and 15102 MiB), and, for the tests, .gpu/fixture (the real
# Llama 3.1 tokenizer) and .gpu/llamacpp.tar.gz (llama-cpp-python built with GGML_NATIVE=OFF and its converter).
# Results go to $OUT (JSON after every variant, so a stage cut short keeps what it measured).
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
CACHE=${CACHE:-/tmp/sftkit-bench}
T4="bash .gpu/t4.sh"
train() {  # one invocation: every variant side by side, fp16 as on a T4
  local name=$1; shift
  $T4 python3 benchmarks/bench_train.py --shape llama-3.1-8b --dtype fp16 --steps 8 --warmup 3 --seq_lens "" \
    --cache "$CACHE" --out "$OUT/train-8b-t4-$name.json" "$@" 2>&1 | tee "$OUT/train-8b-t4-$name.log" | grep -v '^{'
}
suite() {  # the GPU tests, output to $1 and stdout, cut at TESTS_TIMEOUT (a call may run 10 minutes)
  local log=$1; shift
  # SIGINT, not TERM: pytest then still reports what ran (a TERM'd run left only its dots). TESTS_R=xXfEP adds
  # the output of passed tests (the compiled-decoding figures)
  timeout -s INT -k 30 "${TESTS_TIMEOUT:-560}" python3 -m pytest -m gpu -q -p no:cacheprovider -r"${TESTS_R:-xXfE}" \
    --durations=8 "$@" 2>&1 \
    | tee "$log"
}
LOG_TAG=${LOG_TAG:-}  # tells apart the logs of runs of one stage in one call
for stage in "$@"; do
  echo "== $stage $(date -u +%T)"
  case $stage in
    build)  # bare: an 8B model initialised in fp32 needs 32 GB, over the rehearsal's cap
      python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); from shapes import make_model
make_model('llama-3.1-8b', Path('$CACHE'))" ;;
    train-a)  # the notebook config on both backends, --fast, --packing, --fast --packing; then the pair again
      train 1 --backends unsloth,hf,unsloth-fast,unsloth-packing,unsloth-fast-packing --fast False
      train 2 --backends unsloth,hf --fast False ;;
    train-c)  # what session 8 could not run: --fast --packing, and fast mode on the plain path (hf-fast)
      train 4 --backends ${TRAIN_C:-unsloth,unsloth-fast,unsloth-fast-packing,hf,hf-fast} --fast False ;;
    train-b)  # the pair a third time, Unsloth for the notebook job's 60 steps (wall time, load to save)
      train 3 --backends unsloth@60,hf --fast False ;;
    profile)  # where a fast-mode step's time goes under the cap (issue 17: --fast reached 1.23x, not 1.5x)
      $T4 python3 benchmarks/profile_step.py --model_dir "$CACHE/llama-3.1-8b" --configs 2x4,8x1 --dtype fp16 \
        --top 20 --out "$OUT/profile-8b-t4.json" 2>&1 | tail -40 ;;
    infer)  # batch 1 and 32, fp16; compiled variants compile per batch size (hf-cudagraphs: the eager kernels
            # recorded into graphs, 0.67x plain generate at batch 1 under the cap in session 10)
      $T4 python3 benchmarks/bench_infer.py --shape llama-3.1-8b --dtype fp16 --cache "$CACHE" \
        --backends ${INFER:-hf-served,unsloth-served,hf-graphs,hf-cudagraphs} --baseline hf-served \
        --new_tokens 64 --batch 32 --repeats 2 \
        --worker_timeout 330 --out "$OUT/infer-8b-t4.json" 2>&1 | tee "$OUT/infer-8b-t4.log" | grep -v '^{' ;;
    infer-profile)  # where a batch-1 token's time goes under the cap (the 3x decoding target)
      $T4 python3 benchmarks/bench_infer.py --shape llama-3.1-8b --dtype fp16 --cache "$CACHE" \
        --backends ${INFER_PROFILE:-hf-served,unsloth-served,hf-cudagraphs} --baseline hf-served \
        --new_tokens 32 --batch 1 --repeats 1 \
        --profile_tokens 16 --worker_timeout 250 --out "$OUT/infer-profile-8b-t4.json" 2>&1 \
        | tee "$OUT/infer-profile-8b-t4.log" | grep -v '^{' ;;
    tests-t4|tests-bare)  # the whole GPU suite: under the cap in fp16 (as a T4 trains), or on the bare GPU. Under
      # the cap it outlasts one call (21 of 25 tests in 570 s): split it by -k over two calls, or, on the x2 kind,
      # SPLIT=EXPR runs -k EXPR on GPU 0 and -k "not (EXPR)" on GPU 1 at once (logs $stage-a, $stage-b)
      [ -e /tmp/lc/.done ] || { mkdir -p /tmp/lc && tar xzf .gpu/llamacpp.tar.gz -C /tmp/lc && touch /tmp/lc/.done; }
      export PYTHONPATH=$PYTHONPATH:/tmp/lc/site LLAMA_CPP_DIR=/tmp/lc/conv LLAMA31_TOKENIZER=$PWD/.gpu/fixture
      # the dtype the test runs train in: fp16 under the cap (a T4's), the GPU's choice bare; TEST_DTYPE sets it
      # either way (auto: the GPU's choice), which tells the cap from the dtype
      dtype=${TEST_DTYPE:-$([ "$stage" = tests-t4 ] && echo fp16 || echo auto)}
      if [ "$dtype" = auto ]; then unset SFTKIT_TEST_DTYPE; else export SFTKIT_TEST_DTYPE=$dtype; fi
      wrap=; [ "$stage" = tests-t4 ] && wrap=$T4
      if [ -n "${SPLIT:-}" ]; then  # one wrap, so one MPS daemon for both halves (t4.sh stops it when it ends)
        LOG=$stage$LOG_TAG $wrap bash "$0" halves; tail -n 14 "$OUT/$stage$LOG_TAG"-[ab].log
      else
        suite "$OUT/$stage$LOG_TAG.log" ${TESTS_K:+-k "$TESTS_K"} | tail -40
      fi ;;
    halves)  # inside tests-*'s wrap: -k SPLIT on GPU 0, the rest on GPU 1. Unsloth writes its compiled modules
             # under the working folder unless told where: a folder per half, or the halves race on the files
      CUDA_VISIBLE_DEVICES=0 UNSLOTH_COMPILE_LOCATION=/tmp/unsloth-cache-a suite "$OUT/$LOG-a.log" -k "$SPLIT" \
        >/dev/null &
      CUDA_VISIBLE_DEVICES=1 UNSLOTH_COMPILE_LOCATION=/tmp/unsloth-cache-b suite "$OUT/$LOG-b.log" -k "not ($SPLIT)" \
        >/dev/null &
      wait ;;
    *) echo "unknown stage $stage (build, train-a, train-b, train-c, profile, infer, infer-profile, tests-t4," \
         "tests-bare)"; exit 2 ;;
  esac
done
