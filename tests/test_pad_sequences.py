"""`data.pad_sequences` against Keras's results, written out (checked against keras.utils.pad_sequences 3.15)."""

import numpy as np
import pytest

from flaxlesson.data import pad_sequences

SEQUENCES = [[1], [2, 3], [], [4, 5, 6, 7]]


@pytest.mark.parametrize(
    "padding, truncating, expected",
    [
        ("pre", "pre", [[-1, -1, 1], [-1, 2, 3], [-1, -1, -1], [5, 6, 7]]),
        ("pre", "post", [[-1, -1, 1], [-1, 2, 3], [-1, -1, -1], [4, 5, 6]]),
        ("post", "pre", [[1, -1, -1], [2, 3, -1], [-1, -1, -1], [5, 6, 7]]),
        ("post", "post", [[1, -1, -1], [2, 3, -1], [-1, -1, -1], [4, 5, 6]]),
    ],
)
def test_maxlen_shorter_than_longest_truncates_and_pads(padding, truncating, expected):
    out = pad_sequences(SEQUENCES, maxlen=3, padding=padding, truncating=truncating, value=-1)
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.int32


@pytest.mark.parametrize(
    "padding, truncating, expected",
    [
        ("pre", "pre", [[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 2, 3], [0] * 6, [0, 0, 4, 5, 6, 7]]),
        ("pre", "post", [[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 2, 3], [0] * 6, [0, 0, 4, 5, 6, 7]]),
        ("post", "pre", [[1, 0, 0, 0, 0, 0], [2, 3, 0, 0, 0, 0], [0] * 6, [4, 5, 6, 7, 0, 0]]),
        ("post", "post", [[1, 0, 0, 0, 0, 0], [2, 3, 0, 0, 0, 0], [0] * 6, [4, 5, 6, 7, 0, 0]]),
    ],
)
def test_maxlen_longer_than_longest_only_pads(padding, truncating, expected):
    out = pad_sequences(SEQUENCES, maxlen=6, padding=padding, truncating=truncating)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    "padding, expected",
    [
        ("pre", [[0, 0, 0, 1], [0, 0, 2, 3], [0, 0, 0, 0], [4, 5, 6, 7]]),
        ("post", [[1, 0, 0, 0], [2, 3, 0, 0], [0, 0, 0, 0], [4, 5, 6, 7]]),
    ],
)
def test_maxlen_none_pads_to_the_longest(padding, expected):
    np.testing.assert_array_equal(pad_sequences(SEQUENCES, padding=padding), expected)


def test_the_lessons_call():
    out = pad_sequences(np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]]), padding="post", maxlen=5)
    np.testing.assert_array_equal(out, [[1, 2, 3, 0, 0], [4, 5, 6, 0, 0], [7, 8, 9, 0, 0]])
    assert out.dtype == np.int32


def test_float_values_kept_with_a_float_dtype():
    out = pad_sequences([[1.5, 2.25], [3.0]], maxlen=3, dtype="float32", value=0.5)
    np.testing.assert_array_equal(out, [[0.5, 1.5, 2.25], [0.5, 0.5, 3.0]])
    assert out.dtype == np.float32


def test_dtype_float64_of_integers():
    out = pad_sequences([[1, 2], [3]], dtype="float64")
    np.testing.assert_array_equal(out, [[1.0, 2.0], [0.0, 3.0]])
    assert out.dtype == np.float64


def test_whole_floats_are_accepted_for_an_integer_dtype():
    np.testing.assert_array_equal(pad_sequences([[1.0, 2.0]], maxlen=3, value=9.0), [[9, 1, 2]])


def test_nan_value_pads_a_float_array():
    out = pad_sequences([[1, 2]], maxlen=4, dtype="float64", value=np.nan)
    np.testing.assert_array_equal(out, [[np.nan, np.nan, 1.0, 2.0]])


def test_empty_sequences_become_rows_of_value():
    np.testing.assert_array_equal(pad_sequences([[], [5]], maxlen=2, value=7), [[7, 7], [7, 5]])


def test_only_empty_sequences_give_zero_steps():
    out = pad_sequences([[], []])
    assert out.shape == (2, 0) and out.dtype == np.int32


def test_no_sequences_with_maxlen_give_zero_rows():
    assert pad_sequences([], maxlen=3).shape == (0, 3)


def test_no_sequences_without_maxlen_are_rejected():
    with pytest.raises(ValueError, match="no sequences and no maxlen"):
        pad_sequences([])


def test_sequences_of_vectors_pad_whole_items():
    out = pad_sequences([[[1, 2], [3, 4]], [[5, 6]]], maxlen=3)
    np.testing.assert_array_equal(out, [[[0, 0], [1, 2], [3, 4]], [[0, 0], [0, 0], [5, 6]]])


def test_strings_with_object_dtype():
    out = pad_sequences([["a", "b"], ["c"]], maxlen=3, dtype=object, value="")
    assert out.tolist() == [["", "a", "b"], ["", "", "c"]]


def test_maxlen_zero_gives_zero_steps_in_every_mode():
    for padding in ("pre", "post"):
        for truncating in ("pre", "post"):
            assert pad_sequences([[1, 2]], maxlen=0, padding=padding, truncating=truncating).shape == (1, 0)


@pytest.mark.parametrize("name", ["padding", "truncating"])
def test_unknown_side_is_rejected_as_keras_does(name):
    with pytest.raises(ValueError, match=f'{name}: {name.capitalize()} type "middle" not understood'):
        pad_sequences([[1, 2]], **{name: "middle"})


def test_non_integer_sequences_are_rejected_for_an_integer_dtype():
    with pytest.raises(ValueError, match=r"sequences\[1\]: dtype int32 needs whole numbers"):
        pad_sequences([[1, 2], [3.5]])


def test_non_integer_value_is_rejected_for_an_integer_dtype():
    with pytest.raises(ValueError, match="value: dtype int32 needs whole numbers"):
        pad_sequences([[1, 2]], maxlen=3, value=0.5)


def test_values_outside_the_integer_range_are_rejected():
    with pytest.raises(ValueError, match="do not fit dtype int8"):
        pad_sequences([[1, 300]], dtype="int8")


def test_string_value_needs_an_object_dtype():
    with pytest.raises(ValueError, match="value: a string needs dtype=object"):
        pad_sequences([[1]], value="x")


@pytest.mark.parametrize("maxlen", [-1, 2.0, True])
def test_bad_maxlen_is_rejected(maxlen):
    with pytest.raises(ValueError, match="maxlen must be a non-negative integer"):
        pad_sequences([[1, 2]], maxlen=maxlen)


@pytest.mark.parametrize(
    "sequences, match",
    [
        (5, "sequences must be a list of sequences"),
        ((s for s in [[1]]), "sequences must be a list of sequences"),
        ([[1], 2], r"sequences\[1\] must be a sequence"),
        ([[[1, 2]], [[3]]], r"sequences\[1\]: items of shape \(1,\), expected \(2,\)"),
    ],
)
def test_malformed_sequences_are_rejected(sequences, match):
    with pytest.raises(ValueError, match=match):
        pad_sequences(sequences)


def test_bad_dtype_is_rejected():
    with pytest.raises(ValueError, match="dtype: not a numpy dtype"):
        pad_sequences([[1]], dtype="no-such-type")


def test_unknown_side_is_rejected_even_when_every_sequence_is_empty():
    with pytest.raises(ValueError, match='padding: Padding type "middle" not understood'):
        pad_sequences([[], []], padding="middle")
