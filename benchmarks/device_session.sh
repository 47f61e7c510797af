#!/usr/bin/env bash
# The GPU checks of issues 9 and 10 in one call of a lent GPU machine (docs/BENCHMARKS.md, docs/COMPRESSION.md).
#
#   bash benchmarks/device_session.sh [--smoke] <carry dir> <out dir> [deadline seconds, default 560]
#
# <carry dir> holds model/ (the embedded MiniLM's config and tokenizer files, weights as fp16 in
# model16.safetensors: 45 MB, so that it travels) and glue/<task>/<split>.parquet for the 7 tasks; made here by
#   bash benchmarks/device_session.sh --prepare .devcarry     (with $FINEGATES_GLUE_DIR set; .devcarry ignored by git)
# and sent with the device tool's run: command `bash benchmarks/device_session.sh .devcarry $OUT`, carry [".devcarry"].
# Order: the timings first, on an otherwise idle GPU (export speedup, train step), then the compression
# frontier (several training processes share the GPU) until the deadline (seconds from the start: the device
# tool allows 600 per command). Each part has its own time limit, and every finished frontier run is already
# in the JSONL, so a part that is stopped still leaves its results in <out dir>.
set -u
convert_weights() {  # SRC DST DTYPE: a safetensors file with its floating-point tensors cast to DTYPE
    python3 - "$@" <<'EOF'
import sys
import torch
from safetensors.torch import load_file, save_file
src, dst, dtype = sys.argv[1:]
sd = load_file(src)
save_file({k: v.to(getattr(torch, dtype)).contiguous() if v.is_floating_point() else v for k, v in sd.items()}, dst)
EOF
}
if [ "${1:-}" = "--prepare" ]; then  # run here (CPU machine): fill the carry dir
    C=${2:?carry dir}; mkdir -p "$C/model" "$C/glue"
    M=$(python -c "import finegates.train as t; print(t.embedded_model_dir())") || exit 1
    for f in config.json special_tokens_map.json tokenizer.json tokenizer_config.json vocab.txt; do cp "$M/$f" "$C/model/"; done
    for t in sst2 mrpc rte stsb cola qnli mnli; do
        mkdir -p "$C/glue/$t"; cp "${FINEGATES_GLUE_DIR:?}/$t/train.parquet" "$FINEGATES_GLUE_DIR/$t"/validation*.parquet "$C/glue/$t/"
    done
    convert_weights "$M/model.safetensors" "$C/model/model16.safetensors" float16
    exit $?
fi
# --smoke: the same steps on this CPU machine at tiny sizes (about 2 minutes), to check the script before a GPU call
DEV=cuda; EXPORT_ARGS=(); STEP_ARGS=(--batch 32 --steps 30 --rounds 5); FRONTIER_ARGS=(--protocol gpu)
COMPILE_STEP_ARGS=(--batch 32 --steps 10 --rounds 3)
if [ "${1:-}" = "--smoke" ]; then
    shift; DEV=cpu; EXPORT_ARGS=(--smoke-test); STEP_ARGS=(--batch 4 --steps 2 --rounds 1); FRONTIER_ARGS=(--smoke-test)
    COMPILE_STEP_ARGS=(--batch 4 --steps 1 --rounds 1 --max-length 16)
    FRONTIER_JOBS=${FRONTIER_JOBS:-2}
