"""Fast CPU forms of the operations in the lesson's CNN.

Every function here is a pure function with the same values and the same gradients (to float
rounding) as the plain form it replaces, so a model can switch between the two without changing
what it learns:

==============================  ================================================================
fast form                       plain form
==============================  ================================================================
``max_pool(x, window)``         ``flax.linen.max_pool(x, (w, w), strides=(w, w))`` ('VALID';
                                odd sizes are floored like Keras ``MaxPooling2D``: 11 -> 5)
``conv2d(x, kernel)``           ``lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                dimension_numbers=('NHWC', 'HWIO', 'NHWC'))``
``conv2d_max_pool(x, kernel)``  ``max_pool(conv2d(x, kernel), window)``, fused
==============================  ================================================================

Layouts are Flax's: images NHWC, kernels HWIO (kh, kw, in, out).

They exist because XLA:CPU runs the plain forms' gradients slowly (``select_and_scatter``, transposed
convolutions); how each fast form avoids that, and what it measured, is in the README ("Why the CNN has its own
ops on a CPU"). ``jax.custom_vjp`` gives each its backward pass.

Winograd's transforms add rounding: values and gradients match the direct convolution to about
1e-6 relative in float32 (tests/test_ops.py checks 1e-5).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["max_pool", "conv2d", "conv2d_max_pool", "pooled_size"]

_DN = ("NHWC", "HWIO", "NHWC")
# Below this many input channels conv2d_max_pool uses the direct form instead of Winograd.
_DIRECT_MAX_CHANNELS = 4


# ----------------------------------------------------------------------------- helpers


def _check_image(x, name="x"):
    if not hasattr(x, "ndim") or x.ndim != 4:
        raise ValueError(f"{name} must be a 4-D NHWC array, got shape {getattr(x, 'shape', None)}")


def _check_kernel(x, kernel):
    if not hasattr(kernel, "ndim") or kernel.ndim != 4:
        raise ValueError(f"kernel must be a 4-D HWIO array, got shape {getattr(kernel, 'shape', None)}")
    if kernel.shape[2] != x.shape[3]:
        raise ValueError(
            f"kernel expects {kernel.shape[2]} input channels but x has {x.shape[3]} "
            f"(x {x.shape}, kernel {kernel.shape})"
        )
    if kernel.shape[0] > x.shape[1] or kernel.shape[1] > x.shape[2]:
        raise ValueError(f"kernel {kernel.shape[:2]} is larger than the image {x.shape[1:3]}")


def _check_window(window):
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")


def pooled_size(n: int, window: int = 2) -> int:
    """Output length of a non-overlapping 'VALID' pool (Keras MaxPooling2D floors: 11 -> 5)."""
    return n // window


def _max_argmax(stack):
    """Max and FIRST argmax (int8 up to 127 candidates) over axis 0, from one variadic reduce.

    One reduce gives XLA one fusion that writes both results; a separate ``max`` and
    ``argmax`` would each recompute the stacked operand.
    """
    iota = lax.broadcasted_iota(jnp.int32, stack.shape, 0)

    def pick(a, b):
        av, ai = a
        bv, bi = b
        take_b = (bv > av) | ((bv == av) & (bi < ai))
        return jnp.where(take_b, bv, av), jnp.where(take_b, bi, ai)

    init = (jnp.array(-jnp.inf, stack.dtype), jnp.array(0, jnp.int32))
    m, i = lax.reduce((stack, iota), init, pick, (0,))
    return m, i.astype(jnp.int8 if stack.shape[0] <= 127 else jnp.int32)


def _upsample(a, k):
    """(B,H,W,C) -> (B,kH,kW,C), each element repeated over its k x k window (broadcast + reshape)."""
    B, H, W, C = a.shape
    return jnp.broadcast_to(a[:, :, None, :, None, :], (B, H, k, W, k, C)).reshape(B, H * k, W * k, C)


def _onehot_rows(idx, g, n):
    """(n, *idx.shape): row t is g where idx == t, else 0."""
    ar = jnp.arange(n, dtype=idx.dtype).reshape((n,) + (1,) * idx.ndim)
    return jnp.where(idx[None] == ar, g[None], jnp.zeros((), g.dtype))


# ----------------------------------------------------------------------------- max_pool


def _pool_windows(x, k):
    B, H, W, C = x.shape
    Hp, Wp = H // k, W // k
    return jnp.stack([x[:, a : a + k * Hp : k, b : b + k * Wp : k] for a in range(k) for b in range(k)])


def max_pool(x, window: int = 2):
    """Non-overlapping max pooling, window x window with stride window, 'VALID' (floors odd sizes).

    Same values and gradients as ``nn.max_pool(x, (window, window), strides=(window, window))``,
    including ties (the first maximal element in row-major window order takes the gradient).
    """
    _check_image(x)
    _check_window(window)
    if x.shape[1] < window or x.shape[2] < window:
        raise ValueError(f"window {window} is larger than the image {x.shape[1:3]}")
    return _max_pool(x, window)


def _max_pool_impl(x, k):
    return _max_argmax(_pool_windows(x, k))


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x, k):
    return _max_pool_impl(x, k)[0]


def _max_pool_fwd(x, k):
    m, idx = _max_pool_impl(x, k)
    return m, (idx, x.shape)


def _max_pool_bwd(k, res, g):
    idx, shape = res
    B, H, W, C = shape
    Hp, Wp = idx.shape[1], idx.shape[2]
    full = (B, Hp * k, Wp * k, C)
    pos = (lax.broadcasted_iota(jnp.int32, full, 1) % k) * k + lax.broadcasted_iota(jnp.int32, full, 2) % k
    dx = jnp.where(pos == _upsample(idx.astype(jnp.int32), k), _upsample(g, k), jnp.zeros((), g.dtype))
    return (jnp.pad(dx, ((0, 0), (0, H - Hp * k), (0, W - Wp * k), (0, 0))),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


# ----------------------------------------------------------------------------- conv2d (im2col)


def _patches(x, kh, kw, Ho, Wo):
    """(B,H,W,C) -> (B,Ho,Wo,kh*kw*C), feature order (i, j, c) = HWIO's flattening."""
    return jnp.concatenate([x[:, i : i + Ho, j : j + Wo, :] for i in range(kh) for j in range(kw)], axis=-1)


