"""bench_gpu.sh --cpu: the GPU script's three steps (parity tests on the device, decode speed against the bandwidth
bound, pretraining throughput) run end to end on the CPU with a tiny model, so the GPU run has only the device to
differ."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent


@pytest.mark.slow
def test_bench_gpu_runs_end_to_end_on_the_cpu():
    r = subprocess.run(["bash", str(ROOT / "bench_gpu.sh"), "--cpu"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert re.search(r"\d+ passed", out) and "failed" not in out                         # 1. parity on the device
    for config in ("flatlm:bfloat16:eager", "flatlm:int8:eager", "flatlm:int4:eager", "flatlm:int4:compiled"):
        row = next(line for line in out.splitlines() if line.startswith(config + " "))  # 2. decode, of the bound
        assert re.search(r" \d+% ", row), row
    assert re.search(r"pretraining: \d+ tokens/s", out)                                  # 3. training


def test_bench_gpu_refuses_an_unknown_argument():
    r = subprocess.run(["bash", str(ROOT / "bench_gpu.sh"), "--gpu"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.startswith("error: unknown argument --gpu")
