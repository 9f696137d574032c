"""Keras's `ImageDataGenerator` geometric augmentation as pure, jittable JAX.

The lesson augments images with `keras.preprocessing.image.ImageDataGenerator`: a random rotation, shift, shear
and zoom, applied as one affine map by `scipy.ndimage.affine_transform`, then random flips. This module reproduces
that geometry exactly (Keras 3, `keras/src/legacy/preprocessing/image.py`) so the two can be read side by side, but
draws its randomness from explicit `jax.random` keys and runs on device, inside a jitted train step if wanted:

    config = ImageDataGenerator(rotation_range=20, width_shift_range=0.2, height_shift_range=0.2,
                                shear_range=0.2, zoom_range=0.2, horizontal_flip=True)
    images = jax.jit(augment, static_argnums=2)(key, images, config)

Two Keras quirks are kept on purpose, because parity is the point:

* `tx` moves the image along columns (horizontally) and `ty` along rows, yet Keras draws `tx` from
  `height_shift_range` times the number of rows. So `height_shift_range` shifts horizontally and
  `width_shift_range` vertically (keras-team/keras#17398, tensorflow/tensorflow#82838).
* The centre of rotation, shear and zoom is (cols / 2 - 0.5, rows / 2 - 0.5) in (row, col) order: the true
  centre for square images, transposed for others.
"""

import dataclasses
import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Scalar = float | jax.Array

FILL_MODES = ("nearest", "constant", "reflect", "wrap")
_AFFINE_PARAMS = ("theta", "tx", "ty", "shear", "zx", "zy")


def _check_fill_mode(fill_mode: str, name: str) -> None:
    if fill_mode not in FILL_MODES:
        raise ValueError(f"{name} must be one of {FILL_MODES}, got {fill_mode!r}.")


def _check_order(order: int, name: str) -> None:
    if isinstance(order, bool) or order not in (0, 1):
        raise ValueError(f"{name} must be 0 (nearest pixel) or 1 (bilinear), got {order!r}.")


def _keras_matrix(theta, tx, ty, shear, zx, zy, rows: int, cols: int) -> jax.Array:
    """The 3x3 inverse map, output (row, col, 1) -> input (row, col, 1), built step by step as Keras builds it.

    Keras composes rotation @ shift @ shear @ zoom in its (x, y) frame, conjugates that by the centre offset
    (rows / 2 - 0.5, cols / 2 - 0.5), then swaps x and y so scipy can apply it to (row, col) indices.
    """
    theta, shear = jnp.deg2rad(theta), jnp.deg2rad(shear)
    zero, one = jnp.zeros_like(theta), jnp.ones_like(theta)
    rotation = jnp.array([[jnp.cos(theta), -jnp.sin(theta), zero], [jnp.sin(theta), jnp.cos(theta), zero],
                          [zero, zero, one]])
    shift = jnp.array([[one, zero, tx], [zero, one, ty], [zero, zero, one]])
    shear_ = jnp.array([[one, -jnp.sin(shear), zero], [zero, jnp.cos(shear), zero], [zero, zero, one]])
    zoom = jnp.array([[zx, zero, zero], [zero, zy, zero], [zero, zero, one]])
    ox, oy = rows / 2 - 0.5, cols / 2 - 0.5
    offset = jnp.array([[1.0, 0.0, ox], [0.0, 1.0, oy], [0.0, 0.0, 1.0]])
    reset = jnp.array([[1.0, 0.0, -ox], [0.0, 1.0, -oy], [0.0, 0.0, 1.0]])
    # HIGHEST: accelerators would otherwise multiply float32 matrices in bfloat16, moving samples by pixels.
    matrix = jnp.linalg.multi_dot([offset, rotation, shift, shear_, zoom, reset],
                                  precision=jax.lax.Precision.HIGHEST)
    swap = jnp.array([1, 0, 2])
    return matrix[swap][:, swap]


