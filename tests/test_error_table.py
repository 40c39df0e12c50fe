"""The error table: every error class of errors.py crosses the socket as itself."""

from __future__ import annotations

import pytest

import protobase
from protobase import errors
from protobase.client.connection import Refusal
from protobase.wire.error_table import ERROR_CLASSES, error_fields, error_from_reply, error_reply

MESSAGE_ONLY = [cls for cls in ERROR_CLASSES.values() if cls is not errors.ConflictError]


def test_the_table_holds_every_error_class_of_errors_py_and_nothing_else():
    defined = {
        name: value
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.ProtoBaseError)
    }
    assert dict(ERROR_CLASSES) == defined
    assert set(errors.__all__) == set(defined)


def test_every_error_class_is_public():
    assert all(getattr(protobase, name) is cls for name, cls in ERROR_CLASSES.items())


@pytest.mark.parametrize("error_class", MESSAGE_ONLY, ids=lambda cls: cls.__name__)
def test_an_error_arrives_as_its_own_class_with_its_message(error_class):
    received = error_from_reply(error_reply(error_class("what happened; what to do")))
    assert type(received) is error_class
    assert str(received) == "what happened; what to do"
    assert received.retryable is error_class.retryable


def test_a_subclass_defined_elsewhere_is_sent_as_its_nearest_class_in_the_table():
    assert error_reply(Refusal("no more descriptors")) == ["error", "CoordinatorError", "no more descriptors"]


def test_a_peer_cannot_make_the_client_build_another_class():
    for name in ("SystemExit", "Refusal", "__class__", "os.system", "format_path"):
        received = error_from_reply(["error", name, "boom"])
        assert type(received) is errors.ProtoBaseError and str(received) == "boom"


def test_a_conflict_sent_as_an_error_arrives_as_a_plain_error_with_its_message():
    received = error_from_reply(["error", "ConflictError", "key changed"])
    assert type(received) is errors.ProtoBaseError and str(received) == "key changed"


def test_an_error_reply_without_a_message_still_explains():
    assert "without a message" in str(error_from_reply(["error", "CorruptionError"]))


def test_error_fields_refuses_what_is_not_a_protobase_error():
    with pytest.raises(AssertionError):
        error_fields(ValueError, "no")  # type: ignore[arg-type]
