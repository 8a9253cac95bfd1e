set -o pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, transformers, sklearn; print('torch', torch.__version__, 'transformers', transformers.__version__, 'sklearn', sklearn.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_ica.py 2>&1 | tee $OUT/pytest_gpu.txt
python3 benchmarks/canica_bench.py --device cuda --layers 32 2>&1 | tee $OUT/canica_gpu.txt
python3 benchmarks/canica_bench.py --device cuda --layers 8 --k 256 2>&1 | tee -a $OUT/canica_gpu.txt