def conv2d(x, kernel):
    """2-D 'VALID' convolution, stride 1, NHWC x HWIO -> NHWC, as patches @ kernel matmuls.

    Same values and gradients as ``lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))``. Forward: im2col patches (B*Ho*Wo, kh*kw*C)
    @ (kh*kw*C, F); kernel gradient: patches^T @ g; input gradient: g @ kernel^T, summed back
    over the kh*kw shifted positions (col2im). Any kernel size; for the lesson's conv + pool pairs
    ``conv2d_max_pool`` is faster still.
    """
    _check_image(x)
    _check_kernel(x, kernel)
    return _conv2d(x, kernel)


@jax.custom_vjp
def _conv2d(x, kernel):
    return _conv2d_fwd(x, kernel)[0]


def _conv2d_fwd(x, kernel):
    kh, kw, C, F = kernel.shape
    B, H, W, _ = x.shape
    Ho, Wo = H - kh + 1, W - kw + 1
    p = _patches(x, kh, kw, Ho, Wo)
    y = jnp.dot(p, kernel.reshape(kh * kw * C, F))
    return y, (p, kernel, x.shape)


def _conv2d_bwd(res, g):
    p, kernel, (B, H, W, C) = res
    kh, kw, _, F = kernel.shape
    Ho, Wo = g.shape[1], g.shape[2]
    dk = lax.dot_general(p, g, (((0, 1, 2), (0, 1, 2)), ((), ()))).reshape(kernel.shape)
    cols = lax.dot_general(g, kernel.reshape(kh * kw * C, F), (((3,), (1,)), ((), ())))
    cols = cols.reshape(B, Ho, Wo, kh, kw, C)
    dx = sum(
        jnp.pad(cols[:, :, :, i, j, :], ((0, 0), (i, H - Ho - i), (j, W - Wo - j), (0, 0)))
        for i in range(kh)
        for j in range(kw)
    )
    return dx, dk


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


# ----------------------------------------------------------------------------- conv2d_max_pool


