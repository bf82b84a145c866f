"""float8 training (torchao's Float8Linear): emulated on the CPU it runs the code CUDA runs, tracks the fp32 loss
curve on 2 gloo ranks (tensorwise: float8 all-gathers, scales precomputed after each step) and on one process
(rowwise), and its checkpoints hold the fp32 master weights: they resume with float8 off, and the reverse.

What the CPU cannot do: the float8 matmul (torch._scaled_mm is CUDA's), which emulation replaces by a matmul of the
dequantised operands; and gloo refuses float8 tensors in any collective ("Invalid scalar type"). FSDP2 sends a
block's float8 weights together with its LayerNorm and biases as one uint8 buffer, which gloo carries, so the float8
all-gather runs here as on NCCL; a group of float8 weights alone would be all-gathered as float8 and fail on gloo."""
import os
import subprocess
import sys

import pytest
from safetensors import safe_open

from helpers import QUICK, ROOT, run_train, train_losses

pytestmark = pytest.mark.slow  # train.py subprocesses

# e4m3 keeps 3 mantissa bits, so each matmul operand is rounded by up to 2^-4 of its value; the loss is a mean over
# every token's logits, which averages those errors away: in these runs float8 moved it by 0.01-0.1%. The bar is
# issue 25's for the GPU, losses within 1% of the unquantised run's; above 1e-6 shows that float8 really rounded.
TOL = 0.01


def rel(a, b, steps):
    return max(abs(a[s] - b[s]) / b[s] for s in steps)


def header(ckpt_dir):
    """{name: (dtype, shape)} of every tensor in a checkpoint's safetensors files."""
    out = {}
    for name in sorted(os.listdir(ckpt_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(ckpt_dir, name), "pt") as f:
                out.update({k: (str(f.get_slice(k).get_dtype()), f.get_slice(k).get_shape()) for k in f.keys()})
    return out


def test_float8_without_cuda_or_emulation_is_a_one_line_error(tmp_path, tiny_data):
    r = subprocess.run([sys.executable, "train.py", *QUICK, f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'o'}",
                        "--float8=tensorwise"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1
    assert r.stderr.strip() == ("error: float8 needs a CUDA GPU with float8 tensor cores; set float8='' on the CPU "
                                "(float8_emulate=True runs torchao's emulation, for tests)")
    assert not os.path.exists(tmp_path / "o")


def test_float8_tracks_fp32_and_checkpoints_cross_float8_on_and_off(tmp_path, tiny_data):
    base = [*QUICK, f"--data_dir={tiny_data}", "--max_iters=10", "--eval_interval=1000", "--ckpt_interval=5",
            "--batch_size=2"]
    f8 = ["--float8_emulate=True"]

    def train(name, *extra, nproc=2):
        out = str(tmp_path / name)
        return out, run_train([*base, f"--out_dir={out}", *extra], nproc=nproc).stdout

    ref, _ = train("fp32")
    tw, _ = train("tensorwise", "--float8=tensorwise", *f8)
    # one process, micro-batch 4: the same global batch as 2 ranks of 2, from each run's step 5
    on, on_log = train("on", "--fsdp=none", "--batch_size=4", "--float8=rowwise", *f8,
                       f"--resume={ref}/ckpt/step-000005", nproc=1)
    off, off_log = train("off", "--fsdp=none", "--batch_size=4", f"--resume={tw}/ckpt/step-000005", nproc=1)
    ref, tw, on, off = map(train_losses, (ref, tw, on, off))
    assert ref[10] < ref[1] - 1  # it learns
    assert 1e-6 < rel(tw, ref, range(1, 11)) < TOL  # tensorwise, float8 all-gathers over FSDP
    assert 1e-6 < rel(on, ref, range(6, 11)) < TOL  # rowwise, resumed from fp32 weights
    assert rel(off, tw, range(6, 11)) < TOL  # float8 off, resumed from float8 training's weights
    assert "resumed from" in on_log and "resumed from" in off_log and min(on) == 6 and min(off) == 6
    # the same tensors, names, dtypes and shapes either way: fp32 master weights and AdamW state, no float8 scales
    assert header(f"{tmp_path}/tensorwise/ckpt/step-000005") == header(f"{tmp_path}/fp32/ckpt/step-000005")
