from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from lorafleet.adapters.keys import generate_key, hash_key, key_id_of, keys_match


def test_generated_key_has_documented_format_and_embeds_its_id() -> None:
    plaintext, key_id = generate_key()
    assert re.fullmatch(r"lf_[0-9a-f]{8}_[A-Za-z0-9_-]{32}", plaintext)
    assert key_id_of(plaintext) == key_id


def test_keys_are_unique() -> None:
    assert len({generate_key()[0] for _ in range(200)}) == 200


def test_hash_is_sha256_hex_and_never_the_plaintext() -> None:
    plaintext, _ = generate_key()
    digest = hash_key(plaintext)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert plaintext not in digest
    assert hash_key(plaintext) == digest


def test_keys_match_compares_hashes() -> None:
    a, b = generate_key()[0], generate_key()[0]
    assert keys_match(hash_key(a), hash_key(a))
    assert not keys_match(hash_key(a), hash_key(b))


@given(st.text(max_size=60))
def test_key_id_of_rejects_anything_malformed(text: str) -> None:
    key_id = key_id_of(text)
    assert key_id is None or text.startswith(f"lf_{key_id}_")


def test_key_id_of_known_malformed_examples() -> None:
    assert key_id_of("lf_1234567_" + "a" * 32) is None  # short id
    assert key_id_of("lf_12345678_" + "a" * 31) is None  # short secret
    assert key_id_of("sk_12345678_" + "a" * 32) is None
