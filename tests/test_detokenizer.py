"""Detokenizer with the embedded model's real tokenizer: streaming deltas and stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from strata.engine.detokenizer import Detokenizer
from strata.models.embedded import embedded_model_path
from strata.models.loader import _load_tokenizer, gguf_to_folder

MULTIBYTE = "héllo wörld — 日本語 🙂 done"


@pytest.fixture(scope="module")
def tok() -> Any:
    return _load_tokenizer(gguf_to_folder(embedded_model_path()))


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def _stream(
    tok: Any, ids: Sequence[int], stop: tuple[str, ...] = (), skip_special_tokens: bool = True
) -> tuple[list[str], list[bool], Detokenizer]:
    """Feed tokens one by one as the engine does; stop at a stop string or the last token."""
    detok = Detokenizer(tok, skip_special_tokens, stop)
    deltas: list[str] = []
    stops: list[bool] = []
    for i, token in enumerate(ids):
        stopped = detok.add(token)
        stops.append(stopped)
        last = stopped or i == len(ids) - 1
        if last:
            detok.flush()  # as the engine does when a sequence finishes
        deltas.append(detok.take_delta(finished=last))
        if stopped:
            break
    return deltas, stops, detok


# ---- streaming ----------------------------------------------------------------------------


def test_multibyte_text_is_split_across_tokens(tok: Any) -> None:
    ids = _ids(tok, MULTIBYTE)
    pieces = [tok.decode([i]) for i in ids]
    # The premise of the test: some tokens hold only part of a character.
    assert sum("\ufffd" in p for p in pieces) >= 4
    assert tok.decode(ids) == MULTIBYTE


def test_streamed_deltas_join_to_full_decode(tok: Any) -> None:
    ids = _ids(tok, MULTIBYTE)
    deltas, stops, detok = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == MULTIBYTE
    assert detok.text == MULTIBYTE
    assert not any(stops)
    assert all("\ufffd" not in d for d in deltas)
    # Each delta is released as soon as its characters are complete.
    assert deltas[:7] == ["h", "é", "llo", " w", "ör", "ld", " —"]
    assert deltas[-3:] == ["語", " 🙂", " done"]


@pytest.mark.parametrize(
    "text",
    [
        "naïve café\n\n  def f(x):\n\treturn x**2  # ok",
        "👍🏽 family: 👨\u200d👩\u200d👧 flags 🇯🇵",
        "Ünïcödé ångström ß ẞ",
        "a\ufffdb",
        "  leading and trailing spaces  ",
        "日本語のテキストです。",
    ],
)
def test_streamed_deltas_join_to_full_decode_many_texts(tok: Any, text: str) -> None:
    ids = _ids(tok, text)
    deltas, _, detok = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert detok.text == text


def test_take_delta_without_new_text_is_empty(tok: Any) -> None:
    detok = Detokenizer(tok, True, ())
    assert detok.take_delta(finished=False) == ""
    detok.add(_ids(tok, "hello")[0])
    assert detok.take_delta(finished=False) == "hello"
    assert detok.take_delta(finished=False) == ""
    assert detok.take_delta(finished=True) == ""


def test_special_tokens_skipped_or_kept(tok: Any) -> None:
    hello, world = _ids(tok, "hello world")
    eos = 2
    ids = [hello, eos, world]
    skipped, _, d1 = _stream(tok, ids, skip_special_tokens=True)
    kept, _, d2 = _stream(tok, ids, skip_special_tokens=False)
    assert d1.text == tok.decode(ids, skip_special_tokens=True) == "hello world"
    assert d2.text == tok.decode(ids, skip_special_tokens=False) == "hello<|im_end|> world"
    assert skipped == ["hello", "", " world"]
    assert kept == ["hello", "<|im_end|>", " world"]


def test_ids_beyond_vocab_are_ignored(tok: Any) -> None:
    hello, world = _ids(tok, "hello world")
    beyond = len(tok) + 10
    deltas, stops, detok = _stream(tok, [hello, beyond, world])
    assert deltas == ["hello", "", " world"]
    assert stops == [False, False, False]
    assert detok.text == "hello world"


# ---- stop strings -------------------------------------------------------------------------


def test_stop_string_split_across_tokens(tok: Any) -> None:
    text = "The stop word is STOP here."
    ids = _ids(tok, text)
    assert [tok.decode([i]) for i in ids][4:6] == [" ST", "OP"]
    deltas, stops, detok = _stream(tok, ids, stop=("STOP",))
    assert stops == [False, False, False, False, False, True]
    assert detok.text == "The stop word is "
    assert "".join(deltas) == "The stop word is "
    # Three characters (len("STOP") - 1) are held back until the end.
    assert deltas == ["", "The s", "top w", "ord", " is", " "]


def test_stop_string_inside_one_token(tok: Any) -> None:
    ids = _ids(tok, "abcSTOPdef")
    assert [tok.decode([i]) for i in ids] == ["abc", "STOP", "def"]
    deltas, stops, detok = _stream(tok, ids, stop=("STOP",))
    assert stops == [False, True]
    assert detok.text == "abc"
    assert "".join(deltas) == "abc"


def test_stop_string_of_multibyte_characters_split_across_tokens(tok: Any) -> None:
    ids = _ids(tok, MULTIBYTE)
    deltas, stops, detok = _stream(tok, ids, stop=("日本",))
    # "日" takes three tokens and "本" a fourth: the stop is seen at the fourth.
    assert stops == [False] * 10 + [True]
    assert detok.text == "héllo wörld — "
    assert "".join(deltas) == "héllo wörld — "


def test_stop_string_spanning_a_token_boundary_mid_word(tok: Any) -> None:
    ids = _ids(tok, "hello world")
    deltas, stops, detok = _stream(tok, ids, stop=("o w",))
    assert stops == [False, True]
    assert detok.text == "hell"
    assert "".join(deltas) == "hell"


def test_first_of_several_stop_strings_matches(tok: Any) -> None:
    ids = _ids(tok, "The stop word is STOP here.")
    _, stops, detok = _stream(tok, ids, stop=("here", "word"))
    assert stops == [False, False, True]
    assert detok.text == "The stop "


def test_no_stop_when_string_absent(tok: Any) -> None:
    text = "The stop word is STOP here."
    ids = _ids(tok, text)
    deltas, stops, detok = _stream(tok, ids, stop=("STOPS", "xyz"))
    assert not any(stops)
    assert detok.text == text
    assert "".join(deltas) == text


# ---- hold-back ----------------------------------------------------------------------------


def test_take_delta_holds_back_possible_stop_prefix(tok: Any) -> None:
    hello, world = _ids(tok, "hello world")
    detok = Detokenizer(tok, True, ("STOP",))
    assert not detok.add(hello)
    assert detok.take_delta(finished=False) == "he"  # the last len("STOP") - 1 = 3 chars held
    assert not detok.add(world)
    assert detok.take_delta(finished=False) == "llo wo"
    assert detok.take_delta(finished=False) == ""
    assert detok.take_delta(finished=True) == "rld"
    assert detok.take_delta(finished=True) == ""
    assert detok.text == "hello world"


def test_held_tail_that_could_start_stop_is_released_when_finished(tok: Any) -> None:
    ids = _ids(tok, "The stop word is ST")
    assert tok.decode([ids[-1]]) == " ST"
    detok = Detokenizer(tok, True, ("STOP",))
    out = []
    for token in ids:
        assert not detok.add(token)
        out.append(detok.take_delta(finished=False))
    assert "".join(out) == "The stop word is"  # " ST" (len("STOP") - 1 chars) held
    assert detok.take_delta(finished=True) == " ST"
    assert detok.text == "The stop word is ST"


def test_hold_uses_longest_stop_string(tok: Any) -> None:
    (hello,) = _ids(tok, "hello")
    detok = Detokenizer(tok, True, ("x", "abcd"))
    detok.add(hello)
    assert detok.take_delta(finished=False) == "he"
    detok_one = Detokenizer(tok, True, ("x",))
    detok_one.add(hello)
    assert detok_one.take_delta(finished=False) == "hello"


# ---- regressions ------------------------------------------------------------------------


def test_text_is_cut_at_earliest_stop_string(tok: Any) -> None:
    (hello,) = _ids(tok, "hello")
    detok = Detokenizer(tok, True, ("lo", "he"))
    assert detok.add(hello)
    assert detok.text == ""


def test_finished_text_includes_trailing_incomplete_character(tok: Any) -> None:
    ids = _ids(tok, MULTIBYTE)[:9]  # stops after two of the three tokens of " 日"
    deltas, _, _ = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)
