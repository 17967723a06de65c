from __future__ import annotations

import pytest

from dispatcher.core.models import JsonValue
from dispatcher.core.redact import REDACTED, Redactor

R = Redactor(frozenset({"password", "authorization", "api_key"}))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"password": "x"}, {"password": REDACTED}),
        ({"PassWord": {"nested": 1}}, {"PassWord": REDACTED}),
        ({"api-key": "k"}, {"api-key": REDACTED}),
        ([{"a": [{"authorization": "t"}]}], [{"a": [{"authorization": REDACTED}]}]),
        ({"user": "ann", "n": 1}, {"user": "ann", "n": 1}),
        ({"note": "password=abc"}, {"note": f"password={REDACTED}"}),
        ("plain", "plain"),
        (None, None),
    ],
)
def test_redact_json(value: JsonValue, expected: JsonValue) -> None:
    assert R.redact_json(value) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("password=hunter2", f"password={REDACTED}"),
        ("password: hunter2 and more", f"password: {REDACTED} and more"),
        ('{"password": "s e c", "x": 1}', f'{{"password": "{REDACTED}", "x": 1}}'),
        ("{'api_key': 'abc'}", f"{{'api_key': '{REDACTED}'}}"),
        ("Authorization: Bearer abc.def", f"Authorization: {REDACTED}"),
        ("api-key=zz&next=1", f"api-key={REDACTED}&next=1"),
        ("passwordless login", "passwordless login"),
        ("nothing here", "nothing here"),
    ],
)
def test_redact_text_pairs(text: str, expected: str) -> None:
    assert R.redact_text(text) == expected


def test_literal_secrets_from_the_payload_are_scrubbed_anywhere() -> None:
    payload: JsonValue = {"a": {"password": "CANARY-1"}, "b": [{"api_key": {"x": "CANARY-2"}}]}
    secrets = R.secrets_in(payload)
    assert secrets == {"CANARY-1", "CANARY-2"}
    assert R.redact_text("saw CANARY-1 and CANARY-2", secrets) == f"saw {REDACTED} and {REDACTED}"


def test_short_values_are_not_scrubbed_as_literals() -> None:
    assert R.secrets_in({"password": "ab"}) == frozenset()


def test_an_empty_key_set_disables_redaction() -> None:
    off = Redactor(frozenset())
    assert not off.enabled
    assert off.redact_json({"password": "x"}) == {"password": "x"}
    assert off.redact_text("password=x", {"x"}) == "password=x"
