"""The canonical key order (keyorder.py): a total order, native inside a family, safe bisects."""

from __future__ import annotations

import bisect
import datetime as dt
import functools
import uuid
from decimal import Decimal

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from protobase.errors import EncodingError
from protobase.keyorder import bisect_left, bisect_right, check_key, is_key, order_key

_numbers = (
    st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.decimals(allow_nan=False, allow_infinity=False, places=3)
)
_atoms = st.none() | _numbers | st.text(max_size=6) | st.binary(max_size=6) | st.datetimes() | st.dates() | st.uuids()
_keys = st.recursive(_atoms, lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=6)

FAMILIES = {
    "number": _numbers,
    "str": st.text(max_size=6),
    "bytes": st.binary(max_size=6),
    "datetime": st.datetimes(),
    "date": st.dates(),
    "uuid": st.uuids(),
    "tuple-of-str": st.lists(st.text(max_size=3), max_size=3).map(tuple),
    "tuple-of-int": st.lists(st.integers(), max_size=3).map(tuple),
}


def _cmp(a, b) -> int:
    ka, kb = order_key(a), order_key(b)
    return (ka > kb) - (ka < kb)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_order_key_agrees_with_native_order_inside_a_family(family, data):
    a = data.draw(FAMILIES[family])
    b = data.draw(FAMILIES[family])
    assert (order_key(a) < order_key(b)) == (a < b)
    assert (order_key(a) == order_key(b)) == (a == b)


@settings(max_examples=300, deadline=None)
@given(_keys, _keys, _keys)
def test_order_key_is_a_total_order(a, b, c):
    ka, kb, kc = order_key(a), order_key(b), order_key(c)
    # trichotomy
    assert sum([ka < kb, ka == kb, ka > kb]) == 1
    # antisymmetry and transitivity
    if ka <= kb and kb <= ka:
        assert ka == kb
    if ka <= kb and kb <= kc:
        assert ka <= kc
    # equal keys are equal Python values (so a tree never holds two keys a dict would merge)
    if ka == kb:
        assert a == b


@settings(max_examples=200, deadline=None)
@given(st.lists(_keys, max_size=30))
def test_sorting_by_order_key_is_stable_under_permutation(keys):
    once = sorted(keys, key=order_key)
    twice = sorted(reversed(keys), key=order_key)
    assert [order_key(k) for k in once] == [order_key(k) for k in twice]
    assert sorted(keys, key=functools.cmp_to_key(_cmp)) == once


def test_families_are_ordered_by_rank():
    ordered = [
        None,
        -1,
        False,
        0.5,
        Decimal("2"),
        3,
        "",
        "a",
        b"",
        b"a",
        dt.datetime(2000, 1, 1),
        dt.date(1990, 1, 1),
        uuid.UUID(int=0),
        (),
        (None,),
        (1,),
        ("a",),
    ]
    assert sorted(reversed(ordered), key=order_key) == ordered


def test_numbers_of_different_types_compare_by_value():
    assert order_key(1) == order_key(1.0) == order_key(True) == order_key(Decimal("1"))
    assert order_key(2**70) > order_key(1e20) > order_key(-(2**70))
    assert order_key(Decimal("0.1")) < order_key(0.5)


def test_datetime_and_date_are_separate_families():
    # datetime is a subclass of date, yet Python refuses to compare them: they get distinct ranks.
    d, t = dt.date(2020, 1, 1), dt.datetime(2020, 1, 1)
    with pytest.raises(TypeError):
        _ = d < t
    assert order_key(t) < order_key(d)


def test_naive_and_aware_datetimes_are_ordered():
    naive, aware = dt.datetime(2020, 1, 1), dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    check_key(naive)
    check_key(aware)
    assert bisect_left([naive], aware) in (0, 1)
    assert (
        sum(
            [
                order_key(naive) < order_key(aware),
                order_key(naive) == order_key(aware),
                order_key(naive) > order_key(aware),
            ]
        )
        == 1
    )


