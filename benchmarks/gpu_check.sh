# The GPU checks, as one script for a lent GPU machine (torch with CUDA already installed there):
#   bash benchmarks/gpu_check.sh   (writes its outputs under $OUT, or benchmarks/out)
set -o pipefail
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_ica.py 2>&1 | tee "$OUT/pytest_gpu.txt"
python3 benchmarks/canica_bench.py --device cuda --layers 32 2>&1 | tee "$OUT/canica_gpu.txt"
