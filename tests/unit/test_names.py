"""Schema names: what reaches SQL quoted must be a plain identifier, short enough that
its wake-up channel (the name and "_wake") is a Postgres identifier too."""

from __future__ import annotations

import pytest

from dispatcher.core.errors import InvalidInput
from dispatcher.names import MAX_SCHEMA_NAME_LENGTH, check_schema_name


def test_the_longest_name_leaves_room_for_the_wake_up_channel() -> None:
    longest = "s" * MAX_SCHEMA_NAME_LENGTH
    assert check_schema_name(longest) == longest
    assert len(f"{longest}_wake".encode()) == 63  # NAMEDATALEN - 1
    with pytest.raises(InvalidInput, match="at most 58 characters"):
        check_schema_name(longest + "s")


@pytest.mark.parametrize("bad", ["", "Bad", "1abc", "a-b", 'a"b', "a b", "é", None, 7])
def test_anything_but_a_plain_lower_case_identifier_is_refused(bad: object) -> None:
    with pytest.raises(InvalidInput, match="schema"):
        check_schema_name(bad)  # type: ignore[arg-type]