def _sorted_unique(keys: list) -> list:
    unique: list = []
    for key in sorted(keys, key=order_key):
        if not unique or order_key(unique[-1]) != order_key(key):
            unique.append(key)
    return unique


@settings(max_examples=400, deadline=None)
@given(st.lists(_keys, max_size=40), _keys)
def test_bisect_agrees_with_sorted_order_key_list(keys, probe):
    ordered = _sorted_unique(keys)
    projected = [order_key(k) for k in ordered]
    assert bisect_left(ordered, probe) == bisect.bisect_left(projected, order_key(probe))
    assert bisect_right(ordered, probe) == bisect.bisect_right(projected, order_key(probe))


@settings(max_examples=200, deadline=None)
@given(st.lists(_keys, min_size=1, max_size=40), st.data())
def test_bisect_finds_present_keys(keys, data):
    ordered = _sorted_unique(keys)
    i = data.draw(st.integers(0, len(ordered) - 1))
    assert bisect_left(ordered, ordered[i]) == i
    assert bisect_right(ordered, ordered[i]) == i + 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers() | st.text(max_size=3), max_size=30), st.integers() | st.text(max_size=3))
def test_bisect_on_mixed_int_and_str_keys(keys, probe):
    ordered = _sorted_unique(keys)
    assume(ordered)
    position = bisect_left(ordered, probe)
    assert all(order_key(k) < order_key(probe) for k in ordered[:position])
    assert all(order_key(k) >= order_key(probe) for k in ordered[position:])


# -- check_key ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        None,
        True,
        0,
        -(2**100),
        1.5,
        float("inf"),
        Decimal("1.5"),
        "s",
        b"b",
        dt.datetime(2020, 1, 1),
        dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
        dt.date(2020, 1, 1),
        uuid.UUID(int=5),
        (),
        (1, "a", (b"x", None)),
    ],
)
def test_check_key_accepts_orderable_scalars_and_tuples(key):
    check_key(key, ("d",))


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ([1], r"cannot use a key of type list at root\['d'\]: keys of stored dicts"),
        ({"a": 1}, r"cannot use a key of type dict at root\['d'\]"),
        (frozenset({1}), r"cannot use a key of type frozenset at root\['d'\]"),
        ({1}, r"cannot use a key of type set at root\['d'\]"),
        (object(), r"cannot use a key of type object at root\['d'\]"),
        ((1, [2]), r"cannot use a key of type list at root\['d'\]"),
        ((1, frozenset()), r"cannot use a key of type frozenset at root\['d'\]"),
        (float("nan"), r"cannot use NaN as a key at root\['d'\]: NaN is not equal to itself"),
        ((1, (float("nan"),)), r"cannot use NaN as a key at root\['d'\]"),
        (
            Decimal("NaN"),
            r"cannot use Decimal\('NaN'\) as a key at root\['d'\]: a NaN is not equal to itself and "
            r"cannot be ordered among numbers",
        ),
        (Decimal("sNaN"), r"cannot use Decimal\('sNaN'\) as a key at root\['d'\]"),
        (Decimal("-NaN123"), r"cannot use Decimal\('-NaN123'\) as a key"),
        ((1, Decimal("NaN")), r"cannot use Decimal\('NaN'\) as a key at root\['d'\]"),
        ("x\ud800", r"cannot store a str holding the lone surrogate '\\ud800' \(position 1\) at root\['d'\]"),
        (("ok", "\udc80"), r"lone surrogate '\\udc80' \(position 0\) at root\['d'\]"),
    ],
)
def test_check_key_rejects(key, message):
    with pytest.raises(EncodingError, match=message):
        check_key(key, ("d",))


@pytest.mark.parametrize("value", [float("nan"), Decimal("NaN"), Decimal("sNaN"), (1, Decimal("NaN"))])
def test_nans_are_not_keys_so_indexes_leave_them_out(value):
    assert not is_key(value)