fi
C=$(realpath "${1:?carry dir}"); OUT=$(realpath "${2:?out dir}"); DEADLINE=${3:-560}
# for the next GPU, in order of priority (runs go seed by seed and config by config, so the deadline cuts the
# last ones): FineGates-LoRA at 40% started from its teacher at today's defaults (the controller restarting its
# multiplier at each crossing, session 16, at dual lr 0.5, session 17, the recovery starting once the gates reach the
# target, --max-recovery-frac 0.45, session 20), at 60% the same (the moonshot), at 40% and 60% with the recovery at
# the fixed 30% (the defaults of sessions 17-19), at 40% with the slower controller of session 16 and without the
# restart (the default of sessions 13-15), and from the pretrained model, gates only at target 0 from the teacher (the
# lambda-0 goal at today's defaults), the cheaper FineGates-LoRA (LoRA in the Q and V gates, session 7), and
# FineGates-LoRA with all of the closing at the pin (before session 9), against LoRA, on two seeds
CONFIGS=${FRONTIER_CONFIGS:-lora,fgl-40-kdinit-dr-dl5-w45,fgl-60-kdinit-dr-dl5-w45,fgl-40-kdinit-dr-dl5,fgl-60-kdinit-dr-dl5,fgl-40-kdinit-dr,fgl-40-kdinit,fgl-40-kd,fg-0-kdinit,fglqv-40-kd,fgl-40-kd-atpin}
SEEDS=${FRONTIER_SEEDS:-1948,7}
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 FINEGATES_GLUE_DIR=$C/glue
MODEL=/tmp/finegates-minilm
mkdir -p "$MODEL" && cp "$C"/model/*.json "$C"/model/vocab.txt "$MODEL"/
convert_weights "$C/model/model16.safetensors" "$MODEL/model.safetensors" float32 || exit 1
{ date -u; git log -1 --format='commit %H' 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"; } \
  2>&1 | tee "$OUT/device.txt"
t0=$SECONDS
for closure in scattered equal; do
    timeout 150 python3 benchmarks/export_speedup.py --device $DEV --model "$MODEL" --closure "$closure" "${EXPORT_ARGS[@]}" \
        2>&1 | tee "$OUT/export_speedup_$closure.txt"
done
echo "export speedup: $((SECONDS - t0)) s"; t0=$SECONDS
timeout 150 python3 benchmarks/throughput.py --device $DEV --model "$MODEL" "${STEP_ARGS[@]}" \
    2>&1 | tee "$OUT/throughput_gpu.txt"
echo "train step: $((SECONDS - t0)) s"; t0=$SECONDS
# the same step under torch.compile, FineGates-LoRA and LoRA (session 12: on the CPU it gains nothing; on a GPU,
# where the step is bound by the ops it launches, fusing the gates' element-wise ops is what it could win);
# appended to the same file (the device tool returns 8 files at most)
timeout 180 python3 benchmarks/throughput.py --device $DEV --model "$MODEL" "${COMPILE_STEP_ARGS[@]}" --compile \
    --only "finegates-lora (coupled, r=8)" 2>&1 | tee -a "$OUT/throughput_gpu.txt"
echo "train step, compiled: $((SECONDS - t0)) s"; t0=$SECONDS
rm -rf /tmp/finegates-teachers /tmp/frontier-preds
FT=$((DEADLINE - SECONDS)); echo "frontier: $FT s left"
timeout "$FT" python3 benchmarks/compression_frontier.py "${FRONTIER_ARGS[@]}" --model "$MODEL" --data-dir "$C/glue" \
    --jsonl "$OUT/frontier-gpu.jsonl" --teacher-cache /tmp/finegates-teachers --jobs "${FRONTIER_JOBS:-10}" \
    --configs "$CONFIGS" --seeds "$SEEDS" --predictions-dir /tmp/frontier-preds > "$OUT/frontier.log" 2>&1
echo "frontier: rc $? in $((SECONDS - t0)) s, $(wc -l < "$OUT/frontier-gpu.jsonl") rows"
# one file for all the runs' whole-validation predictions (the device tool returns 8 files at most):
# here, `tar xzf preds.tgz -C runs/preds-gpu && python benchmarks/heldout_coverage.py runs/preds-gpu`
tar czf "$OUT/preds.tgz" -C /tmp/frontier-preds . 2>/dev/null
python3 benchmarks/compression_frontier.py "${FRONTIER_ARGS[@]}" --jsonl "$OUT/frontier-gpu.jsonl" --table-only \
    --configs "$CONFIGS" --seeds "$SEEDS" --per-seed --predictions-dir /tmp/frontier-preds --budgets 0.01,0.02 \
    2>&1 | tee "$OUT/frontier_table.txt"
