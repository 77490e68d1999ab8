#!/usr/bin/env bash
# The GPU checks of issue #9, in parts that each fit one 10-minute command of the lent GPU machine.
#
# Here (registry access), once per code change:   bash benchmarks/device_wheels.sh
# There (device tool `run`, carry [".whl"]), one part per call:
#   bash benchmarks/gpu_checks.sh env          # versions, GPU, deepspeed import (about 1 min)
#   bash benchmarks/gpu_checks.sh tiny_fsdp    # every method's tiny config, bf16, BlockFSDPStrategy (FSDP1)
#   bash benchmarks/gpu_checks.sh tiny_zero3   # the same under DeepSpeed ZeRO-3
#   bash benchmarks/gpu_checks.sh real_fsdp    # 0.5B-2.2B random-weight architectures + SFT resume, FSDP1
#   bash benchmarks/gpu_checks.sh real_zero3   # the same under DeepSpeed ZeRO-3
#   bash benchmarks/gpu_checks.sh bench        # SFT / ManyICL throughput, MFU, peak memory (benchmarks/scale.py)
# Logs and JSON go to $OUT (the device tool's return folder), else to ./gpu_checks_out.
set -uo pipefail

part=${1:?usage: gpu_checks.sh env|tiny_fsdp|tiny_zero3|real_fsdp|real_zero3|bench}
case "$part" in env|tiny_fsdp|tiny_zero3|real_fsdp|real_zero3|bench) ;; *) echo "unknown part $part" >&2; exit 2 ;; esac
out=${OUT:-gpu_checks_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FTMODS_CACHE=${FTMODS_CACHE:-/tmp/ftmods-cache}

if [ -d .whl ] && [ -z "${FTMODS_INSTALLED:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

gpu_tests() {  # pytest selection -> $out/<part>.log and a JUnit XML
    RUN_ONLY_GPU_TESTS=1 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider -k "$1" \
        --junitxml "$out/$part.xml" 2>&1 | tee "$out/$part.log"
}

case "$part" in
    env)
        {
            nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
            python3 -m pip show torch lightning transformers peft timm pyarrow fsspec deepspeed diffusers 2>/dev/null \
                | grep -E '^(Name|Version):'
            python3 -c "import torch, ftmods, deepspeed; print(torch.cuda.get_device_name(), ftmods.__file__, deepspeed.__version__)"
        } 2>&1 | tee "$out/env.log"
        ;;
    tiny_fsdp) gpu_tests "test_tiny_config_trains_in_bf16 and fsdp" ;;
    tiny_zero3) gpu_tests "test_tiny_config_trains_in_bf16 and deepspeed_zero3" ;;
    real_fsdp) gpu_tests "(test_real_size_architecture_trains_in_bf16 or test_sft_resumes) and fsdp" ;;
    real_zero3) gpu_tests "(test_real_size_architecture_trains_in_bf16 or test_sft_resumes) and deepspeed_zero3" ;;
    bench)
        python3 benchmarks/scale.py --strategies single,fsdp,fsdp2_model_parallel,deepspeed_zero3 \
            --seq-len 2048 --batch-size 8 --steps 20 --warmup 5 > "$out/scale_qwen2.5-0.5b.json" 2> "$out/scale.err"
        python3 benchmarks/scale.py --model random/llama-3.2-1b --strategies single,fsdp --gradient-checkpointing \
            --seq-len 4096 --batch-size 4 --steps 10 --warmup 3 > "$out/scale_llama-3.2-1b.json" 2>> "$out/scale.err"
        tail -c 4000 "$out/scale.err"
        cat "$out"/scale_*.json
        ;;
esac
