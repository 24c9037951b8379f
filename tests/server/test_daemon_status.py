"""The error table: every daemon error has its status code, chosen most specific first."""

from __future__ import annotations

import grpc
import pytest
from ckptd.daemon import errors
from ckptd.daemon.server.status import INTERNAL_MESSAGE, STATUS_TABLE, status_for


def _error_classes() -> list[type[errors.CkptdError]]:
    found: list[type[errors.CkptdError]] = []
    pending: list[type[errors.CkptdError]] = [errors.CkptdError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_every_error_class_has_its_own_row() -> None:
    mapped = {cls for cls, _ in STATUS_TABLE}
    tree = [cls for cls in _error_classes() if cls.__module__ == errors.__name__]
    missing = [cls.__name__ for cls in tree if cls not in mapped]
    assert not missing, f"errors without a row in STATUS_TABLE: {missing}"


def test_errors_defined_elsewhere_inherit_a_specific_row() -> None:
    import ckptd.daemon.engine.core  # noqa: F401  (loads the engine's private subclasses)

    catch_all = dict(STATUS_TABLE)[errors.CkptdError]
    for cls in _error_classes():
        if cls is errors.CkptdError:
            continue
        row = next(base for base, _ in STATUS_TABLE if issubclass(cls, base))
        assert row is not errors.CkptdError, f"{cls.__qualname__} falls to {catch_all}"


def test_every_code_is_a_real_status_code() -> None:
    for cls, code in STATUS_TABLE:
        assert isinstance(code, grpc.StatusCode), cls


def test_rows_are_most_specific_first() -> None:
    # A row never follows a row of one of its base classes (it would never be reached).
    for position, (cls, _) in enumerate(STATUS_TABLE):
        earlier = [base for base, _ in STATUS_TABLE[:position]]
        shadowing = [base.__name__ for base in earlier if issubclass(cls, base)]
        assert not shadowing, f"{cls.__name__} is shadowed by {shadowing}"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.IncompleteStreamError("truncated"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.InvalidRequestError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.StepOrderError("backwards"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.RunNotFoundError("no run"), grpc.StatusCode.NOT_FOUND),
        (errors.StepNotFoundError("no step"), grpc.StatusCode.NOT_FOUND),
        (errors.StepExistsError("dup"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.BusyError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.ShuttingDownError("draining"), grpc.StatusCode.UNAVAILABLE),
        (errors.CorruptCheckpointError("checksum"), grpc.StatusCode.DATA_LOSS),
        (errors.KeyNotFoundError("blob gone"), grpc.StatusCode.DATA_LOSS),
        (errors.StorageError("disk"), grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_error_maps_to_code_with_its_message(error: Exception, code: grpc.StatusCode) -> None:
    assert status_for(error) == (code, str(error))


def test_unexpected_error_is_internal_without_its_text() -> None:
    code, message = status_for(KeyError("/secret/path"))
    assert code is grpc.StatusCode.INTERNAL
    assert message == INTERNAL_MESSAGE
    assert "secret" not in message
