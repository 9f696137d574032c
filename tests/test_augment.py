"""flaxlesson.augment against Keras's recipe: scipy.ndimage.affine_transform fed Keras's matrix."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from flaxlesson.augment import LESSON_GENERATOR as LESSON
from flaxlesson.augment import ImageDataGenerator, apply_affine_transform, augment, random_transform_params

SHAPE = (7, 9, 2)  # non-square, so a row/column mix-up shows


def keras_matrix(theta, tx, ty, shear, zx, zy, rows, cols):
    """Keras's `apply_affine_transform` matrix in float64: rotation @ shift @ shear @ zoom, centred, x/y swapped."""
    t, s = np.deg2rad(theta), np.deg2rad(shear)
    rotation = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    shift = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    shear_ = np.array([[1, -np.sin(s), 0], [0, np.cos(s), 0], [0, 0, 1]])
    zoom = np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])
    ox, oy = rows / 2 - 0.5, cols / 2 - 0.5
    offset = np.array([[1, 0, ox], [0, 1, oy], [0, 0, 1]])
    reset = np.array([[1, 0, -ox], [0, 1, -oy], [0, 0, 1]])
    m = offset @ rotation @ shift @ shear_ @ zoom @ reset
    m[:, [0, 1]] = m[:, [1, 0]]
    m[[0, 1]] = m[[1, 0]]
    return m


def keras_apply(x, fill_mode, cval, order, **params):
    """What Keras returns: scipy.ndimage.affine_transform, channel by channel."""
    m = keras_matrix(**params, rows=x.shape[0], cols=x.shape[1])
    return np.stack(
        [
            scipy.ndimage.affine_transform(x[..., c], m[:2, :2], m[:2, 2], order=order, mode=fill_mode, cval=cval)
            for c in range(x.shape[-1])
        ],
        axis=-1,
    )


def near_a_boundary(params, rows, cols, margin=1e-3):
    """Whether some output pixel samples within `margin` of a multiple of 1/2.

    Every discontinuity of scipy's sampling lies there: order 0 rounds at k + 1/2 (halves up), 'constant' cuts
    off at 0 and size - 1, 'wrap' and 'reflect' fold at integers and half-integers. Float32 coordinates differ
    from scipy's float64 ones by about 1e-5, so a sample that close to a jump could land on the other side.
    """
    m = keras_matrix(**params, rows=rows, cols=cols)
    grid = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), axis=-1)
    coords = grid @ m[:2, :2].T + m[:2, 2]
    return np.any(np.abs(coords * 2 - np.round(coords * 2)) < 2 * margin)


def random_params(rng, rows, cols, count):
    """`count` wide-ranging parameter sets (plenty of samples fall outside the image), none near a boundary."""
    found = []
    while len(found) < count:
        params = dict(
            theta=rng.uniform(-180, 180),
            tx=rng.uniform(-12, 12),
            ty=rng.uniform(-12, 12),
            shear=rng.uniform(-45, 45),
            zx=rng.uniform(0.5, 2.0),
            zy=rng.uniform(0.5, 2.0),
        )
        if not near_a_boundary(params, rows, cols):
            found.append(params)
    return found


def draws(config, shape=(7, 9, 1), count=4000, seed=0):
    keys = jax.random.split(jax.random.key(seed), count)
    params = jax.vmap(random_transform_params, in_axes=(0, None, None))(keys, config, shape)
    return {name: np.asarray(value) for name, value in params.items()}


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("fill_mode", ["nearest", "constant", "reflect", "wrap"])
def test_apply_affine_transform_matches_keras(fill_mode, order):
    rng = np.random.default_rng(0)
    x = rng.random(SHAPE, dtype=np.float32)
    param_sets = random_params(rng, *SHAPE[:2], count=40)
    stacked = {name: jnp.array([p[name] for p in param_sets]) for name in param_sets[0]}
    ours = jax.jit(jax.vmap(lambda p: apply_affine_transform(x, **p, fill_mode=fill_mode, cval=0.37, order=order)))
    got = np.asarray(ours(stacked))
    want = np.stack([keras_apply(x.astype(np.float64), fill_mode, 0.37, order, **p) for p in param_sets])
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("shape", [(1, 5, 1), (4, 1, 2)])
def test_one_pixel_wide_images_match_keras(shape):
    # A side of one pixel has no neighbour to interpolate towards.
    rng = np.random.default_rng(5)
    x = rng.random(shape, dtype=np.float32)
    for fill_mode in ("nearest", "constant", "reflect", "wrap"):
        for params in random_params(rng, *shape[:2], count=5):
            got = apply_affine_transform(x, **params, fill_mode=fill_mode, cval=0.37)
            want = keras_apply(x.astype(np.float64), fill_mode, 0.37, 1, **params)
            assert np.abs(got - want).max() <= 1e-4, (fill_mode, params)


