"""Penalties, logit_bias, min_tokens bans, bad words and min_p, batched on the device,
each exactly equal to a direct per-request computation token by token."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch

from strata.engine.logit_rules import LogitRules, logit_rules
from strata.engine.logits_adjust import build_adjustment
from strata.engine.sampler import Sampler, SamplingBatch
from strata.engine.sampling_params import SamplingParams
from strata.engine.sequence import Sequence
from strata.errors import InvalidRequestError

VOCAB = 97
EOS = frozenset({2})


def _seq(prompt: list[int], output: list[int], params: SamplingParams, rid: str = "r") -> Sequence:
    seq = Sequence(rid, None, prompt, params, seed=1, max_tokens=1000)
    seq.token_ids.extend(output)
    seq.logit_rules = logit_rules(params, None, VOCAB, EOS)
    return seq


def _direct(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """One row's adjusted logits, computed token by token from the definitions."""
    rules = seq.logit_rules
    out = logits.clone()
    if rules is None:
        return out
    output = seq.output_token_ids
    seen = set(seq.prompt_token_ids) | set(output)
    rep = torch.tensor(rules.repetition, dtype=torch.float32)
    for token in range(logits.shape[0]):
        value = out[token]
        if rules.penalized:
            if token in seen:
                value = value / rep if value > 0 else value * rep
            count = torch.tensor(float(output.count(token)))
            value = value - torch.tensor(rules.frequency) * count
            value = value - torch.tensor(rules.presence) * float(output.count(token) > 0)
        out[token] = value
    for token, bias in rules.bias:
        out[token] += bias
    for token in rules.banned(output):
        out[token] = -math.inf
    return out


def _random_seqs(count: int, rng: random.Random) -> list[Sequence]:
    seqs = []
    for i in range(count):
        kind = i % 5
        params = SamplingParams(
            presence_penalty=rng.uniform(-2, 2) if kind in (0, 1) else 0.0,
            frequency_penalty=rng.uniform(-2, 2) if kind in (0, 2) else 0.0,
            repetition_penalty=rng.uniform(0.5, 2.0) if kind in (0, 3) else 1.0,
            logit_bias={rng.randrange(VOCAB): rng.uniform(-100, 100) for _ in range(3)}
            if kind in (0, 4)
            else None,
            min_tokens=5 if kind == 1 else 0,
            stop_token_ids=(7,) if kind == 1 else (),
        )
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 30))]
        output = [rng.randrange(20) for _ in range(rng.randrange(0, 12))]
        seqs.append(_seq(prompt, output, params, f"r{i}"))
    return seqs


