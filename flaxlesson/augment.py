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
    rotation = jnp.array(
        [[jnp.cos(theta), -jnp.sin(theta), zero], [jnp.sin(theta), jnp.cos(theta), zero], [zero, zero, one]]
    )
    shift = jnp.array([[one, zero, tx], [zero, one, ty], [zero, zero, one]])
    shear_ = jnp.array([[one, -jnp.sin(shear), zero], [zero, jnp.cos(shear), zero], [zero, zero, one]])
    zoom = jnp.array([[zx, zero, zero], [zero, zy, zero], [zero, zero, one]])
    ox, oy = rows / 2 - 0.5, cols / 2 - 0.5
    offset = jnp.array([[1.0, 0.0, ox], [0.0, 1.0, oy], [0.0, 0.0, 1.0]])
    reset = jnp.array([[1.0, 0.0, -ox], [0.0, 1.0, -oy], [0.0, 0.0, 1.0]])
    # HIGHEST: accelerators would otherwise multiply float32 matrices in bfloat16, moving samples by pixels.
    matrix = jnp.linalg.multi_dot([offset, rotation, shift, shear_, zoom, reset], precision=jax.lax.Precision.HIGHEST)
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


def _flip_matrix(flip_horizontal: jax.Array, flip_vertical: jax.Array, rows: int, cols: int) -> jax.Array:
    """Reads the output grid mirrored: flipping after the transform is the same as this map applied first."""
    zero, one = jnp.zeros(()), jnp.ones(())
    return jnp.array(
        [
            [jnp.where(flip_vertical, -one, one), zero, jnp.where(flip_vertical, rows - one, zero)],
            [zero, jnp.where(flip_horizontal, -one, one), jnp.where(flip_horizontal, cols - one, zero)],
            [zero, zero, one],
        ]
    )


def _sample(images: jax.Array, matrices: jax.Array, fill_mode: str, cval: Scalar, order: int) -> jax.Array:
    """Output pixel (row, col) of image b reads images[b] at matrices[b] @ (row, col, 1), like scipy.ndimage.

    Shaped for XLA on CPU, where a gather turns the loop it is fused into scalar: the coordinates, folds,
    indices and weights are computed in vectorised loops into one array (a loop with several outputs is slow
    too), an optimization barrier keeps that work out of the gather loop, and the gather loop reads every
    channel with scalar gathers only (gathering slices, such as a 2x2 neighbourhood, is several times slower).
    """
    batch, height, width, channels = images.shape
    row = jnp.repeat(jnp.arange(height, dtype=jnp.float32), width)
    col = jnp.tile(jnp.arange(width, dtype=jnp.float32), height)
    m = matrices[:, :2, :, None]
    rows, cols = (m[:, :, 0] * row + m[:, :, 1] * col + m[:, :, 2]).swapaxes(0, 1)
    r, c = _fold(rows, height, fill_mode), _fold(cols, width, fill_mode)
    if order == 0:
        # scipy rounds halves up.
        r0, c0 = jnp.floor(r + 0.5), jnp.floor(c + 0.5)
    else:
        # The top-left neighbour, kept off the last row and column so that r0 + 1 and c0 + 1 are pixels too (at
        # r = height - 1, r0 = height - 2 with weight 1 on r0 + 1). round(r - 0.5) is floor(r), or r - 1 at
        # some integers r, where the weight r - r0 is 1: the same value, and cheaper than floor on CPU.
        r0 = jnp.clip(jnp.round(r - 0.5), 0, max(height - 2, 0))
        c0 = jnp.clip(jnp.round(c - 0.5), 0, max(width - 2, 0))
    # Unsigned, because a signed index costs every gather a test for a negative (from-the-end) index.
    pixel = (jnp.arange(batch, dtype=jnp.uint32)[:, None] * height + r0.astype(jnp.uint32)) * width
    pixel = pixel + c0.astype(jnp.uint32)
    # The index travels in float32 bits, in the same array as the weights; it is only copied, never computed on.
    packed = [jax.lax.bitcast_convert_type(pixel, jnp.float32)]
    if order == 1:
        packed += [r - r0, c - c0]
    if fill_mode == "constant":
        packed.append((rows >= 0) & (rows <= height - 1) & (cols >= 0) & (cols <= width - 1))
    packed = jax.lax.optimization_barrier(jnp.stack(packed, axis=1))

    pixel = jax.lax.bitcast_convert_type(packed[:, 0], jnp.uint32)
    flat = images.reshape(-1)
    down, right = int(height > 1) * width, int(width > 1)  # steps to the neighbours, none along a 1-pixel side

    def channel(ch: int) -> jax.Array:
        def at(step: int) -> jax.Array:
            return flat[(pixel + step) * channels + ch]

        if order == 0:
            return at(0)
        wr, wc = packed[:, 1], packed[:, 2]
        # Every gather used once, so that XLA fuses it into this loop rather than writing it out.
        top = (1 - wc) * at(0) + wc * at(right)
        bottom = (1 - wc) * at(down) + wc * at(down + right)
        return (1 - wr) * top + wr * bottom

    out = jnp.stack([channel(ch) for ch in range(channels)], axis=-1)
    if fill_mode == "constant":
        out = jnp.where(packed[:, -1, :, None] > 0, out, jnp.asarray(cval, out.dtype))
    return out.reshape(batch, height, width, channels)