def conv2d_max_pool(x, kernel, window: int = 2):
    """``max_pool(conv2d(x, kernel), window)`` in one op (values and gradients the same).

    The lesson's ``Conv2D(f, 3, activation='relu') -> MaxPooling2D(2)`` is
    ``relu(conv2d_max_pool(x, kernel) + bias)``: adding a per-channel bias and a ReLU commute with
    the max (both are monotone), in value and in gradient, so they are applied to the 4x smaller
    pooled array. Fast paths: 3x3 kernel with 2x2 pool (direct for <= 4 input channels, else
    Winograd F(2x2, 3x3)); any other shape falls back to ``max_pool(conv2d(x, kernel), window)``.
    """
    _check_image(x)
    _check_kernel(x, kernel)
    _check_window(window)
    kh, kw, C, F = kernel.shape
    if (x.shape[1] - kh + 1) < window or (x.shape[2] - kw + 1) < window:
        raise ValueError(f"image {x.shape[1:3]} is too small for a {kh}x{kw} conv followed by a {window}x{window} pool")
    if (kh, kw) != (3, 3) or window != 2:
        return max_pool(conv2d(x, kernel), window)
    if C <= _DIRECT_MAX_CHANNELS:
        return _conv_pool_direct(x, kernel)
    return _conv_pool_winograd(x, kernel)


# --- direct form (few input channels): 9-tap multiply-adds, fused by XLA with the pool ---------


def _tap(x, i, ki, j, kj, Tp, Tq):
    """X at rows 2p+i+ki, cols 2q+j+kj, p < Tp, q < Tq: (B,Tp,Tq,C)."""
    return x[:, i + ki : i + ki + 2 * Tp - 1 : 2, j + kj : j + kj + 2 * Tq - 1 : 2, :]


def _direct_tiles(x, kernel, Tp, Tq):
    """The 4 conv outputs of every 2x2 pooling window, stacked (window order 00, 01, 10, 11)."""
    C = x.shape[3]
    out = []
    for i in range(2):
        for j in range(2):
            acc = None
            for ki in range(3):
                for kj in range(3):
                    xs = _tap(x, i, ki, j, kj, Tp, Tq)
                    for c in range(C):
                        term = xs[..., c : c + 1] * kernel[ki, kj, c]
                        acc = term if acc is None else acc + term
            out.append(acc)
    return jnp.stack(out)  # (4,B,Tp,Tq,F)


def _direct_patches_t(x, Tp, Tq):
    """(9C, 4*B*Tp*Tq): row (ki, kj, c), column (window position, b, p, q)."""
    C = x.shape[3]
    rows = []
    for ki in range(3):
        for kj in range(3):
            for c in range(C):
                rows.append(
                    jnp.stack([_tap(x, i, ki, j, kj, Tp, Tq)[..., c] for i in range(2) for j in range(2)]).reshape(-1)
                )
    return jnp.stack(rows)


@jax.custom_vjp
def _conv_pool_direct(x, kernel):
    return _conv_pool_direct_fwd(x, kernel)[0]


def _conv_pool_direct_fwd(x, kernel):
    Tp, Tq = (x.shape[1] - 2) // 2, (x.shape[2] - 2) // 2
    m, idx = _max_argmax(_direct_tiles(x, kernel, Tp, Tq))
    return m, (x, kernel, idx)


def _conv_pool_direct_bwd(res, g):
    x, kernel, idx = res
    Tp, Tq = idx.shape[1], idx.shape[2]
    F = kernel.shape[3]
    dy = _onehot_rows(idx, g, 4)  # (4,B,Tp,Tq,F)
    dk = jnp.dot(_direct_patches_t(x, Tp, Tq), dy.reshape(-1, F)).reshape(kernel.shape)
    # Input gradient by autodiff of the direct form (XLA drops it when x is data, as in the CNN).
    dx = jax.vjp(lambda x_: _direct_tiles(x_, kernel, Tp, Tq), x)[1](dy)[0]
    return dx, dk


_conv_pool_direct.defvjp(_conv_pool_direct_fwd, _conv_pool_direct_bwd)


