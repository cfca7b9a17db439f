from __future__ import annotations

import pytest

from slomesh.emulator.tokenizer import WordTokenizer


def test_words_map_to_stable_ids_in_range():
    tok = WordTokenizer(32000)
    ids = tok.encode("the quick  brown\nfox the")
    assert len(ids) == 5
    assert ids[0] == ids[4]
    assert len(set(ids[:4])) == 4
    assert all(3 <= i < 32000 for i in ids)
    assert WordTokenizer(32000).encode("the quick brown fox") == ids[:4]


def test_decoded_text_round_trips_to_the_same_ids():
    tok = WordTokenizer(32000)
    ids = [3, 17, 31999, 12345]
    text = tok.decode(ids)
    assert text == " tok3 tok17 tok31999 tok12345"
    assert tok.encode(text) == ids
    # Stream deltas concatenate to the whole.
    assert "".join(tok.decode([i]) for i in ids) == text


def test_out_of_range_tok_words_are_hashed_like_other_words():
    tok = WordTokenizer(100)
    (i,) = tok.encode("tok100")
    assert 3 <= i < 100
    assert tok.encode("tok2") != [2]


def test_empty_text_and_bad_vocab():
    assert WordTokenizer().encode("   ") == []
    with pytest.raises(ValueError, match="vocab_size"):
        WordTokenizer(3)
