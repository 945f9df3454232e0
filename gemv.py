"""gemv.c's matrix-vector kernels for CPU decoding: compiled on first use, swapped in for the linear layers.

    import gemv
    gemv.use_for_decoding(model)    # generate.prepare_for_inference does this on a CPU

gemv.c (the kernels, C) and gemv_ops.cpp (their torch operators, flatlm::gemv, attend_one, rope_attend, rms_norm,
and decode_block, a whole decoder block from C++) are compiled once per CPU, source and torch version (cc and c++
-O3 -march=native -fopenmp, against the headers torch ships; about 15 s) into ~/.cache/flatlm (FLATLM_CACHE
elsewhere) and loaded with torch.ops.load_library. Where they cannot be (no compiler, a CPU without AVX2,
FLATLM_GEMV=0) nothing is swapped and torch's kernels decode, as before.
"""

import functools
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.cpp_extension

SOURCES = [Path(__file__).with_name("gemv.c"), Path(__file__).with_name("gemv_ops.cpp")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC"]
# Up to this many rows (sequences decoding at once, speculative decoding's guesses) the kernels read W once for all
# of them; more rows (a prompt) are a matrix product, for torch's kernels. But gemv's kernels take any number of rows
# where they measured faster than torch's (SmolLM2's block matrices, 30 layers, on a 2-core AVX2 EPYC; fast_rows()):
# bf16 weights on a CPU without bf16 instructions (no AVX-512 BF16 or AMX), where torch's bf16 matmul converts its
# blocks to fp32 and back (40 rows: 157 ms against 543), and int8 weights on a CPU without AVX-512 (40 rows: 101 ms
# against torch._weight_int8pack_mm's 151-154; 200 rows: 413-471 against 615-763).
MAX_ROWS = 16

_library = None           # True once loaded; False once the kernels turned out unavailable


def cache_dir() -> Path:
    return Path(os.environ.get("FLATLM_CACHE", Path.home() / ".cache" / "flatlm"))


@functools.cache
def cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def _compile(command: list[str]):
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        raise RuntimeError(f"no compiler ({command[0]}: {e.strerror})") from None
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
        raise RuntimeError(f"{command[0]} failed: {errors[:1]}")


def build() -> Path:
    """Compile gemv.c and gemv_ops.cpp into one library for this CPU and torch (cached by sources, compilers, flags,
    CPU and torch version); raises RuntimeError with the compiler's first error if it fails. Written under a
    temporary name and renamed: a parallel build never loads half a file."""
    cc, cxx = os.environ.get("CC", "cc"), os.environ.get("CXX", "c++")
    torch_dir = Path(torch.__file__).parent
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    key = "\0".join([*(f.read_text() for f in SOURCES), cc, cxx, *FLAGS, abi, cpu_flags(), torch.__version__])
    path = cache_dir() / f"gemv-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        obj = tmp.with_suffix(".o")
        try:
            _compile([cc, *FLAGS, "-c", str(SOURCES[0]), "-o", str(obj)])
            _compile([cxx, *FLAGS, "-shared", "-std=c++17", abi, *(f"-I{d}" for d in
                      torch.utils.cpp_extension.include_paths()), str(SOURCES[1]), str(obj), "-o", str(tmp),
                      f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", "-lm"])
            os.replace(tmp, path)
        finally:
            obj.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
    return path


def library() -> bool:
    """Whether the kernels are loaded (their operators registered); where they are unavailable, why is said once on
    stderr (unless switched off)."""
    global _library
    if _library is None:
        _library = False
        if os.environ.get("FLATLM_GEMV", "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
            return False
        if "avx2" not in cpu_flags() or "fma" not in cpu_flags():
            return False
        try:
            torch.ops.load_library(str(build()))
        except (RuntimeError, OSError) as e:
            print(f"gemv: decoding with torch's kernels ({e})", file=sys.stderr)
            return False
        # Shapes for torch.compile, which traces the operators without running them
        torch.library.register_fake("flatlm::gemv", lambda x, weight, scale, bias, glu=0:
                                    x.new_empty(*x.shape[:-1], weight.size(0) // (2 if glu else 1)))
        torch.library.register_fake("flatlm::attend_one", lambda q, k, v, mask, scale, softcap: torch.empty_like(q))
        torch.library.register_fake("flatlm::rms_norm", lambda x, weight, eps, offset: torch.empty_like(x))
        _library = True
    return _library


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
         bias: torch.Tensor | None = None, glu: int = 0) -> torch.Tensor:
    """x (..., K) @ weight.T + bias -> (..., N) in x's dtype (fp32 or bf16). weight (N, K): fp32, bf16, or int8 with a
    bf16 scale (N,) per row; bias (N,) fp32 or None. Computed in fp32, rounded once. glu (GLU_SILU, GLU_GELU_TANH):
    weight is a gated MLP's gate_up (the gates' rows, then the ups'), and the result its hidden layer act(gate) * up,
    (..., N / 2), rounded where the model files' ops round it."""
    library()
    return torch.ops.flatlm.gemv.default(x, weight, scale, bias, glu)


GLU_SILU, GLU_GELU_TANH = 1, 2          # gemv.c's activations for a gated MLP: silu, and GELU's tanh form


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
               softcap: float | None = None) -> torch.Tensor:
    """A model file's attention for one query per sequence, the decode step's: q (B, H, 1, D); k, v (B, K, S, D),
    fp32 or bf16 (the KV cache's rows); mask additive, broadcasting to (B, 1, 1, S), or None (S == 1) -> (B, H, 1, D).
    Computed in fp32 (the model files' explicit path multiplies in q's dtype)."""
    library()
    return torch.ops.flatlm.attend_one.default(q, k, v, mask, scale, softcap)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The model files' RoPE (their apply_rope): x (..., D), cos and sin (..., R) with R <= D and the sin's first half
    negated; the channel pairs (i, i + R/2) of the first R rotate, x * cos + roll(x, R/2) * sin, and the channels from
    R on stay as they are (Phi-2's partial rotary)."""
    R = cos.size(-1)
    rotated = x[..., :R] * cos + x[..., :R].roll(R // 2, dims=-1) * sin
    return rotated if R == x.size(-1) else torch.cat([rotated, x[..., R:]], dim=-1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     cache: nn.Module, input_pos: torch.Tensor, rows: slice, mask: torch.Tensor | None, scale: float,
                     softcap: float | None = None) -> torch.Tensor:
    """What generate.py's CPU decoding sets as the model files' Attention.decode_attention: their attention for one
    query per sequence, from q (B, H, 1, D) and k, v (B, K, 1, D) before RoPE (Attention.heads without cos and sin):
    RoPE on q and k, k and v written into the layer's KVCache (cache) rows `rows` at input_pos ((1,) or (B, 1)), and
    attention over those rows with mask, scale and softcap (Gemma 2) -> (B, H, 1, D). One kernel call (rope_attend)
    where it can: in torch RoPE and the cache write are about 15 small ops a layer (eager SmolLM2-135M on a 2-core
    EPYC, alternating processes, ms a token: int8 11.4 -> 10.6, bf16 17.5 -> 15.7). Inside torch.compile (which fuses
    them itself), rope, the cache's own update and attend_one."""
    dtype = q.dtype
    if not torch.compiler.is_compiling() and rows.step in (None, 1) and (rows.start or 0) >= 0 and \
            cache.k.dtype == dtype and cos.dtype == dtype and cache.k.is_contiguous() and cache.v.is_contiguous():
        return torch.ops.flatlm.rope_attend.default(q, k, v, cos, sin, cache.k, cache.v, rows.start or 0, input_pos,
                                                    mask, scale, softcap)
    k, v = cache.update(input_pos, rope(k, cos, sin), v, rows)
    return attend_one(rope(q, cos, sin), k, v, mask, scale, softcap)


_rope_fits: dict[type, bool] = {}


def rope_fits(attention: nn.Module) -> bool:
    """Whether this attention layer's class (a model file's Attention, or a fork's) rotates q and k as rope does, so
    that decode_attention may stand in for it: its heads(x, cos, sin) against rope on heads(x, None, None) (q, k and
    v before RoPE), on random values, once per class. A fork that rotates otherwise (interleaved pairs, say) keeps its
    own code."""
    kind = type(attention)
    if kind not in _rope_fits:
        _rope_fits[kind] = False
        qkv, config = getattr(attention, "qkv", None), getattr(attention, "config", None)
        cache = getattr(attention, "kv_cache", None)
        weight = getattr(qkv, "weight", None)
        dtype = cache.k.dtype if cache is not None else weight.dtype if weight is not None and \
            weight.is_floating_point() else torch.float32
        try:
            with torch.no_grad():
                generator = torch.Generator().manual_seed(0)
                x = torch.randn(2, 1, qkv.in_features, generator=generator).to(dtype)
                angles = 6 * torch.rand(1, config.head_dim // 2, generator=generator)
                cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(dtype)
                sin = torch.cat([-angles.sin(), angles.sin()], dim=-1).to(dtype)
                q, k, v = attention.heads(x, None, None)
                got = rope(q, cos, sin), rope(k, cos, sin), v
                expected = attention.heads(x, cos, sin)
                _rope_fits[kind] = len(expected) == 3 and all(torch.equal(a, b) for a, b in zip(got, expected))
        except Exception:                        # not a model file's Attention: heads needs cos and sin, or more
            pass
    return _rope_fits[kind]


def fast_rows(dtype: torch.dtype) -> bool:
    """Whether gemv's kernels multiply any number of rows faster than torch's here, for weights of this dtype."""
    if dtype == torch.bfloat16:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.int8 and "avx512f" not in cpu_flags()


class GemvLinear(nn.Module):
    """A linear layer (nn.Linear, or a model file's Int8Linear or Int4Linear) that multiplies up to MAX_ROWS rows with
    gemv.c's kernels (any number where fast_rows says so) and more rows with the layer itself. Inference only."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        # generate.Engine raises max_rows to its batch size
        self.max_rows = sys.maxsize if fast_rows(layer.weight.dtype) else MAX_ROWS
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight = layer.weight.detach().contiguous()       # (N, K): row-major, as the kernels read it
        self.scale = getattr(layer, "scale", None)
        self.bias = None if layer.bias is None else layer.bias.detach().float()    # added in fp32, then rounded
        if self.weight.dtype == torch.uint8:                   # int4, packed for torch's kernel: unpacked for ours
            rows = int4_rows(layer)
            self.weight, self.scale = rows if rows else (None, None)
            self.max_rows = self.max_rows if rows else 0      # (a packing it cannot read: the layer does it all)

    def forward(self, x):
        if x.numel() > self.max_rows * self.in_features or x.requires_grad:
            return self.layer(x)
        return torch.ops.flatlm.gemv.default(x, self.weight, self.scale, self.bias)


class GemvRMSNorm(nn.Module):
    """A model file's RMSNorm computed by one kernel call (torch's is five to seven small ops: 20-40 us a call on a
    2-core EPYC, 61 calls a SmolLM2 token). offset: how the weight scales the normalised row, 0 for weight * n (Llama,
    Qwen, Phi-3), 1 for (1 + weight) * n (Gemma); use_for_decoding finds it by trying both against the norm itself.
    Inside torch.compile the norm's own ops run, for inductor to fuse with their neighbours. Inference only."""

    def __init__(self, norm: nn.Module, offset: int):
        super().__init__()
        self.norm, self.offset = norm, offset
        self.weight, self.eps = norm.weight.detach(), float(norm.eps)

    def forward(self, x):
        if x.requires_grad or x.dtype != self.weight.dtype or torch.compiler.is_compiling():
            return self.norm(x)
        return torch.ops.flatlm.rms_norm.default(x, self.weight, self.eps, self.offset)


def rms_norm_offset(norm: nn.Module) -> int | None:
    """The offset (see GemvRMSNorm) with which the kernel computes what this norm computes, on a few random rows in
    its own dtype: None for a norm that is neither (a LayerNorm, a model file's norm edited into something else)."""
    w, eps = getattr(norm, "weight", None), getattr(norm, "eps", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.device.type != "cpu" or not isinstance(eps, float) or \
            w.dtype not in (torch.float32, torch.bfloat16) or getattr(norm, "bias", None) is not None or not library():
        return None
    with torch.no_grad():
        x = torch.randn(3, w.numel(), generator=torch.Generator().manual_seed(0)).to(w.dtype)
        try:
            expected = norm(x).float()
        except Exception:                        # not a norm over the last dimension
            return None
        tolerance = (1e-5 if w.dtype == torch.float32 else 1e-2) * (expected.abs().max() + 1)
        for offset in (0, 1):
            got = torch.ops.flatlm.rms_norm.default(x, w.detach(), eps, offset).float()
            if got.shape == expected.shape and (got - expected).abs().max() <= tolerance:
                return offset
    return None


class GemvGLU(nn.Module):
    """A model file's gated MLP, down(act(gate) * up) with gate and up from one gate_up layer, whose hidden layer comes
    from one kernel call (gemv's glu) when its gate_up (a GemvLinear) would use the kernel: torch's chunk, activation
    and product are three more ops and a 2 x intermediate-wide tensor in memory. glu: the activation, which
    use_for_decoding finds by trying both against the MLP itself. Inference only."""

    def __init__(self, mlp: nn.Module, glu: int):
        super().__init__()
        self.mlp, self.glu = mlp, glu

    def forward(self, x):
        gate_up = self.mlp.gate_up
        if x.numel() > gate_up.max_rows * gate_up.in_features or x.requires_grad:
            return self.mlp(x)
        return self.mlp.down(torch.ops.flatlm.gemv.default(x, gate_up.weight, gate_up.scale, gate_up.bias, self.glu))


def glu_activation(mlp: nn.Module) -> int | None:
    """The glu (see GemvGLU) with which the kernel computes what this MLP computes, tried on a few random rows: None
    for an MLP that is not down(act(gate) * up) over a GemvLinear gate_up (Phi-2's ungated MLP, a fork's edit)."""
    gate_up, down = getattr(mlp, "gate_up", None), getattr(mlp, "down", None)
    if not isinstance(gate_up, GemvLinear) or gate_up.weight is None or not isinstance(down, nn.Module) or \
            gate_up.out_features % 2:
        return None
    with torch.no_grad():                  # fp32 rows, large enough that silu and GELU differ by far more than rounding
        dtype = gate_up.weight.dtype if gate_up.weight.is_floating_point() else torch.float32     # (int8: fp32 x)
        x = (4 * torch.randn(3, gate_up.in_features, generator=torch.Generator().manual_seed(0))).to(dtype)
        try:
            expected = mlp(x).float()
            errors = {glu: (GemvGLU(mlp, glu)(x).float() - expected).abs().max() for glu in (GLU_SILU, GLU_GELU_TANH)}
        except Exception:                  # not an MLP over the last dimension
            return None
    glu = min(errors, key=errors.get)
    tolerance = (1e-5 if dtype == torch.float32 else 2e-2) * (expected.abs().max() + 1)
    return glu if errors[glu] <= tolerance else None


class DecodeBlock:
    """A model file's decoder block for one token per sequence as one kernel call (flatlm::decode_block): its norms,
    qkv, decode_attention, o, MLP and residual adds (and where the block has them, Qwen 3's and Gemma 3's q and k
    norms, Gemma 2's and 3's norms after attention and MLP, Phi-2's LayerNorm, parallel attention and MLP and ungated
    MLP), the same kernels in the same order as the block's own forward through this file's modules, without the ~40
    calls from Python a block that forward makes (about 100 us a block on a 2-core EPYC: a quarter of an int8
    SmolLM2-135M token). What generate.explicit_attention sets as a block's forward while decoding, for a block built
    of gemv's modules whose RoPE fits (decode_block finds them). Its first call computes the block's own forward too,
    returns that, and keeps to the block's own forward for good if the two differ in a single bit: a block that
    computes otherwise (a fork's edit) runs as written."""

    NORMS = (("attn_norm",), ("mlp_norm",), ("attn", "q_norm"), ("attn", "k_norm"), ("post_attn_norm",),
             ("post_mlp_norm",))                  # flatlm::decode_block's order; all but the first may be absent

    def __init__(self, block: nn.Module, norms: list, mlp: tuple):
        self.block, self.checked, self.fits = block, False, True
        attn = block.attn
        self.attn, self.linears = attn, (attn.qkv, attn.o, *mlp[:2])
        self.glu, self.parallel = mlp[2], bool(getattr(block, "parallel", False))
        self.norms = [None if n is None else n.weight.detach() for n in norms]
        self.norm_biases = [n.bias.detach() if isinstance(n, nn.LayerNorm) else None for n in norms]
        self.eps = [0.0 if n is None else float(n.eps) for n in norms]
        self.offsets = [-1 if isinstance(n, nn.LayerNorm) else 0 if n is None else n.offset for n in norms]
        self.weights = [linear.weight for linear in self.linears]
        self.scales = [linear.scale for linear in self.linears]
        self.biases = [linear.bias for linear in self.linears]
        c = attn.config
        self.heads = c.n_head, c.n_kv_head, c.head_dim
        self.scale = float(getattr(attn, "scale", c.head_dim ** -0.5))
        self.softcap = getattr(c, "attn_softcap", None)

    def __call__(self, x, cos, sin, mask, input_pos=None, cache_rows=None):
        B, T, _ = x.shape
        cache = self.attn.kv_cache
        rows = slice(0, B) if cache_rows is None else cache_rows
        if not self.fits or T != 1 or input_pos is None or cache is None or x.requires_grad or \
                x.dtype != self.norms[0].dtype or B > min(linear.max_rows for linear in self.linears) or \
                rows.step not in (None, 1) or (rows.start or 0) < 0 or cache.k.dtype != x.dtype or \
                cos.dtype != x.dtype:
            return type(self.block).forward(self.block, x, cos, sin, mask, input_pos, cache_rows)
        y = torch.ops.flatlm.decode_block.default(
            x, self.norms, self.norm_biases, self.eps, self.offsets, self.weights, self.scales, self.biases, self.glu,
            self.parallel, cos, sin, cache.k, cache.v, rows.start or 0, input_pos, mask, self.scale, self.softcap,
            *self.heads)
        if not self.checked:           # (the block's own forward writes the same cache positions, after the kernel)
            own = type(self.block).forward(self.block, x, cos, sin, mask, input_pos, cache_rows)
            self.checked, self.fits = True, torch.equal(y, own)
            if not self.fits:
                vars(self.block)["_decode_block"] = None
            return own
        return y


def decode_block(block: nn.Module) -> DecodeBlock | None:
    """The block's DecodeBlock (made on first use, kept on the block), or None for a block that is not built as one
    needs or whose first call differed from its own forward."""
    fast = vars(block).get("_decode_block", False)
    if fast is False:
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        norms = []
        for path in DecodeBlock.NORMS:
            module = block
            for name in path:
                module = getattr(module, name, None)
            norms.append(None if module is None or type(module) is nn.Identity else module)
        if isinstance(mlp, GemvGLU):                      # a gated MLP, or an ungated GELU one (Phi-2's)
            linears = mlp.mlp.gate_up, mlp.mlp.down, mlp.glu
        else:
            linears = getattr(mlp, "up", None), getattr(mlp, "down", None), 0
        fits = norms[0] is not None and all(
            n is None or isinstance(n, GemvRMSNorm) or (type(n) is nn.LayerNorm and n.weight is not None and
                                                        n.bias is not None and n.weight.dim() == 1) for n in norms) \
            and all(isinstance(linear, GemvLinear) for linear in (getattr(attn, "qkv", None), getattr(attn, "o", None),
                                                                   *linears[:2])) \
            and all(hasattr(getattr(attn, "config", None), name) for name in ("n_head", "n_kv_head", "head_dim")) \
            and (norms[1] is not None or getattr(block, "parallel", False)) and rope_fits(attn)
        fast = vars(block)["_decode_block"] = DecodeBlock(block, norms, linears) if fits else None
    return fast


def int4_order(N: int, K: int) -> torch.Tensor | None:
    """Where torch's CPU int4 packing (the model files' Int4Linear) puts each value of an (N, K) matrix: for each
    4-bit half of the packed bytes (the low half first), the index n * K + k of its value. Found by packing matrices
    whose values spell out their own index, four bits at a time; None if the packing is not an order of the values."""
    index = torch.arange(N * K)
    source = torch.zeros(N * K, dtype=torch.int64)
    for shift in range(0, max((N * K - 1).bit_length(), 1), 4):
        packed = torch._convert_weight_to_int4pack_for_cpu(((index >> shift) & 15).to(torch.int32).view(N, K), 1)
        if packed.numel() * 2 != N * K:
            return None
        source |= nibbles(packed).long() << shift
    return source if torch.equal(source.sort().values, index) else None


_int4_orders = functools.cache(int4_order)      # one per shape, a model's layers share a few (cleared after each swap)


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Bytes -> their 4-bit halves, the low half first"""
    flat = packed.flatten()
    return torch.stack([flat & 15, flat >> 4], dim=-1).flatten()


def int4_rows(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A model file's Int4Linear in gemv.c's int4 layout: its values q in [0, 15] (w = (q - 8) * scale + zero), 16
    bytes per 32, byte i holding value i in its low half and value i + 16 in its high half, and its (scale,
    zero - 8 * scale) pairs per output row, fp32 (N, K / G, 2): what the kernel multiplies and adds, with no
    conversion per block. Checked against the layer itself on random rows; None where it does not agree (a packing
    this cannot read)."""
    N, K, G = layer.out_features, layer.in_features, layer.group_size
    if (order := _int4_orders(N, K)) is None:
        return None
    q = torch.empty(N * K, dtype=torch.uint8)
    q[order] = nibbles(layer.weight)
    halves = q.view(N, K // 32, 2, 16)                       # blocks of 32: values 0-15, 16-31
    weight = (halves[:, :, 0] | halves[:, :, 1] << 4).reshape(N, K // 2).contiguous()
    scale, zero = layer.scale_zero.float().transpose(0, 1).unbind(-1)              # (K / G, N, 2) -> (N, K / G) x 2
    scale_zero = torch.stack([scale, zero - 8 * scale], dim=-1).contiguous()
    with torch.no_grad():
        x = torch.randn(2, K, generator=torch.Generator().manual_seed(0))
        ours = torch.ops.flatlm.gemv.default(x, weight, scale_zero, None)
        theirs = layer(x) - (0 if layer.bias is None else layer.bias)              # (rounded through bf16)
        if (ours - theirs).abs().max() > 2e-2 * (theirs.abs().max() + 1):
            return None
    return weight, scale_zero


def fits(layer: nn.Module) -> bool:
    """A layer the kernels take: nn.Linear in fp32 or bf16 (even width), an int8 layer with per-row scales, or an
    int4 one (a model file's Int4Linear on a CPU) with groups of a power of two from 32 on."""
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor) or w.device.type != "cpu" or w.dim() != 2:
        return False
    if type(layer) is nn.Linear:
        return w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and w.size(1) % 2 == 0)
    if w.dtype == torch.uint8:
        G, scale_zero = getattr(layer, "group_size", 0), getattr(layer, "scale_zero", None)
        return isinstance(G, int) and G >= 32 and G & (G - 1) == 0 and layer.in_features % G == 0 and \
            isinstance(scale_zero, torch.Tensor) and scale_zero.dtype == torch.bfloat16 and \
            scale_zero.shape == (layer.in_features // G, layer.out_features, 2)
    scale = getattr(layer, "scale", None)
    return w.dtype == torch.int8 and isinstance(scale, torch.Tensor) and scale.shape == (w.size(0),) and \
        scale.dtype == torch.bfloat16


def use_for_decoding(model: nn.Module) -> bool:
    """Swap every layer the kernels take for a GemvLinear wrapping it, every RMSNorm for a GemvRMSNorm, and then every
    gated MLP for a GemvGLU. False (and nothing swapped) where the kernels are unavailable."""
    if not library():
        return False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if fits(child):
                setattr(parent, name, GemvLinear(child))
            elif type(child).__name__ == "RMSNorm" and (offset := rms_norm_offset(child)) is not None:
                setattr(parent, name, GemvRMSNorm(child, offset))
    _int4_orders.cache_clear()                  # (an 8B model's are hundreds of MB: not kept after its layers)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "MLP" and (glu := glu_activation(child)) is not None:
                setattr(parent, name, GemvGLU(child, glu))
    return True
