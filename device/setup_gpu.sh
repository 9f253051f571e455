#!/usr/bin/env bash
# Installs this package on the lent GPU machine (torch 2.11 / Python 3.12 there, no network):
# the few dependencies its image lacks come as wheels carried in device_payload/wheels
# (made by `python scripts/prepare_device_payload.py`; WHEELS: another folder of them, e.g. the few a
# training run needs when the carry is short of room), then this checkout without dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps "${WHEELS:-device_payload/wheels}"/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e .
python3 -c "import torch, hrmedseg.models, hrmedseg.training; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