@functools.partial(jax.jit, static_argnames=("fill_mode", "order"))
def apply_affine_transform(
    x: jax.Array,
    theta: Scalar = 0.0,
    tx: Scalar = 0.0,
    ty: Scalar = 0.0,
    shear: Scalar = 0.0,
    zx: Scalar = 1.0,
    zy: Scalar = 1.0,
    fill_mode: str = "nearest",
    cval: Scalar = 0.0,
    order: int = 1,
) -> jax.Array:
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
      zx: zoom factor along columns; above 1 the content shrinks.
      zy: zoom factor along rows.
      fill_mode: how points outside the image are filled, with scipy.ndimage's meanings: 'nearest',
        'constant' (cval), 'reflect' or 'wrap'.
      cval: the value outside the image for 'constant'.
      order: 0 (nearest pixel, halves rounded up) or 1 (bilinear).

    Returns:
      The transformed image, shaped like `x`. It matches scipy to float32 rounding, except that a sample point
      within about 1e-5 pixels of a jump (a rounding half for order 0, an edge for 'constant', a fold for
      'wrap') may land on the other side of it, since coordinates here are float32 and scipy's float64.
    """
    x = jnp.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"x must be one (height, width, channels) image, got shape {x.shape}.")
    _check_fill_mode(fill_mode, "fill_mode")
    _check_order(order, "order")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    height, width, _ = x.shape
    matrix = _keras_matrix(*(jnp.asarray(p, jnp.float32) for p in (theta, tx, ty, shear, zx, zy)), height, width)
    return _sample(x[None], matrix[None], fill_mode, cval, order)[0].astype(x.dtype)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _nonnegative(name: str, value: Any) -> float:
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def _shift_range(name: str, value: Any) -> float | tuple[float, ...]:
    """A shift range as Keras's `get_random_transform` reads it: a float, or the values to choose from.

    Keras draws an int n as `np.random.choice(n)`, one of 0..n-1, so it becomes the tuple (0.0, ..., n - 1.0).
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
    `zoom_range` z becomes the pair (1 - z, 1 + z) as in Keras. The shift ranges are read as Keras reads them: a
    float r means U(-r, r); an int n means one of 0..n-1 pixels with a random sign (stored as that tuple); a
    sequence means one of its values with a random sign; and the draw is a fraction of the image's height
    (width) when the largest value is below 1, else pixels.
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

    def __post_init__(self) -> None:
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
        elif isinstance(zoom, (tuple, list)) and len(zoom) == 2 and all(_is_real(z) and math.isfinite(z) for z in zoom):
            if zoom[0] > zoom[1]:
                raise ValueError(f"zoom_range must be a pair (lower, upper) with lower <= upper, got {zoom!r}.")
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

    def __call__(self, key: jax.Array, images: jax.Array) -> jax.Array:
        """`augment(key, images, self)`: so a generator can be handed to `fit(..., augment=generator)`."""
        return augment(key, images, self)


# The lesson's generator (section 3.1), option for option.
LESSON_GENERATOR = ImageDataGenerator(
    rotation_range=20,
    width_shift_range=0.2,
    height_shift_range=0.2,
    shear_range=0.2,
    zoom_range=0.2,
    horizontal_flip=True,
    fill_mode="nearest",
)


def _shift(u_value: jax.Array, u_sign: jax.Array, shift_range: float | tuple[float, ...], size: int) -> jax.Array:
    """A shift in pixels along an axis of `size` pixels, from two U[0, 1) numbers and a normalised range."""
    if isinstance(shift_range, tuple):
        value = jnp.asarray(shift_range)[jnp.minimum(u_value * len(shift_range), len(shift_range) - 1).astype(int)]
        shift, largest = jnp.where(u_sign < 0.5, -value, value), max(shift_range)
    else:
        shift, largest = shift_range * (2 * u_value - 1), shift_range
    return shift * size if largest < 1 else shift


@functools.partial(jax.jit, static_argnames=("config", "image_shape"))
def random_transform_params(
    key: jax.Array, config: ImageDataGenerator, image_shape: tuple[int, int, int]
) -> dict[str, jax.Array]:
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


def _matrix(params: dict[str, jax.Array], rows: int, cols: int) -> jax.Array:
    """Keras's `apply_transform` as one map: the affine transform, then the flips."""
    flips = _flip_matrix(params["flip_horizontal"], params["flip_vertical"], rows, cols)
    return jnp.matmul(
        _keras_matrix(*(params[name] for name in _AFFINE_PARAMS), rows, cols),
        flips,
        precision=jax.lax.Precision.HIGHEST,
    )


@functools.partial(jax.jit, static_argnames="config")
def augment(key: jax.Array, images: jax.Array, config: ImageDataGenerator) -> jax.Array:
    """Augments a (batch, height, width, channels) batch, every image with its own random draw.

    Image i gets `random_transform_params(jax.random.split(key, batch)[i], config, image_shape)`, applied as
    Keras's `apply_transform` applies it: `apply_affine_transform`, then the flips. Jitted, with `config` static
    (it is hashable), so `jax.jit(augment, static_argnums=2)` or a call inside a jitted train step both work.
    Integer images come back as float32.
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be a (batch, height, width, channels) array, got shape {images.shape}.")
    keys = jax.random.split(key, images.shape[0])
    params = jax.vmap(random_transform_params, in_axes=(0, None, None))(keys, config, images.shape[1:])
    matrices = jax.vmap(_matrix, in_axes=(0, None, None))(params, *images.shape[1:3])
    dtype = images.dtype if jnp.issubdtype(images.dtype, jnp.floating) else jnp.float32
    images = images.astype(dtype)
    return _sample(images, matrices, config.fill_mode, config.cval, config.interpolation_order).astype(dtype)
