"""meterline.adapters.clickhouse: which failures are worth retrying and which refuse the data for good."""

from __future__ import annotations

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, DataError, OperationalError

from meterline.adapters.clickhouse import insert_errors, storage_errors
from meterline.core.errors import StorageError, StorageRejectedError


@pytest.mark.parametrize(("exc", "rejected"), [
    (DatabaseError("Code: 53. TYPE_MISMATCH", code=53), True),
    (DatabaseError("Code: 407. DECIMAL_OVERFLOW", code=407), True),
    (DataError("Unable to create native array for column `window_start`: error"), True),
    (DatabaseError("Code: 241. MEMORY_LIMIT_EXCEEDED", code=241), False),
    (DatabaseError("Code: 252. TOO_MANY_PARTS", code=252), False),
    (DatabaseError("Code: 60. UNKNOWN_TABLE", code=60), False),
    (OperationalError("connection refused"), False),
    (ConnectionResetError("reset by peer"), False),
])
def test_refusals_of_the_data_are_told_from_transient_failures(exc: Exception, rejected: bool) -> None:
    with pytest.raises(StorageError) as info, storage_errors():
        raise exc
    assert isinstance(info.value, StorageRejectedError) is rejected


@pytest.mark.parametrize("exc", [OverflowError("int too big to convert"), TypeError("bad"), ValueError("bad")])
def test_values_the_driver_cannot_encode_refuse_an_insert(exc: Exception) -> None:
    with pytest.raises(StorageRejectedError), insert_errors():
        raise exc


def test_other_python_errors_are_bugs_not_refusals() -> None:
    with pytest.raises(KeyError), insert_errors():
        raise KeyError("bug")
