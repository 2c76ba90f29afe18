"""The cpu target's instruction-level choices, end to end: loops GCC vectorises (and at which width),
kernels on the calling thread, exact divisions and powers, float64 sigmoid in eager's form."""

from __future__ import annotations

import math
import re
import subprocess

import pytest
import torch
import torch.nn.functional as F
from cpu_kernel_check import SIZES, Fn, _ln, run_both
from hypothesis import given, settings
from hypothesis import strategies as hs

from cost_model import cpu_spec
from runtime import build
from runtime.graph import compile_program
from stitch_ir.importer import import_model


def test_generated_source_names_its_ops_and_vectorises(tmp_path):
    model = Fn(_ln, torch.randn(64), torch.randn(64)).eval()
    prog = import_model(model, (torch.randn(32, 64),))
    g = compile_program(prog, device_spec=cpu_spec(measure=False))
    (step,) = [s for s in g.steps if s.kind == "kernel"]
    src = step.source.source
    assert src.startswith("// stitch kernel") and "// from st ops: st.var" in src
    assert src.count("#pragma omp simd reduction") >= 2
    path = tmp_path / "k.cpp"
    path.write_text(src)
    flags = [f for f in build.default_flags() if f not in ("-shared",)]
    r = subprocess.run([build.compiler(), *flags, "-c", str(path), "-o", str(tmp_path / "k.o"),
                        "-fopt-info-vec-optimized"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("loop vectorized") >= 3, r.stderr


@settings(max_examples=4, deadline=None)
@given(SIZES, hs.sampled_from([5, 33, 1000]))
def test_quotient_feeding_round_is_an_exact_division(a, c):
    """Divisions stay IEEE divisions (no hoisted reciprocal): quantisation's round(x / s)
    rounds exactly as eager, and so does softmax's x / sum."""
    x = torch.randn(a, c) * 3

    def quant(x):
        s = x.abs().amax(-1, keepdim=True) / 127
        return torch.round(x / s).clamp(-128, 127) * s

    g = run_both(quant, [x], atol=0, rtol=0)
    src = "".join(s.source.source for s in g.steps if s.kind == "kernel")
    assert "st.round" in src and "(float)1 /" not in src
    g = run_both(lambda x: (torch.exp(x) / torch.exp(x).sum(-1, keepdim=True), x / 8), [x])
    src = "".join(s.source.source for s in g.steps if s.kind == "kernel")
    assert "(float)1 /" not in src and "* (0.125f)" in src  # x / 8 is an exact multiply


def test_tiny_kernels_run_on_the_calling_thread():
    """The schedule gives a kernel too small to pay for a thread team the calling thread alone
    (no parallel region at all: a serialised one costs ~0.45 us in libgomp, 100x the loop of a
    tiny kernel); a large one gets the team."""
    small = run_both(lambda x, y: torch.relu(x * y + 1), [torch.randn(4, 5), torch.randn(4, 5)])
    large = run_both(lambda x, y: torch.relu(x * y + 1),
                     [torch.randn(512, 1024), torch.randn(512, 1024)])
    (ks,) = [s for s in small.steps if s.kind == "kernel"]
    (kl,) = [s for s in large.steps if s.kind == "kernel"]
    assert "#pragma omp parallel" not in ks.source.source and "on the calling thread" in \
        ks.source.source
    assert "#pragma omp parallel reduction(|:err)" in kl.source.source


@pytest.mark.parametrize("e", [2, 3, 0.5, -1, -2, 1.5])
def test_pow_by_a_constant_is_eager_bit_for_bit(e):
    """The exponents eager special-cases (2, 3, 0.5, -1, -2) are multiplications, a square root
    or a division, as eager computes them: the same bits, and a loop that vectorises (no powf)."""
    x = torch.randn(33, 129) * 3
    # torch's own sqrt (and powf) on this cpu is not correctly rounded: an ulp off numpy's
    # IEEE square root on ~3% of values, which the kernel's vsqrtps matches
    tol = 2.5e-7 if e in (0.5, 1.5) else 0
    g = run_both(lambda x: torch.pow(x, e) + 1, [x], atol=tol, rtol=tol)
    src = "".join(s.source.source for s in g.steps if s.kind == "kernel")
    assert ("std::pow" in src) == (e == 1.5)


def _avx512() -> bool:
    """Whether the kernels' own flags (-march=native) target AVX-512: the compiler says."""
    r = subprocess.run([build.compiler(), *build.default_flags(), "-dM", "-E", "-x", "c++", "-"],
                       input="", capture_output=True, text=True)
    return "__AVX512F__" in r.stdout


def test_teamed_kernels_use_512_bit_vectors(tmp_path):
    """A kernel with a thread team and long rows is compiled preferring 512-bit vectors (GCC's
    x86 default is 256 even with AVX-512; a float16 quantise round trip ran 1.4x faster at 16
    lanes); one on the calling thread, or with rows of 32, keeps the default. Batched into one
    translation unit they build and give eager's results (the push / pop pairs balance)."""
    def quant(x):
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-6) / 127
        return torch.clamp(torch.round(x / s), -128, 127) * s

    large = run_both(quant, [torch.randn(512, 1024).half() * 2], atol=0, rtol=0)
    small = run_both(quant, [torch.randn(3, 37).half() * 2], atol=0, rtol=0)
    short = run_both(quant, [torch.randn(16384, 32).half() * 2], atol=0, rtol=0)
    (kl,) = [s for s in large.steps if s.kind == "kernel"]
    (ks,) = [s for s in small.steps if s.kind == "kernel"]
    (kr,) = [s for s in short.steps if s.kind == "kernel"]
    assert 'target("prefer-vector-width=512")' in kl.source.source
    assert "prefer-vector-width" not in ks.source.source
    assert "omp parallel" in kr.source.source and "prefer-vector-width" not in kr.source.source
    body = ks.source.source + "\n" + kl.source.body + "\n" + ks.source.body.replace(
        ks.source.symbol, ks.source.symbol + "_again")
    src = tmp_path / "k.cpp"
    src.write_text(body)
    out = subprocess.run([build.compiler(), *build.default_flags(), "-fopt-info-vec",
                          str(src), "-o", str(tmp_path / "k.so")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    if not _avx512() or "clang" in build.compiler():
        pytest.skip("the 512-bit preference needs GCC on a cpu with AVX-512")
    first = len(ks.source.source.splitlines()) + 1  # the large kernel's lines in k.cpp
    last = first + len(kl.source.body.splitlines())
    widths = {(first <= int(rep.split("k.cpp:")[1].split(":")[0]) < last, rep.split("using ")[1])
              for rep in out.stderr.splitlines() if "loop vectorized using" in rep}
    assert (True, "64 byte vectors") in widths, sorted(widths)
    if _default_vector_bytes(tmp_path) < 64:  # GCC's tuning for an AMD Zen 4 / 5 takes 512 bits
        assert (False, "64 byte vectors") not in widths, sorted(widths)


def _default_vector_bytes(tmp_path) -> int:
    """The widest vectors GCC uses for a plain float loop under the kernels' flags (its tuning
    for the cpu decides: 32 on the Intel cores it knows even with AVX-512, 64 for znver3 and
    later tunings where AVX-512 is enabled)."""
    src = tmp_path / "plain.cpp"
    src.write_text("void f(float* __restrict a, const float* __restrict b, int n) {\n"
                   "  for (int i = 0; i < n; ++i) a[i] = b[i] * 2.f + 1.f;\n}\n")
    out = subprocess.run([build.compiler(), *build.default_flags(), "-fopt-info-vec", str(src),
                          "-o", str(tmp_path / "plain.so")], capture_output=True, text=True)
    return max([int(w) for w in re.findall(r"using (\d+) byte vectors", out.stderr)] or [0])


def test_wide_vectors_look_at_innermost_loops_only():
    """The 512-bit choice reads the innermost simd loops' trip counts: a simd pragma on a loop
    of 4 groups around loops of 512 (a group norm's statistics) does not keep it narrow."""
    from codegen.cpp.kernel import _innermost_trips, wide_loops
    src = """
      #pragma omp simd
      for (int64_t i1_1 = 0; i1_1 < 4; ++i1_1) {
        for (int64_t k = 0; k < 4; ++k) {
          #pragma omp simd reduction(+:a)
          for (int64_t j = 0; j < 512; ++j) { a += x[j]; }
        }
      }
      #pragma omp simd
      for (int64_t j = 0; j < n; ++j) { y[j] = 0; }
    """
    assert _innermost_trips(src) == [512] and wide_loops(src)
    assert not wide_loops(src + "#pragma omp simd\n for (int64_t j = 0; j < 32; ++j) {}")
    assert not wide_loops("#pragma omp simd\n for (int64_t j = 0; j < n; ++j) {}")


def test_float64_sigmoid_is_eagers_form():
    """float64 sigmoid is 1 / (1 + e^-x) as eager computes it: 0 below -709.78, where e^-x
    overflows (the e^-|x| form gave subnormals there, which eager never does), and within a few
    ulp elsewhere."""
    x = torch.cat([torch.randn(997, dtype=torch.float64) * 40,
                   torch.tensor([-720.0, -745.5, -709.9, -709.0, -1e4, -float("inf"),
                                 float("inf"), float("nan"), 0.0, 36.0], dtype=torch.float64)])
    run_both(lambda x: torch.sigmoid(x) * 2, [x], atol=0, rtol=1e-15)


def test_bool_mask_softmax_vectorises(tmp_path):
    """A bool input is read as bytes: every row loop of a masked softmax vectorises (a ``bool``
    load made GCC give up on if-conversion: branchy scalar code, slower with random masks)."""
    x, m = torch.randn(7, 300), torch.rand(7, 300) < 0.3
    g = run_both(lambda x, m: x.masked_fill(m, float("-inf")).softmax(-1), [x, m])
    (k,) = [s for s in g.steps if s.kind == "kernel"]
    assert "const uint8_t* __restrict in0" in k.source.source
    lines = [n for n, text in enumerate(k.source.source.splitlines(), 1)
             if "for (int64_t j = 0;" in text]
    assert len(lines) >= 2
    assert not _scalar_loops(tmp_path, k.source.source, lines)  # every row loop


def _scalar_loops(tmp_path, source: str, lines: list[int]) -> list[int]:
    """Those of the loops at ``lines`` (1-based) of ``source`` that GCC does not vectorise under
    the kernels' flags (it reports the pragma's, the loop's or the body's line)."""
    src = tmp_path / "k.cpp"
    src.write_text(source)
    out = subprocess.run([build.compiler(), *build.default_flags(), "-fopt-info-vec-all",
                          str(src), "-o", str(tmp_path / "k.so")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    def at(what: str) -> set[int]:
        return {int(rep.split("k.cpp:")[1].split(":")[0]) for rep in out.stderr.splitlines()
                if "k.cpp:" in rep and what in rep}

    # GCC reports a loop at its own line or its body's first. The pragma's line does not count:
    # a loop with a reduction clause has its simd lanes' set-up reported there, vectorised
    # whatever the loop itself does (a scalar gather passed as vectorised that way).
    done = at("optimized: loop vectorized")
    return [n for n in lines if not done & {n, n + 1}]


@pytest.mark.parametrize("dtype,n", [(torch.float32, 16), (torch.float32, 64), (torch.float64, 8),
                                     (torch.float32, 24)])
def test_power_of_two_strided_reads_vectorise(tmp_path, dtype, n):
    """A read along the vector loop with a constant power-of-two stride of 64 bytes or more (a
    small transpose: bert-tiny's attention backward reads a 16x16 score tile both ways) keeps
    its loop vectorised: GCC 12 vectorises no loop with such a load written as a constant, so
    the kernel reads the stride from an opaque variable. Other strides stay constants."""
    x, y = torch.randn(6, n, n, dtype=dtype), torch.randn(6, n, n, dtype=dtype)
    g = run_both(lambda x, y: torch.exp(x.transpose(-1, -2) * 0.5 - y) * y + x, [x, y])
    (k,) = [s for s in g.steps if s.kind == "kernel"]
    pow2 = n * dtype.itemsize >= 64 and n & (n - 1) == 0
    assert (f"st_opaque({n})" in k.source.source) == pow2
    lines = [n for n, text in enumerate(k.source.source.splitlines(), 1)
             if re.search(r"for \(int64_t i\d+_\d+ = 0; i\d+_\d+ < \d+; ", text)
             and "#pragma omp simd" in k.source.source.splitlines()[n - 2]]
    assert lines, k.source.source
    scalar = _scalar_loops(tmp_path, k.source.source, lines)  # of every simd loop
    assert not scalar, (scalar, k.source.source[-1500:])


@pytest.mark.parametrize("shape, dims", [((1, 6, 5, 7), (0, 2, 3)), ((6, 8, 16), (1, 2)),
                                         ((1, 3, 4, 33), (0, 2, 3))])
def test_rows_over_merged_dims_load_contiguously(tmp_path, shape, dims):
    """A row that spans several contiguous dims (a batch norm's statistics of one image: each
    channel's [H, W] plane) is read through the vector loop's own index: no ``/`` or ``%`` per
    element, and every simd loop vectorises. The row's split indices had been temporaries the
    read re-linearised as ``(j1_0)*W + (j1_1)``: rcrn's var over [1, 128, 32, 32] ran 232 us
    where inductor takes 38."""
    x = torch.randn(*shape) * 2 + 1
    g = run_both(lambda x: torch.var(x, dim=dims, correction=0) + x.sum(dims), [x])
    (k,) = [s for s in g.steps if s.kind == "kernel"]
    src = k.source.source.splitlines()
    lines = [n for n, text in enumerate(src, 1)
             if re.search(r"for \(int64_t j = 0; j < \d+; ", text) and "omp simd" in src[n - 2]]
    assert lines, k.source.source
    bodies = "\n".join("\n".join(src[n:n + 4]) for n in lines)
    assert " % " not in bodies and "j1_" not in bodies, bodies
    assert not _scalar_loops(tmp_path, k.source.source, lines), k.source.source


@pytest.mark.parametrize("shape", [(2, 7, 37, 1), (3, 5, 1, 1), (1, 1, 1), (4, 1)])
def test_trailing_unit_dims_leave_the_vector_loop_to_the_last_real_dim(tmp_path, shape):
    """A result with trailing dims of 1 (rffs_net's points as a 1-wide image, [2, 320, 256, 1],
    a concatenation then unsqueezed) loops over its last dim that has a length: a loop of one
    had left the row scalar (659 us where 26 were due)."""
    a, b = torch.randn(*shape), torch.randn(*shape)
    g = run_both(lambda a, b: torch.cat([a, b * 2], 1).unsqueeze(-1) * 3, [a, b])
    (k,) = [s for s in g.steps if s.kind == "kernel"]
    src = k.source.source.splitlines()
    lines = [n for n, text in enumerate(src, 1) if "#pragma omp simd" in src[n - 2]
             and text.lstrip().startswith("for (")]
    assert lines and not any(re.search(r"< 1; \+\+", src[n - 1]) for n in lines), k.source.source
    if math.prod(shape) > 8:
        assert not _scalar_loops(tmp_path, k.source.source, lines), k.source.source


def test_gathered_indices_divide_in_32_bits(tmp_path):
    """An index read from a tensor and clamped into a small range is a 32-bit temporary, so the
    reshape after the gather divides it by constants in vector registers (AdderNet's unfolded
    convolution: a padded map flattened, gathered by an im2col index, ``(ix / 34) % 34``); with
    64-bit indices GCC has no vector multiply-high for the division. Values as eager, including
    the padded border."""
    x = torch.randn(2, 3, 7, 9)
    idx = torch.randint(0, 3 * 9 * 11, (5, 40))

    def unfold(x, idx):
        flat = F.pad(x, (1, 1, 1, 1)).reshape(2, -1)
        return flat.index_select(1, idx.reshape(-1)).reshape(2, 5, 40) * 1.5

    g = run_both(unfold, [x, idx])
    (k,) = [s for s in g.steps if s.kind == "kernel"]
    src = k.source.source
    assert re.search(r"const int32_t ix\d+ = \(\(ix\d+ < 0 \|\| ix\d+ >= 297\)", src), src
    lines = [n for n, text in enumerate(src.splitlines(), 1)
             if "#pragma omp simd" in src.splitlines()[n - 2] and text.lstrip().startswith("for (")]
    assert lines and not _scalar_loops(tmp_path, src, lines), src


def test_a_row_statistic_keeps_its_reduction_loop_the_vector_loop(tmp_path):
    """A per-row sum kept as [R, 1] (a layer norm backward's row sums) is computed by a loop over
    the rows around a vector reduction over the row: the rows loop is not made the vector loop
    (vectorised across rows, the row's terms became strided element loads: 69 -> 237 us)."""
    x, w = torch.randn(9, 67, dtype=torch.float64), torch.randn(67, dtype=torch.float64)
    def layer_norm_backward_like(x, w):
        rows = (x * w).sum(-1, keepdim=True)  # [R, 1], materialised between two loops
        return x * rows - x, (x * w).sum(0), (x * rows).sum(0)  # the columns: a phases kernel

    g = run_both(layer_norm_backward_like, [x, w])
    for k in [s for s in g.steps if s.kind == "kernel"]:
        assert "#pragma omp for simd" not in k.source.source.split("extern")[-1], k.source.source


def test_dropout_beside_a_layer_norm_draws_in_vector_lanes(tmp_path):
    """dropout(h) + residual, then a layer norm, with the mask kept (a training forward): the
    kernel's Philox rounds compile to vector multiplies. GCC 12 left that loop scalar (~7.5 ns a
    number, ~2 vectorised) twice over: the round loop stayed rolled next to the mask's byte
    store, and ``(float)`` of a bool beside that store found no vector type. The kernel draws the
    interpreter's stream."""
    import shutil

    import numpy as np

    if shutil.which("objdump") is None:
        pytest.skip("needs objdump to read the compiled loop")

    def fn(h, res, w, b):
        keep = torch.rand_like(h) < 0.9
        y = h * keep * (1 / 0.9) + res
        return keep, F.layer_norm(y, (y.shape[-1],), w, b)

    ins = [torch.randn(3, 5, 96), torch.randn(3, 5, 96), torch.rand(96) + 0.5, torch.randn(96)]
    prog = import_model(Fn(fn).eval(), tuple(ins))
    g = compile_program(prog, device_spec=cpu_spec(measure=False))
    (k,) = [s for s in g.steps if s.kind == "kernel"]
    src = k.source.source
    assert "st_rand(" in src and "? (float)1 : (float)0)" in src
    torch.manual_seed(2)
    got = g(*ins)
    torch.manual_seed(2)
    want = prog.run(*ins)
    for a, w in zip(got, want):
        np.testing.assert_allclose(a.numpy(), w, rtol=1e-5, atol=1e-5)
    (tmp_path / "k.cpp").write_text(src)
    lib = tmp_path / "k.so"
    out = subprocess.run([build.compiler(), *build.default_flags(), str(tmp_path / "k.cpp"), "-o",
                          str(lib)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True,
                         text=True).stdout
    assert re.search(r"\bv?pmul(udq|lq|ld)\s+%[xyz]mm", asm), "Philox rounds ran scalar"


def test_a_gather_from_a_map_padded_on_two_dims_vectorises(tmp_path):
    """AdderNet's quantised im2col: a map padded along H and W, flattened, gathered by a column
    index and quantised per group. The padded border is one select per padded dim: a select on
    ``ok_h && ok_w`` (two bools from 32-bit compares, next to a 64-bit index load) left GCC 12
    with "no vectype" and the loop scalar (1.3-4.9 ms a kernel in adder_quant, 0.5-1.4 ms
    vectorised). Values as eager, the border included."""
    x = torch.randn(2, 3, 6, 7)
    idx = torch.randint(0, 3 * 8 * 9, (27 * 10,))
    s = torch.rand(4) + 0.5

    def unfold_quant(x, idx, s):
        cols = F.pad(x, (1, 1, 1, 1)).reshape(2, -1).index_select(1, idx)
        return torch.round(cols * 15 / s[0])

    g = run_both(unfold_quant, [x, idx, s])
    (src,) = [k.source.source for k in g.steps if k.kind == "kernel" and " ok" in k.source.source]
    assert "&& ok" not in src, src
    lines = [n for n, text in enumerate(src.splitlines(), 1)
             if "#pragma omp simd" in src.splitlines()[n - 2] and text.lstrip().startswith("for (")]
    assert lines and not _scalar_loops(tmp_path, src, lines), src


@pytest.mark.parametrize("feat,dtype", [(16, torch.float32), (7, torch.float32),
                                        (64, torch.bfloat16)])
def test_a_cat_along_the_vector_loop_reads_one_part_a_loop(tmp_path, feat, dtype):
    """EdgeConv's message ``[x_i, x_j - x_i]``, a cat along the innermost dim of gathered rows:
    one vector loop per part, each loading only its part. One loop had loaded every part,
    clamped, and blended them (three gathered rows an element: 30 ms of a 90 ms bf16 call).
    Values as eager."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(50, feat, generator=gen).to(dtype)
    ei = torch.randint(0, 50, (2, 300), generator=gen)
    g = run_both(lambda x, ei: torch.cat([x[ei[1]], x[ei[0]] - x[ei[1]]], -1) * 2, [x, ei])
    (src,) = [k.source.source for k in g.steps if k.kind == "kernel"]
    loops = re.findall(rf"for \(int64_t (\w+s(\d+)) = 0; \w+ < {feat}; ", src)
    assert sorted(int(lo) for _, lo in loops) == [0, feat], src
    body = src[src.index('extern "C"'):]
    assert "st_pick" not in body and " < 16 ? " not in body, body  # no clamped part, no blend
    lines = [n for n, text in enumerate(src.splitlines(), 1)
             if "#pragma omp simd" in src.splitlines()[n - 2] and text.lstrip().startswith("for (")]
    if feat >= 16:
        assert lines and not _scalar_loops(tmp_path, src, lines), src
