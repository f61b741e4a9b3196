"""One record per request: the reader model, pauses and starts, as the scheduler keeps them."""

from __future__ import annotations

from lorafleet.serving.scheduling.tracking import RequestTrack


def test_the_first_token_starts_the_reader_and_a_dry_reader_shifts():
    t = RequestTrack(streaming=True, rate=5.0)
    assert t.delivered_to(0, now=1.0) == t  # nothing yet
    t = t.delivered_to(1, now=2.0)
    assert (t.first_token_at, t.reader_at, t.reader_tokens, t.delivered) == (2.0, 2.0, 0.0, 1)
    t = t.delivered_to(11, now=2.1)  # before the reader needs token 2 (at 2.2 s): no shift
    assert (t.reader_tokens, t.reader_at, t.delivered) == (0.0, 2.0, 11)
    # It ran dry at 2 + 11 / 5 = 4.2 s; the next token at 6 s: it waited at 11, reads on from 6.
    t = t.delivered_to(12, now=6.0)
    assert (t.reader_tokens, t.reader_at, t.first_token_at) == (11.0, 6.0, 2.0)
    assert t.delivered_to(12, now=9.0) == t  # no new token, no change


def test_pauses_are_counted_and_a_resume_is_timed_until_its_context_is_back():
    t = RequestTrack(streaming=True, rate=5.0).started(1.0)
    assert (t.started_at, t.resumed_at, t.num_pauses) == (1.0, None, 0)  # admitted, not resumed
    t = t.paused(4.0)
    assert (t.paused_since, t.num_pauses) == (4.0, 1)
    t = t.started(9.0)
    assert (t.paused_since, t.started_at, t.resumed_at, t.num_pauses) == (None, 9.0, 9.0, 1)
