#!/usr/bin/env bash
# On a machine with a CUDA GPU: the GPU tests, then issue 18's 320 and 416 px cv grids with --device cuda
# (benchmarks/RESULTS.md, "L2-SP tails on a GPU"). Usage: benchmarks/gpu_checks.sh DATA_DIR OUT_DIR
set -u
data=$1
out=$2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, timm, onnxruntime; print('torch', torch.__version__, 'timm', timm.__version__, \
'onnxruntime', onnxruntime.__version__, 'cuda', torch.cuda.is_available(), 'cpus', __import__('os').cpu_count())"
[ "${TEST_TIMEOUT_S:-100}" = 0 ] || timeout "${TEST_TIMEOUT_S:-100}" python3 -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_l2sp.py \
    2>&1 | tee "$out/pytest.log" | tail -15
for size in ${GRID_SIZES:-320 416}; do
  start=$(date +%s)
  timeout "${GRID_TIMEOUT_S:-220}" python3 -m edge_tl -v cv "$data" --ok-class free --device cuda \
      --grid "benchmarks/cv_grid_magnetic_tile_gpu_$size.yaml" --out "$out/cv_gpu_$size.json" \
      > "$out/cv_gpu_$size.log" 2>&1
  echo "grid $size: exit $? after $(( $(date +%s) - start )) s"
  tail -20 "$out/cv_gpu_$size.log"
done