def _fold(coord: jax.Array, size: int, fill_mode: str) -> jax.Array:
    """Maps sample coordinates along an axis of `size` pixels into [0, size - 1], as scipy.ndimage extends it.

    'nearest' and 'constant' clamp (the caller masks 'constant' to cval); 'reflect' mirrors about the pixel
    edges -0.5 and size - 0.5 (d c b a | a b c d | d c b a); 'wrap' repeats with period size - 1, scipy's own
    definition for that name, in which the first and last pixels coincide.
    """
    if fill_mode == "reflect":
        coord = coord - 2 * size * jnp.floor(coord / (2 * size))
        coord = jnp.where(coord >= size, 2 * size - 1 - coord, coord)
    elif fill_mode == "wrap":
        if size == 1:
            return jnp.zeros_like(coord)
        period = size - 1
        below = coord + period * (jnp.floor(-coord / period) + 1)
        above = coord - period * jnp.floor(coord / period)
        coord = jnp.where(coord < 0, below, jnp.where(coord > period, above, coord))
    return jnp.clip(coord, 0, size - 1)


def _resample(x: jax.Array, matrix: jax.Array, fill_mode: str, cval: Scalar, order: int,
              flip_horizontal: jax.Array | bool = False, flip_vertical: jax.Array | bool = False) -> jax.Array:
    """Output pixel (row, col) reads x (H, W, C) at matrix @ (row, col, 1), the way scipy.ndimage does.

    A flip after the transform is the same as reading the flipped output grid, so flips cost nothing here.
    Each channel is read with scalar gathers at indices computed once: on CPU these are several times faster
    than gathering slices (a 2x2 neighbourhood, or all channels of a pixel) at once.
    """
    height, width, _ = x.shape
    row = jnp.arange(height, dtype=jnp.float32)[:, None]
    col = jnp.arange(width, dtype=jnp.float32)[None, :]
    row = jnp.where(flip_vertical, height - 1 - row, row)
    col = jnp.where(flip_horizontal, width - 1 - col, col)
    rows = matrix[0, 0] * row + matrix[0, 1] * col + matrix[0, 2]
    cols = matrix[1, 0] * row + matrix[1, 1] * col + matrix[1, 2]
    r, c = _fold(rows, height, fill_mode), _fold(cols, width, fill_mode)
    if order == 0:
        # scipy rounds halves up.
        index = jnp.floor(r + 0.5).astype(jnp.int32) * width + jnp.floor(c + 0.5).astype(jnp.int32)

        def channel(plane: jax.Array) -> jax.Array:
            return plane.reshape(-1)[index]
    else:
        # round(r - 0.5) is floor(r), or r - 1 at some integers r, read with weight 1: the same value. It is
        # cheaper than floor on CPU. The image gains a repeated last row and column for the neighbours r0 + 1.
        r0, c0 = jnp.round(r - 0.5), jnp.round(c - 0.5)
        wr, wc = r - r0, c - c0
        stride = width + 1
        index = r0.astype(jnp.int32) * stride + c0.astype(jnp.int32)

        def channel(plane: jax.Array) -> jax.Array:
            flat = jnp.pad(plane, ((0, 1), (0, 1)), mode="edge").reshape(-1)
            q00, q01, q10, q11 = flat[index], flat[index + 1], flat[index + stride], flat[index + stride + 1]
            top, bottom = q00 + wc * (q01 - q00), q10 + wc * (q11 - q10)
            return top + wr * (bottom - top)
    out = jax.vmap(channel, in_axes=2, out_axes=2)(x)
    if fill_mode == "constant":
        inside = (rows >= 0) & (rows <= height - 1) & (cols >= 0) & (cols <= width - 1)
        out = jnp.where(inside[..., None], out, jnp.asarray(cval, out.dtype))
    return out