# --- Winograd F(2x2, 3x3) -------------------------------------------------------------------
# y = A^T [ (G w G^T) * (B^T d B) ] A for a 4x4 input tile d and the 2x2 output tile y:
#   B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
#   G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
#   A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]
# Transform index t = 4a + b (a: rows, b: columns). Each output tile is one pooling window.

_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
# dM[t] = sum over window positions (i, j) of AT[i, a] AT[j, b] dY[2i + j]: a (16, 4) matrix.
_AT16 = np.einsum("ia,jb->abij", _AT, _AT).reshape(16, 4)


def _bt(d0, d1, d2, d3):
    return (d0 - d2, d1 + d2, d2 - d1, d1 - d3)


def _input_transform(x, Tp, Tq):
    """(B,H,W,C) -> V (16, B*Tp*Tq, C)."""
    B, C = x.shape[0], x.shape[3]
    r = jnp.stack(_bt(*[x[:, k : k + 2 * Tp - 1 : 2] for k in range(4)]))  # (4a,B,Tp,W,C)
    v = jnp.stack(_bt(*[r[:, :, :, k : k + 2 * Tq - 1 : 2] for k in range(4)]), axis=1)  # (4a,4b,B,Tp,Tq,C)
    return v.reshape(16, B * Tp * Tq, C)


def _kernel_transform(kernel):
    """(3,3,C,F) -> U (16, C, F)."""

    def g(w0, w1, w2):
        return (w0, 0.5 * (w0 + w1 + w2), 0.5 * (w0 - w1 + w2), w2)

    rows = g(kernel[0], kernel[1], kernel[2])  # 4 x (3,C,F)
    return jnp.stack([c for r in rows for c in g(r[0], r[1], r[2])])


def _output_transform(m):
    """M (16, N, F) -> the 4 outputs of each tile, stacked (4, N, F), window order 00, 01, 10, 11."""
    rows = []
    for a in range(4):
        m0, m1, m2, m3 = m[4 * a], m[4 * a + 1], m[4 * a + 2], m[4 * a + 3]
        rows.append((m0 + m1 + m2, m1 - m2 - m3))
    out = []
    for i in range(2):
        for j in range(2):
            r0, r1, r2, r3 = (rows[a][j] for a in range(4))
            out.append(r0 + r1 + r2 if i == 0 else r1 - r2 - r3)
    return jnp.stack(out)


@jax.custom_vjp
def _conv_pool_winograd(x, kernel):
    return _conv_pool_winograd_fwd(x, kernel)[0]


def _conv_pool_winograd_fwd(x, kernel):
    B, H, W, C = x.shape
    F = kernel.shape[3]
    Tp, Tq = (H - 2) // 2, (W - 2) // 2
    v = _input_transform(x, Tp, Tq)
    m = jnp.einsum("tnc,tcf->tnf", v, _kernel_transform(kernel))
    pooled, idx = _max_argmax(_output_transform(m))
    return pooled.reshape(B, Tp, Tq, F), (x, kernel, v, idx)


def _conv_pool_winograd_bwd(res, g):
    x, kernel, v, idx = res
    B, H, W, C = x.shape
    F = kernel.shape[3]
    Tp, Tq = (H - 2) // 2, (W - 2) // 2
    N = B * Tp * Tq
    dy = _onehot_rows(idx, g.reshape(N, F), 4)  # (4,N,F)
    # The output transform's transpose as one (16,4) @ (4, N*F) matmul: this also makes XLA
    # write dy once instead of recomputing it inside 16 consumers.
    dm = jnp.dot(jnp.asarray(_AT16, g.dtype), dy.reshape(4, N * F)).reshape(16, N, F)
    u = _kernel_transform(kernel)
    dv = jnp.einsum("tnf,tcf->tnc", dm, u)
    du = jnp.einsum("tnc,tnf->tcf", v, dm)
    dk = jax.vjp(_kernel_transform, kernel)[1](du)[0]
    dx = jax.vjp(lambda x_: _input_transform(x_, Tp, Tq), x)[1](dv)[0]
    return dx, dk


_conv_pool_winograd.defvjp(_conv_pool_winograd_fwd, _conv_pool_winograd_bwd)