@pytest.mark.parametrize("fill_mode", ["nearest", "constant", "reflect", "wrap"])
def test_identity_returns_the_image(fill_mode):
    x = np.random.default_rng(1).random(SHAPE, dtype=np.float32)
    np.testing.assert_array_equal(apply_affine_transform(x, fill_mode=fill_mode, cval=5.0), x)


def test_tx_moves_columns_and_ty_rows_as_in_keras():
    # Keras's quirk, kept for parity: tx (drawn from height_shift_range) shifts along columns.
    x = np.zeros((7, 9, 1), np.float32)
    x[3, 4] = 1.0
    moved_by_tx = np.argwhere(np.asarray(apply_affine_transform(x, tx=2.0, fill_mode="constant"))[..., 0])
    moved_by_ty = np.argwhere(np.asarray(apply_affine_transform(x, ty=2.0, fill_mode="constant"))[..., 0])
    np.testing.assert_array_equal(moved_by_tx, [[3, 2]])
    np.testing.assert_array_equal(moved_by_ty, [[1, 4]])


def test_integer_images_come_back_as_float32():
    x = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    out = apply_affine_transform(x)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, x.astype(np.float32))


def test_lesson_draws_lie_in_keras_ranges_and_cover_them():
    p = draws(LESSON)  # image 7 x 9: tx is a fraction of 7 rows, ty of 9 columns
    for name, bound in [("theta", 20.0), ("tx", 0.2 * 7), ("ty", 0.2 * 9), ("shear", 0.2)]:
        assert np.abs(p[name]).max() <= bound, name
        assert p[name].min() < -0.98 * bound and p[name].max() > 0.98 * bound, name
    for name in ("zx", "zy"):
        assert 0.8 <= p[name].min() < 0.81 and 1.19 < p[name].max() <= 1.2, name
    assert abs(np.corrcoef(p["zx"], p["zy"])[0, 1]) < 0.1  # drawn independently


def test_flips_happen_about_half_the_time_and_only_when_asked():
    p = draws(LESSON)
    assert 0.45 < p["flip_horizontal"].mean() < 0.55
    assert not p["flip_vertical"].any()


def test_defaults_draw_the_identity():
    p = draws(ImageDataGenerator(), count=16)
    for name, value in [
        ("theta", 0),
        ("tx", 0),
        ("ty", 0),
        ("shear", 0),
        ("zx", 1),
        ("zy", 1),
        ("flip_horizontal", False),
        ("flip_vertical", False),
    ]:
        np.testing.assert_array_equal(p[name], value, err_msg=name)


def test_shift_ranges_of_one_or_more_are_pixels():
    p = draws(ImageDataGenerator(width_shift_range=3.0, height_shift_range=1.5))
    assert np.abs(p["ty"]).max() <= 3.0 and np.abs(p["ty"]).max() > 2.9
    assert np.abs(p["tx"]).max() <= 1.5 and np.abs(p["tx"]).max() > 1.45


def test_integer_shift_range_draws_whole_pixels_below_it():
    # Keras: np.random.choice(3) times a random sign.
    p = draws(ImageDataGenerator(width_shift_range=3))
    np.testing.assert_array_equal(np.unique(p["ty"]), [-2, -1, 0, 1, 2])


def test_sequence_shift_range_draws_its_values_with_a_sign():
    p = draws(ImageDataGenerator(height_shift_range=[0.1, 0.3]))  # below 1: fractions of 7 rows
    np.testing.assert_allclose(np.unique(p["tx"]), np.array([-0.3, -0.1, 0.1, 0.3]) * 7, rtol=1e-6)