@functools.partial(jax.jit, static_argnames=("fill_mode", "order"))
def apply_affine_transform(x: jax.Array, theta: Scalar = 0.0, tx: Scalar = 0.0, ty: Scalar = 0.0,
                           shear: Scalar = 0.0, zx: Scalar = 1.0, zy: Scalar = 1.0, fill_mode: str = "nearest",
                           cval: Scalar = 0.0, order: int = 1) -> jax.Array:
    """Keras's `apply_affine_transform` (channels last) for one (height, width, channels) image.

    Same arguments, units and result as Keras, which applies `scipy.ndimage.affine_transform` channel by channel.
    The parameters may be traced arrays, so this can be vmapped over per-image draws; `fill_mode` and `order`
    must be static. Integer images come back as float32.

    Args:
      x: one image, (height, width, channels).
      theta: rotation angle in degrees.
      tx: shift in pixels along columns (Keras's x; see the module docstring).
      ty: shift in pixels along rows.
      shear: shear angle in degrees.
      zx, zy: zoom factors; above 1 the content shrinks.
      fill_mode: how points outside the image are filled, with scipy.ndimage's meanings: 'nearest',
        'constant' (cval), 'reflect' or 'wrap'.
      cval: the value outside the image for 'constant'.
      order: 0 (nearest pixel, halves rounded up) or 1 (bilinear).

    Returns:
      The transformed image, shaped like `x`.
    """
    x = jnp.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"x must be one (height, width, channels) image, got shape {x.shape}.")
    _check_fill_mode(fill_mode, "fill_mode")
    _check_order(order, "order")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    height, width, _ = x.shape
    params = (jnp.asarray(p, jnp.float32) for p in (theta, tx, ty, shear, zx, zy))
    return _resample(x, _keras_matrix(*params, height, width), fill_mode, cval, order).astype(x.dtype)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _nonnegative(name: str, value: Any) -> float:
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def _shift_range(name: str, value: Any) -> float | tuple[float, ...]:
    """A width/height shift range, normalised the way Keras's `get_random_transform` reads it.

    A float r draws uniformly from (-r, r). An int n draws one of 0..n-1 (`np.random.choice(n)`) with a random
    sign, so it is stored as the tuple (0.0, ..., n - 1.0), and a sequence draws one of its values with a random
    sign. The draw is a fraction of the image size when the largest value is below 1, else pixels.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0:
        return tuple(float(i) for i in range(value))
    if _is_real(value):
        return _nonnegative(name, value)
    if isinstance(value, (str, bytes)) or not np.iterable(value) or len(value) == 0:
        raise ValueError(f"{name} must be a number >= 0 or a non-empty sequence of them, got {value!r}.")
    return tuple(_nonnegative(name, v) for v in value)


@dataclasses.dataclass(frozen=True)
class ImageDataGenerator:
    """The geometric options of Keras's `ImageDataGenerator`, with Keras's names and defaults.

    Frozen and hashable, so it can be a static argument of `jax.jit`. Validated and normalised on construction:
    `zoom_range` z becomes the pair (1 - z, 1 + z) as in Keras, and the shift ranges follow `_shift_range`.
    """

    rotation_range: float = 0.0
    width_shift_range: float | tuple[float, ...] = 0.0
    height_shift_range: float | tuple[float, ...] = 0.0
    shear_range: float = 0.0
    zoom_range: float | tuple[float, float] = 0.0
    horizontal_flip: bool = False
    vertical_flip: bool = False
    fill_mode: str = "nearest"
    cval: float = 0.0
    interpolation_order: int = 1

    def __post_init__(self):
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("rotation_range", _nonnegative("rotation_range", self.rotation_range))
        put("shear_range", _nonnegative("shear_range", self.shear_range))
        put("width_shift_range", _shift_range("width_shift_range", self.width_shift_range))
        put("height_shift_range", _shift_range("height_shift_range", self.height_shift_range))
        zoom = self.zoom_range
        if _is_real(zoom):
            zoom = _nonnegative("zoom_range", zoom)
            put("zoom_range", (1 - zoom, 1 + zoom))
        elif isinstance(zoom, (tuple, list)) and len(zoom) == 2 and all(
                _is_real(z) and math.isfinite(z) for z in zoom):
            put("zoom_range", (float(zoom[0]), float(zoom[1])))
        else:
            raise ValueError(f"zoom_range must be a number >= 0 or a pair of numbers, got {zoom!r}.")
        for name in ("horizontal_flip", "vertical_flip"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}.")
            put(name, bool(getattr(self, name)))
        _check_fill_mode(self.fill_mode, "fill_mode")
        if not _is_real(self.cval):
            raise ValueError(f"cval must be a number, got {self.cval!r}.")
        put("cval", float(self.cval))
        _check_order(self.interpolation_order, "interpolation_order")
        put("interpolation_order", int(self.interpolation_order))


def _shift(u_value: jax.Array, u_sign: jax.Array, shift_range: float | tuple[float, ...], size: int) -> jax.Array:
    """A shift in pixels along an axis of `size` pixels, from two U[0, 1) numbers and a normalised range."""
    if isinstance(shift_range, tuple):
        value = jnp.asarray(shift_range)[jnp.minimum(u_value * len(shift_range), len(shift_range) - 1).astype(int)]
        shift, largest = jnp.where(u_sign < 0.5, -value, value), max(shift_range)
    else:
        shift, largest = shift_range * (2 * u_value - 1), shift_range
    return shift * size if largest < 1 else shift


@functools.partial(jax.jit, static_argnames=("config", "image_shape"))
def random_transform_params(key: jax.Array, config: ImageDataGenerator,
                            image_shape: tuple[int, int, int]) -> dict[str, jax.Array]:
    """Draws one image's transform with the distributions of Keras's `get_random_transform`.

    All of it comes from one draw of ten U[0, 1) numbers: one threefry call per image, vmapped or not, rather
    than one per parameter.

    Args:
      key: a PRNG key.
      config: the augmentation options.
      image_shape: (height, width, channels) of the image it is for, a tuple.

    Returns:
      theta, tx, ty, shear, zx, zy (float32 scalars, the arguments of `apply_affine_transform`) and
      flip_horizontal, flip_vertical (bool scalars, each true with probability 1/2 when its option is on).
    """
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (height, width, channels), got {image_shape!r}.")
    rows, cols, _ = image_shape
    u = jax.random.uniform(key, (10,))
    low, high = config.zoom_range
    return {
        "theta": config.rotation_range * (2 * u[0] - 1),
        "tx": _shift(u[1], u[2], config.height_shift_range, rows),
        "ty": _shift(u[3], u[4], config.width_shift_range, cols),
        "shear": config.shear_range * (2 * u[5] - 1),
        "zx": low + (high - low) * u[6],
        "zy": low + (high - low) * u[7],
        "flip_horizontal": (u[8] < 0.5) & config.horizontal_flip,
        "flip_vertical": (u[9] < 0.5) & config.vertical_flip,
    }


def _transform(image: jax.Array, params: dict[str, jax.Array], config: ImageDataGenerator) -> jax.Array:
    """Keras's `apply_transform`: the affine map, then the flips."""
    matrix = _keras_matrix(*(params[name] for name in _AFFINE_PARAMS), *image.shape[:2])
    return _resample(image, matrix, config.fill_mode, config.cval, config.interpolation_order,
                     params["flip_horizontal"], params["flip_vertical"]).astype(image.dtype)


@functools.partial(jax.jit, static_argnames="config")
def augment(key: jax.Array, images: jax.Array, config: ImageDataGenerator) -> jax.Array:
    """Augments a (batch, height, width, channels) batch, every image with its own random draw.

    Jittable with `config` static: `jax.jit(augment, static_argnums=2)`.
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be a (batch, height, width, channels) array, got shape {images.shape}.")
    keys = jax.random.split(key, images.shape[0])
    params = jax.vmap(random_transform_params, in_axes=(0, None, None))(keys, config, images.shape[1:])
    return jax.vmap(_transform, in_axes=(0, 0, None))(images, params, config)
