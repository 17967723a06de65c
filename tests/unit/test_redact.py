from __future__ import annotations

import pytest

from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import JsonValue
from dispatcher.core.redact import MIN_PARTIAL_LENGTH, REDACTED, Redactor
from dispatcher.core.sanitize import sanitize_text

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


# The default fragments: keys, in JSON and in text, are matched by the fragments they contain.
D = Redactor()


def test_default_fragments_match_keys_by_name_fragment() -> None:
    value: JsonValue = {
        "user": "ann",
        "db_password": "a",
        "DB-PASSWORD": "b",
        "token": "c",
        "refreshToken": "d",
        "x-api-key": "e",
        "XApiKey": "f",
        "client_secret": "g",
        "Set-Cookie": "h",
        "aws_credentials": {"id": "i"},
        "private-key": "j",
        "PHPSESSID": "k",
        "session_id": "l",
        "Proxy-Authorization": "m",
        # No fragment in these names ("auth" and "session" alone are not fragments).
        "author": "n",
        "session_count": 3,
        "keyboard": "o",
    }
    redacted = D.redact_json(value)
    assert isinstance(redacted, dict)
    kept = {k: v for k, v in redacted.items() if v != REDACTED}
    assert kept == {"user": "ann", "author": "n", "session_count": 3, "keyboard": "o"}


def test_fragments_prefer_safety_to_precision() -> None:
    # Documented: "token" is a fragment of tokens_used, "secret" of secretary.
    assert D.redact_json({"tokens_used": 12, "secretary": "bob"}) == {
        "tokens_used": REDACTED,
        "secretary": REDACTED,
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("db_password=hunter2", f"db_password={REDACTED}"),
        ("x_api_key: abc123", f"x_api_key: {REDACTED}"),
        ('{"client_secret": "s e c"}', f'{{"client_secret": "{REDACTED}"}}'),
        ("token: abc, user: ann", f"token: {REDACTED}, user: ann"),
        ("GITHUB_TOKEN='abc'", f"GITHUB_TOKEN='{REDACTED}'"),
        ("--api-token=abc --verbose", f"--api-token={REDACTED} --verbose"),
        ('note="db_password=abc"', f'note="db_password={REDACTED}"'),
        # A list or object value is masked whole, nested brackets included.
        ("{'token': ['a', {'b': 'c'}], 'n': 1}", f"{{'token': {REDACTED}, 'n': 1}}"),
        ("credentials={'u': {'p': 'x'}} ok", f"credentials={REDACTED} ok"),
        # An exception's type name is not a key: its message is kept.
        ("InvalidTokenError: token expired (token=abc)",
         f"InvalidTokenError: token expired (token={REDACTED})"),
        # Redacted text comes back unchanged (not "[REDACTED]]").
        (f"password={REDACTED} token: {REDACTED}", f"password={REDACTED} token: {REDACTED}"),
    ],
)  # fmt: skip
def test_text_pairs_match_keys_by_fragment(text: str, expected: str) -> None:
    assert D.redact_text(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("connect postgresql://app:pw@db/app failed",
         f"connect postgresql://app:{REDACTED}@db/app failed"),
        ("GET https://user:s3cr3t@example.com:8443/x?y=1",
         f"GET https://user:{REDACTED}@example.com:8443/x?y=1"),
        ("redis://:pw@cache:6379/0", f"redis://:{REDACTED}@cache:6379/0"),
        ("jdbc:mysql://root:p@ss@db:3306/x", f"jdbc:mysql://root:{REDACTED}@db:3306/x"),
        ("AMQP://Guest:Guest@rabbit//", f"AMQP://Guest:{REDACTED}@rabbit//"),
        ("dsn='postgresql://app:pw@db/app'", f"dsn='postgresql://app:{REDACTED}@db/app'"),
        # No password, nothing masked: a port, a user alone, an '@' in the path.
        ("https://example.com:8443/a@b http://ann@host:80/x redis://:pw@h",
         f"https://example.com:8443/a@b http://ann@host:80/x redis://:{REDACTED}@h"),
    ],
)  # fmt: skip
def test_url_passwords_are_masked_keeping_user_and_host(text: str, expected: str) -> None:
    assert D.redact_text(text) == expected


def test_redact_json_masks_url_passwords_and_the_documents_own_secrets() -> None:
    value: JsonValue = {
        "dsn": "postgresql://app:pw-1@db/app",
        "hooks": ["https://bot:pw-2@chat.example/hook"],
        "client_secret": "CANARY-in-doc",
        "log": "sent CANARY-in-doc to the provider",
    }
    assert D.redact_json(value) == {
        "dsn": f"postgresql://app:{REDACTED}@db/app",
        "hooks": [f"https://bot:{REDACTED}@chat.example/hook"],
        "client_secret": REDACTED,
        "log": f"sent {REDACTED} to the provider",
    }


def test_configured_fragments_match_case_insensitively() -> None:
    r = Redactor(frozenset({"SSN", "Internal-Ref"}))
    assert r.keys == {"ssn", "internalref"}
    assert r.redact_json({"customer_ssn": "1", "INTERNAL_REF": "2", "password": "3"}) == {
        "customer_ssn": REDACTED,
        "INTERNAL_REF": REDACTED,
        "password": "3",  # not configured: only the given fragments count
    }
    assert r.redact_text("Customer-SSN: 123-45-6789") == f"Customer-SSN: {REDACTED}"


@pytest.mark.parametrize("fragment", ["", "-_", "ab", "a-b"])
def test_fragments_too_short_to_mean_anything_are_refused(fragment: str) -> None:
    with pytest.raises(InvalidInput, match="redact_keys"):
        Redactor(frozenset({"password", fragment}))


SECRET = "CANARY-cut-0123456789abcdef"


@pytest.mark.parametrize("before", [1, 3, 4, 13, len(SECRET) - 4, len(SECRET) - 3])
def test_a_secret_cut_at_a_truncation_marker_is_masked_on_both_sides(before: int) -> None:
    # What an executor that cuts text itself leaves: the secret's start before the marker,
    # its end after it. Each side is masked if it has at least MIN_PARTIAL_LENGTH characters.
    marker = "…[1234 characters omitted]…"
    head, tail = SECRET[:before], SECRET[before:]
    redacted = D.redact_text(f"x = {head}{marker}{tail} = y", {SECRET})
    expected_head = REDACTED if len(head) >= MIN_PARTIAL_LENGTH else head
    expected_tail = REDACTED if len(tail) >= MIN_PARTIAL_LENGTH else tail
    assert redacted == f"x = {expected_head}{marker}{expected_tail} = y"


def test_a_secret_is_masked_where_sanitize_text_cut_it() -> None:
    cut = sanitize_text("x" * 10 + SECRET + "y" * 500, 80)
    assert cut.startswith("x" * 10 + SECRET[:8])  # the cut went through the secret
    redacted = D.redact_text(cut, {SECRET})
    assert redacted.startswith("x" * 10 + REDACTED + "…[")
    assert redacted.endswith("y" * 27)
    # Without a marker, the start of a secret is ordinary text.
    assert D.redact_text("CANARY-cut is a name", {SECRET}) == "CANARY-cut is a name"
