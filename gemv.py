"""gemv.c's matrix-vector kernels for CPU decoding: compiled on first use, swapped in for the linear layers.

    import gemv
    gemv.use_for_decoding(model)    # generate.prepare_for_inference does this on a CPU

The C file is compiled once per CPU and source (cc -O3 -march=native -fopenmp, about a second) into
~/.cache/flatlm (FLATLM_CACHE elsewhere) and loaded with ctypes. Where it cannot be (no C compiler, a CPU without
AVX2, FLATLM_GEMV=0) nothing is swapped and torch's kernels decode, as before.
"""

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
# Up to this many rows (sequences decoding at once, speculative decoding's guesses) the kernels read W once for all
# of them; more rows (a prompt) are a matrix product, for torch's kernels.
MAX_ROWS = 16

_library = None           # the loaded kernels; False once they turned out unavailable


def cache_dir() -> Path:
    return Path(os.environ.get("FLATLM_CACHE", Path.home() / ".cache" / "flatlm"))


def cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def build() -> Path:
    """Compile gemv.c for this CPU (cached by source, flags and CPU); raises RuntimeError with the compiler's
    message if it fails. Written under a temporary name and renamed: a parallel build never loads half a file."""
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *FLAGS, cpu_flags()]).encode()).hexdigest()[:16]
    path = cache_dir() / f"gemv-{key}.so"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True,
                                    text=True)
        except OSError as e:
            raise RuntimeError(f"no C compiler ({compiler}: {e.strerror})") from None
        if result.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {result.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, path)
    return path


def library():
    """The loaded kernels, or None where they are unavailable (said once on stderr, unless switched off)."""
    global _library
    if _library is None:
        _library = False
        if os.environ.get("FLATLM_GEMV", "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
            return None
        if "avx2" not in cpu_flags() or "fma" not in cpu_flags():
            return None
        try:
            lib = ctypes.CDLL(str(build()))
        except (RuntimeError, OSError) as e:
            print(f"gemv: decoding with torch's kernels ({e})", file=sys.stderr)
            return None
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.gemv_f32.argtypes = [p, p, p, p, i64, i64, i64, i32]
        lib.gemv_bf16.argtypes = [p, p, p, p, i64, i64, i64, i32]
        lib.gemv_int8.argtypes = [p, p, p, p, p, i64, i64, i64, i32]
        f32 = ctypes.c_float
        lib.attend_one.argtypes = [p, p, p, p, i32, p, i64, i64, i64, i64, i64, f32, f32, i32]
        for f in (lib.gemv_f32, lib.gemv_bf16, lib.gemv_int8, lib.attend_one):
            f.restype = None
        _library = lib
    return _library or None


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
         bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight.T + bias -> (..., N) in x's dtype (fp32 or bf16). weight (N, K): fp32, bf16, or int8 with a
    bf16 scale (N,) per row; bias (N,) fp32 or None. Computed in fp32, rounded once."""
    N, K = weight.shape
    rows = x.reshape(-1, K)
    rows = rows.contiguous() if x.dtype == torch.float32 else rows.float()      # (M, K) fp32
    y = x.new_empty(*x.shape[:-1], N)
    b = None if bias is None else bias.data_ptr()
    args = (y.data_ptr(), rows.size(0), N, K, x.dtype == torch.bfloat16)
    if weight.dtype == torch.int8:
        library().gemv_int8(rows.data_ptr(), weight.data_ptr(), scale.data_ptr(), b, *args)
    else:
        kernel = library().gemv_f32 if weight.dtype == torch.float32 else library().gemv_bf16
        kernel(rows.data_ptr(), weight.data_ptr(), b, *args)
    return y


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
               softcap: float | None = None) -> torch.Tensor:
    """A model file's attention for one query per sequence, the decode step's: q (B, H, 1, D); k, v (B, K, S, D),
    fp32 or bf16 (the KV cache's rows); mask additive, broadcasting to (B, 1, 1, S), or None (S == 1) -> (B, H, 1, D).
    Computed in fp32 (the model files' explicit path multiplies in q's dtype)."""
    B, H, _, D = q.shape
    K, S = k.size(1), k.size(2)
    if not (k.is_contiguous() and v.is_contiguous()):         # (a cache's rows always are)
        k, v = k.contiguous(), v.contiguous()
    q = q.contiguous()
    mask = torch.zeros(1, S) if mask is None else mask.float().reshape(-1, S).contiguous()   # (1, S) or (B, S)
    y = torch.empty_like(q)
    library().attend_one(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), int(mask.size(0) > 1),
                         y.data_ptr(), B, H, K, S, D, scale, softcap or 0.0, int(q.dtype == torch.bfloat16))
    return y


# gemv and attend_one as operators of torch's, which torch.compile calls as they are (CompiledBlocks): it cannot
# trace into ctypes. Defined with torch.library.Library rather than the custom_op decorator: a call costs about 2 us
# over the function's own instead of 20, and a decode step makes about 150 of them. Eager decoding calls the
# functions directly.
_operators = torch.library.Library("flatlm", "FRAGMENT")
_operators.define("gemv(Tensor x, Tensor weight, Tensor? scale, Tensor? bias) -> Tensor")
_operators.define("attend_one(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, float? softcap) -> Tensor")
_operators.impl("gemv", gemv, "CPU")
_operators.impl("attend_one", attend_one, "CPU")
torch.library.register_fake("flatlm::gemv", lambda x, weight, scale, bias: x.new_empty(*x.shape[:-1], len(weight)))
torch.library.register_fake("flatlm::attend_one", lambda q, k, v, mask, scale, softcap: torch.empty_like(q))


def decode_attention(q, k, v, mask, scale, softcap=None):
    """attend_one, through its operator when torch.compile traces it: what generate.py sets as the model files'
    Attention.decode_attention."""
    attend = torch.ops.flatlm.attend_one if torch.compiler.is_compiling() else attend_one
    return attend(q, k, v, mask, scale, softcap)


class GemvLinear(nn.Module):
    """A linear layer (nn.Linear, or a model file's Int8Linear) that multiplies up to MAX_ROWS rows with gemv.c's
    kernels and more rows with the layer itself. Inference only."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.max_rows = MAX_ROWS                                # generate.Engine raises it to its batch size
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight = layer.weight.detach().contiguous()       # (N, K): row-major, as the kernels read it
        self.scale = getattr(layer, "scale", None)
        self.bias = None if layer.bias is None else layer.bias.detach().float()    # added in fp32, then rounded

    def forward(self, x):
        if x.numel() > self.max_rows * self.in_features or x.requires_grad:
            return self.layer(x)
        multiply = torch.ops.flatlm.gemv if torch.compiler.is_compiling() else gemv
        return multiply(x, self.weight, self.scale, self.bias)


def fits(layer: nn.Module) -> bool:
    """A layer the kernels take: nn.Linear in fp32 or bf16 (even width), or an int8 layer with per-row scales."""
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor) or w.device.type != "cpu" or w.dim() != 2:
        return False
    if type(layer) is nn.Linear:
        return w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and w.size(1) % 2 == 0)
    scale = getattr(layer, "scale", None)
    return w.dtype == torch.int8 and isinstance(scale, torch.Tensor) and scale.shape == (w.size(0),) and \
        scale.dtype == torch.bfloat16


def use_for_decoding(model: nn.Module) -> bool:
    """Swap every layer the kernels take for a GemvLinear wrapping it. False (and nothing swapped) where the kernels
    are unavailable."""
    if library() is None:
        return False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if fits(child):
                setattr(parent, name, GemvLinear(child))
    return True
