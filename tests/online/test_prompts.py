"""Prompt rows -> templated prompt ids as the generator gets them, bad rows counted by reason,
a fixed held-out set."""
from __future__ import annotations

from raydpo.data.tokenize import TokenizeSettings, completion_ids
from raydpo.models import build_tiny_tokenizer
from raydpo.online.prompts import load_prompts


def test_prompts_are_tokenized_as_training_pairs_see_them_and_bad_rows_are_counted():
    tok = build_tiny_tokenizer()
    settings = TokenizeSettings(max_length=64, max_prompt_length=24)
    rows = [{"prompt": f"max({i:02d},{i + 1:02d})=", "answer": f"{i + 1:02d}"} for i in range(20)]
    rows += [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
             {"no_prompt": 1}, {"prompt": "   "}, {"prompt": [{"role": "user"}]}, {"prompt": "bad \ud800"},
             {"prompt": "x" * 100}]
    got = load_prompts(rows, tok, settings, None, n_eval=5, seed=0)
    assert got.read == 26
    assert dict(got.dropped) == {"missing_field": 2, "empty": 1, "invalid_unicode": 1}
    assert len(got.train) + len(got.eval) + sum(got.dropped.values()) == got.read
    assert len(got.eval) == 5 and got.truncated == 1
    # the same prompt ids a training pair of that prompt starts with
    p = next(p for p in got.train + got.eval if p.item.row.get("answer") == "05")
    whole = completion_ids(tok, p.item.messages, [{"role": "assistant", "content": "05"}])
    assert whole is not None and whole[0] == p.ids
    assert p.item.text == "max(04,05)="
    # the held-out set is fixed by the seed, whatever the order of the rows
    again = load_prompts(list(reversed(rows)), tok, settings, None, n_eval=5, seed=0)
    assert {p.item.text for p in again.eval} == {p.item.text for p in got.eval}