def test_batched_adjustment_equals_direct_computation() -> None:
    rng = random.Random(3)
    seqs = _random_seqs(15, rng)
    logits = torch.randn(15, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    adjust = build_adjustment(seqs, torch.device("cpu"))
    assert adjust is not None and adjust.penalties is not None
    got = adjust.apply(logits)
    for row, seq in enumerate(seqs):
        assert torch.equal(got[row], _direct(logits[row], seq)), row
    assert torch.equal(
        logits, torch.randn(15, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    )


def test_a_row_is_adjusted_the_same_in_any_batch() -> None:
    rng = random.Random(5)
    seqs = _random_seqs(10, rng)
    logits = torch.randn(10, VOCAB, generator=torch.Generator().manual_seed(1))
    full = build_adjustment(seqs, torch.device("cpu"))
    assert full is not None
    together = full.apply(logits)
    order = [7, 2, 9]
    part = build_adjustment([seqs[i] for i in order], torch.device("cpu"))
    assert part is not None
    alone = part.apply(logits[order])
    for k, i in enumerate(order):
        assert torch.equal(alone[k], together[i])


def test_no_rules_means_no_adjustment() -> None:
    seqs = [_seq([1, 2], [3], SamplingParams()), _seq([4], [], SamplingParams(min_p=0.2))]
    assert all(s.logit_rules is None for s in seqs)
    assert build_adjustment(seqs, torch.device("cpu")) is None


def test_penalty_values_by_hand() -> None:
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    seq = _seq([10], [11, 11, 12], params)
    logits = torch.zeros(1, VOCAB)
    logits[0, 10], logits[0, 11], logits[0, 12], logits[0, 13] = 4.0, -4.0, 1.0, 3.0
    adjust = build_adjustment([seq], torch.device("cpu"))
    assert adjust is not None
    got = adjust.apply(logits)[0]
    assert got[10].item() == 2.0  # prompt token: repetition only
    assert got[11].item() == -8.0 - 0.5 - 0.5  # twice in the output
    assert got[12].item() == 0.5 - 0.25 - 0.5
    assert got[13].item() == 3.0  # unseen


def test_min_tokens_bans_eos_and_stop_ids_until_reached() -> None:
    params = SamplingParams(min_tokens=3, stop_token_ids=(9,))
    rules = logit_rules(params, None, VOCAB, EOS)
    assert rules is not None and rules.stop_ids == (2, 9)
    assert rules.banned([5, 6]) == [2, 9]
    assert rules.banned([5, 6, 7]) == []
    ignoring = logit_rules(SamplingParams(min_tokens=3, ignore_eos=True), None, VOCAB, EOS)
    assert ignoring is None  # EOS is not a stop token then, and there are no others


def test_bad_words_ban_the_last_token_after_the_rest() -> None:
    rules = LogitRules((), (), 0, ((5,), (6, 7, 8)), 0.0, 0.0, 1.0)
    assert rules.banned([]) == [5]
    assert rules.banned([1, 6]) == [5]
    assert rules.banned([1, 6, 7]) == [5, 8]
    assert rules.banned([6, 7, 1]) == [5]


def test_bad_words_are_tokenized_with_and_without_a_space(tiny_chat_folder: Any) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_folder)
    rules = logit_rules(SamplingParams(bad_words=["Paris"]), tok, len(tok), EOS)
    assert rules is not None
    plain = tuple(tok.encode("Paris", add_special_tokens=False))
    spaced = tuple(tok.encode(" Paris", add_special_tokens=False))
    assert rules.bad_words == (plain, spaced)


def test_bad_words_need_a_tokenizer() -> None:
    with pytest.raises(InvalidRequestError, match="bad_words needs a model with a tokenizer"):
        logit_rules(SamplingParams(bad_words=["x"]), None, VOCAB, EOS)


def test_logit_bias_outside_vocab_is_rejected() -> None:
    with pytest.raises(
        InvalidRequestError, match=r"logit_bias token ids must be in \[0, 97\), got \[97\]"
    ) as err:
        logit_rules(SamplingParams(logit_bias={97: 1.0}), None, VOCAB, EOS)
    assert err.value.param == "logit_bias"


# ---- min_p, in the sampler ------------------------------------------------------------------


def _batch(rows: int, temperature: float, min_p: float, seed: int = 0) -> SamplingBatch:
    return SamplingBatch(
        temperature=torch.full((rows,), temperature),
        top_p=torch.ones(rows),
        top_k=torch.zeros(rows, dtype=torch.int64),
        seed=torch.arange(seed, seed + rows),
        step=torch.zeros(rows, dtype=torch.int64),
        all_greedy=temperature == 0,
        any_top_p_or_k=False,
        max_logprobs=-1,
        min_p=torch.full((rows,), min_p),
    )


def test_min_p_samples_only_tokens_above_the_floor() -> None:
    logits = torch.randn(400, 50, generator=torch.Generator().manual_seed(2)) * 2
    tokens = Sampler()(logits, _batch(400, 1.5, 0.3)).token_ids
    probs = torch.softmax(logits / 1.5, dim=-1)
    floor = 0.3 * probs.max(dim=-1).values
    chosen = probs.gather(1, tokens[:, None]).squeeze(1)
    assert bool((chosen >= floor).all())
    # With min_p 0 the same noise picks tokens below the floor somewhere.
    free = Sampler()(logits, _batch(400, 1.5, 0.0)).token_ids
    assert bool((probs.gather(1, free[:, None]).squeeze(1) < floor).any())


def test_min_p_equals_direct_renormalised_race() -> None:
    logits = torch.randn(64, 40, generator=torch.Generator().manual_seed(4))
    batch = _batch(64, 0.8, 0.1, seed=100)
    tokens = Sampler()(logits, batch).token_ids
    from strata.engine.sampler import uniform_noise

    noise = uniform_noise(batch.seed, batch.step, 40)
    for row in range(64):
        probs = torch.softmax(logits[row] / 0.8, dim=-1)
        kept = torch.where(probs >= 0.1 * probs.max(), logits[row] / 0.8, -math.inf)
        expected = (torch.softmax(kept, dim=-1) / -torch.log(noise[row])).argmax()
        assert tokens[row].item() == expected.item()


def test_logit_bias_100_forces_greedy_and_sampled_choice() -> None:
    seq = _seq([1], [], SamplingParams(logit_bias={42: 100.0}))
    logits = torch.randn(1, VOCAB) * 5
    adjust = build_adjustment([seq], torch.device("cpu"))
    for temperature in (0.0, 1.0):
        batch = _batch(1, temperature, 0.0)
        batch = SamplingBatch(**{**batch.__dict__, "min_p": None, "adjust": adjust})
        assert Sampler()(logits, batch).token_ids.item() == 42