def test_same_key_same_draw_other_key_other_draw():
    a, b, c = draws(LESSON, count=8, seed=0), draws(LESSON, count=8, seed=0), draws(LESSON, count=8, seed=1)
    for name in ("theta", "tx", "ty", "shear", "zx", "zy"):
        np.testing.assert_array_equal(a[name], b[name])
        assert not np.any(a[name] == c[name]), name


def test_augment_is_keras_apply_transform_per_image():
    images = np.random.default_rng(2).random((6, 7, 9, 2), dtype=np.float32)
    key = jax.random.key(3)
    config = dataclasses.replace(LESSON, vertical_flip=True, fill_mode="reflect")
    got = np.asarray(jax.jit(augment, static_argnums=2)(key, images, config))
    params = draws(config, shape=images.shape[1:], count=len(images), seed=3)
    assert params["flip_horizontal"].any() and not params["flip_horizontal"].all()
    for i, image in enumerate(images):
        p = {name: value[i] for name, value in params.items()}
        want = np.asarray(
            apply_affine_transform(
                image, *(p[n] for n in ("theta", "tx", "ty", "shear", "zx", "zy")), fill_mode="reflect"
            )
        )
        if p["flip_horizontal"]:
            want = want[:, ::-1]
        if p["flip_vertical"]:
            want = want[::-1]
        np.testing.assert_allclose(got[i], want, atol=1e-5)


def test_augment_gives_every_image_its_own_draw():
    images = np.broadcast_to(np.random.default_rng(4).random((1, 8, 8, 1), dtype=np.float32), (4, 8, 8, 1))
    out = np.asarray(augment(jax.random.key(0), images, LESSON))
    assert out.shape == images.shape and out.dtype == np.float32
    assert all(not np.allclose(out[i], out[j]) for i in range(4) for j in range(i))


def test_augment_same_key_same_images_other_key_other_images():
    images = np.random.default_rng(6).random((3, 8, 8, 1), dtype=np.float32)
    a, b, c = (np.asarray(augment(jax.random.key(seed), images, LESSON)) for seed in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert all(not np.allclose(a[i], c[i]) for i in range(3))


def test_config_is_hashable_and_normalised():
    assert hash(LESSON) == hash(dataclasses.replace(LESSON))
    assert LESSON.zoom_range == (0.8, 1.2)
    assert ImageDataGenerator(zoom_range=[0.5, 1.5]).zoom_range == (0.5, 1.5)
    assert ImageDataGenerator(width_shift_range=3).width_shift_range == (0.0, 1.0, 2.0)


@pytest.mark.parametrize(
    "argument, value",
    [
        ("rotation_range", -1.0),
        ("width_shift_range", -0.1),
        ("height_shift_range", []),
        ("height_shift_range", "0.2"),
        ("shear_range", float("nan")),
        ("zoom_range", -0.2),
        ("zoom_range", (0.5, 1.0, 1.5)),
        ("zoom_range", "0.2"),
        ("horizontal_flip", "yes"),
        ("fill_mode", "mirror"),
        ("cval", None),
        ("interpolation_order", 3),
    ],
)
def test_bad_generator_option_raises_naming_it(argument, value):
    with pytest.raises(ValueError, match=argument):
        ImageDataGenerator(**{argument: value})


@pytest.mark.parametrize(
    "argument, call",
    [
        ("x", lambda: apply_affine_transform(np.zeros((4, 4)))),
        ("fill_mode", lambda: apply_affine_transform(np.zeros((4, 4, 1)), fill_mode="mirror")),
        ("order", lambda: apply_affine_transform(np.zeros((4, 4, 1)), order=3)),
        ("image_shape", lambda: random_transform_params(jax.random.key(0), LESSON, (4, 4))),
        ("images", lambda: augment(jax.random.key(0), np.zeros((4, 4, 1)), LESSON)),
    ],
)
def test_bad_call_raises_naming_the_argument(argument, call):
    with pytest.raises(ValueError, match=argument):
        call()


def test_generator_called_on_a_batch_is_augment():
    config = ImageDataGenerator(rotation_range=20, horizontal_flip=True)
    images = jax.random.uniform(jax.random.key(1), (3, 6, 5, 1))
    np.testing.assert_array_equal(config(jax.random.key(2), images), augment(jax.random.key(2), images, config))
