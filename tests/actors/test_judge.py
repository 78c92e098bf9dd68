"""The reward-model judge against the model called one text at a time, in-process and as a Ray
actor; and the pairwise LLM judge wired to a real generator (``generator_complete``)."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from actors.generator import TransformersGenerator
from actors.judge import RewardModelJudge, generator_complete
from raydpo.models import build_tiny_tokenizer, load_tokenizer, write_tiny
from raydpo.online.judges import DEFAULT_PAIRWISE_TEMPLATE, PairwiseLlmJudge, PromptItem, render_pairwise, verdict
from raydpo.online.verifiers import max_task


def item(text: str) -> PromptItem:
    return PromptItem(messages=[{"role": "user", "content": text}], text=text, row={"prompt": text})


PROMPTS = [item("max(07,42)="), item("max(99,10)=")]
COMPLETIONS = [["42", "07", "42<|end|>", "a much longer answer: 42, then more"], ["99", "x"]]


def reward_model(folder: Path, num_labels: int = 1, chat_template: bool = True) -> Path:
    """A random-init Llama reward model over the tiny tokenizer; weights spread wide (std 0.2) so
    that texts score far apart and a score taken at the wrong token shows."""
    tok = build_tiny_tokenizer()
    if not chat_template:
        tok.chat_template = None
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         num_labels=num_labels, pad_token_id=tok.pad_token_id, initializer_range=0.2)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def direct_scores(folder: Path, texts: list[str]) -> list[float]:
    """The model on each text alone: no padding, no batching."""
    model = LlamaForSequenceClassification.from_pretrained(folder).eval()
    tok = load_tokenizer(str(folder))
    out = []
    for text in texts:
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        out.append(float(logits[0] if len(logits) == 1 else logits[1] - logits[0]))
    return out


def chat_texts() -> list[list[str]]:
    """The tiny chat template written out by hand: user turn, then the completion as the assistant's."""
    return [[f"<|user|>{p.text}<|end|><|assistant|>{c}<|end|>" for c in cs] for p, cs in zip(PROMPTS, COMPLETIONS)]


@pytest.mark.parametrize("num_labels", [1, 2])
def test_reward_scores_equal_the_model_one_text_at_a_time(tmp_path, num_labels):
    folder = reward_model(tmp_path / "rm", num_labels)
    judge = RewardModelJudge(str(folder), batch_size=3)  # batches of mixed lengths: padding in play
    got = judge.score(PROMPTS, COMPLETIONS)
    expected = [direct_scores(folder, texts) for texts in chat_texts()]
    assert [s.scores for s in got] == [pytest.approx(e, abs=1e-5) for e in expected]
    assert [s.failures for s in got] == [{}, {}]
    flat = [v for e in expected for v in e]
    assert max(flat) - min(flat) > 0.1  # the texts really score apart: a wrong token would show


def test_reward_without_a_chat_template_scores_prompt_then_completion(tmp_path):
    folder = reward_model(tmp_path / "rm", chat_template=False)
    judge = RewardModelJudge(str(folder), batch_size=16)
    assert judge.text(PROMPTS[0], "42") == "max(07,42)=42"
    got = judge.score(PROMPTS, COMPLETIONS)
    expected = [direct_scores(folder, [p.text + c for c in cs]) for p, cs in zip(PROMPTS, COMPLETIONS)]
    assert [s.scores for s in got] == [pytest.approx(e, abs=1e-5) for e in expected]


def test_reward_truncates_on_the_right_and_counts_it(tmp_path):
    folder = reward_model(tmp_path / "rm")
    judge = RewardModelJudge(str(folder), batch_size=2, max_length=30)
    got = judge.score(PROMPTS, COMPLETIONS)
    tok = load_tokenizer(str(folder))
    texts = [t for ts in chat_texts() for t in ts]
    cut = [tok.decode(tok(t, add_special_tokens=False)["input_ids"][:30]) for t in texts]
    assert [v for s in got for v in s.scores] == pytest.approx(direct_scores(folder, cut), abs=1e-5)
    long = [len(tok(t, add_special_tokens=False)["input_ids"]) > 30 for t in texts]
    assert sum(long) == 1  # only the long answer
    assert [s.failures for s in got] == [{"truncated": 1}, {}]


def test_reward_judge_as_a_ray_actor(ray_local, tmp_path):
    import ray

    folder = reward_model(tmp_path / "rm")
    actor = ray.remote(num_cpus=1)(RewardModelJudge).remote(str(folder), "float32", 2)
    got = ray.get(actor.score.remote(PROMPTS, COMPLETIONS))
    expected = [direct_scores(folder, texts) for texts in chat_texts()]
    assert [s.scores for s in got] == [pytest.approx(e, abs=1e-5) for e in expected]
    ray.kill(actor)


JUDGED = [["42", "07", "4"], ["99", "x", "10", "9"]]  # what the LLM judge compares


def judge_questions(completions: list[list[str]]) -> list[str]:
    return [render_pairwise(DEFAULT_PAIRWISE_TEMPLATE, p.text, x, y)
            for p, cs in zip(PROMPTS, completions) for x, y in itertools.permutations(cs, 2)]


def chat_prompt(tok, question: str) -> list[int]:
    """The tiny chat template written out by hand: the question as the user turn, then the assistant's turn."""
    return tok(f"<|user|>{question}<|end|><|assistant|>", add_special_tokens=False)["input_ids"]


def letter_model(folder: Path) -> Path:
    """A judge model that answers ``A`` or ``B`` to the questions of :data:`JUDGED`, picking the
    completion that ``max_task`` scores higher. Its LM head is fitted to do so (least squares on the
    last hidden states: +1 for the better one shown as A, -1 as B), with the ``A`` row the fitted
    direction, ``B`` its negative, every other logit 0. A random model answers garbage (the
    ``random`` case); this one answers, and both orders agree."""
    tok = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=2)
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval()
    shown = [(p.text, x, y) for p, cs in zip(PROMPTS, JUDGED) for x, y in itertools.permutations(cs, 2)]
    target = torch.tensor([1.0 if max_task(p, x, {}) > max_task(p, y, {}) else -1.0 for p, x, y in shown],
                          dtype=torch.float64)
    with torch.no_grad():
        hidden = torch.stack([model.model(input_ids=torch.tensor([chat_prompt(tok, q)])).last_hidden_state[0, -1]
                              for q in judge_questions(JUDGED)]).double()
        direction = torch.linalg.lstsq(hidden, target[:, None], driver="gelsd").solution[:, 0]
        assert torch.allclose(hidden @ direction, target, atol=1e-3)
        a, b = tok.convert_tokens_to_ids(["A", "B"])
        model.lm_head.weight.zero_()
        model.lm_head.weight[a] = 10.0 * direction.float()  # logits +-10
        model.lm_head.weight[b] = -10.0 * direction.float()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_generator_complete_answers_greedily_through_the_chat_template(tmp_path):
    folder = letter_model(tmp_path / "judge")
    tok = load_tokenizer(str(folder))
    complete = generator_complete(TransformersGenerator(str(folder)), tok, max_new_tokens=1)
    questions = judge_questions(JUDGED)
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    expected = []
    for q in questions:  # the next token of the hand-written chat text, straight from the model
        ids = torch.tensor([chat_prompt(tok, q)])
        with torch.no_grad():
            expected.append(tok.decode([int(model(input_ids=ids).logits[0, -1].argmax())]))
    assert complete(questions) == expected
    assert set(expected) == {"A", "B"}  # letters only, and both of them


@pytest.mark.parametrize("kind", ["letters", "random"])
def test_pairwise_judge_on_a_real_generator_accounts_for_every_question(tmp_path, kind):
    """Every question's answer ends up in the counts: both orders' letters agree (a win), differ
    (``position_bias``, a tie) or one is missing (``unparseable``, the comparison not counted)."""
    if kind == "letters":
        folder = letter_model(tmp_path / "judge")
    else:  # the tiny model as it is: answers are mostly garbage
        folder = write_tiny(tmp_path / "judge", hidden_size=64, num_layers=2, num_heads=2, max_positions=1024)
    tok = load_tokenizer(str(folder))
    real = generator_complete(TransformersGenerator(str(folder)), tok, max_new_tokens=1 if kind == "letters" else 4)
    answers: dict[str, str] = {}
    calls = []

    def complete(questions: list[str]) -> list[str]:  # the real one, with its answers kept for the check
        calls.append(len(questions))
        got = real(questions)
        answers.update(zip(questions, got))
        return got

    prompts, completions = PROMPTS, JUDGED
    got = PairwiseLlmJudge(complete).score(prompts, completions)
    assert calls == [2 * (3 + 6)]  # one batched call: every pair, both orders

    for p, cs, scored in zip(prompts, completions, got):
        wins, counted = [0.0] * len(cs), [0] * len(cs)
        expected = {}
        for x, y in itertools.combinations(range(len(cs)), 2):
            first = verdict(answers[render_pairwise(DEFAULT_PAIRWISE_TEMPLATE, p.text, cs[x], cs[y])])
            second = verdict(answers[render_pairwise(DEFAULT_PAIRWISE_TEMPLATE, p.text, cs[y], cs[x])])
            if first is None or second is None:
                expected["unparseable"] = expected.get("unparseable", 0) + (first is None) + (second is None)
                continue
            share = 1.0 if (first, second) == ("A", "B") else 0.0 if (first, second) == ("B", "A") else 0.5
            if share == 0.5:
                expected["position_bias"] = expected.get("position_bias", 0) + 1
            wins[x], wins[y] = wins[x] + share, wins[y] + 1 - share
            counted[x], counted[y] = counted[x] + 1, counted[y] + 1
        assert scored.failures == expected
        assert scored.scores == [w / c if c else None for w, c in zip(wins, counted)]
        assert all(s is None or 0.0 <= s <= 1.0 for s in scored.scores)
        if kind == "letters":  # every answer is a letter: every comparison counts, a point each
            assert "unparseable" not in scored.failures and sum(scored.scores) == pytest.approx(len(cs) / 2)
    if kind == "letters":  # the judge model ranks as max_task does: 42 > 07 > 4 and 99 > 10 > 9 > x
        assert [s.scores for s in got] == [[1.0, 0.5, 0.0], [1.0, 0.0, pytest.approx(2 / 3), pytest.approx(1 / 3)]]


def test_the_judges_pools_score_as_one_judge_does(ray_local, tmp_path):
    """The reward model over two actors, and the LLM judge served by a generator pool, give what
    one in-process judge gives: sharding the prompts changes nothing, nor does a reward-model
    actor killed by its pid (it is replaced and its shard scored again)."""
    from actors.generator import GeneratorPool
    from actors.judge import RewardModelPool
    from raydpo.config import GeneratorConfig

    rm = reward_model(tmp_path / "rm")
    prompts, completions = PROMPTS * 2, COMPLETIONS * 2
    pool = RewardModelPool(str(rm), num_actors=2, num_cpus=0.5, num_gpus=0, batch_size=2)
    expected = RewardModelJudge(str(rm), batch_size=2).score(prompts, completions)
    assert [s.scores for s in pool.score(prompts, completions)] == [pytest.approx(e.scores, abs=1e-5) for e in expected]
    import os
    import signal

    import ray

    os.kill(ray.get(pool.actors[1].__ray_call__.remote(lambda self: os.getpid())), signal.SIGKILL)
    assert [s.scores for s in pool.score(prompts, completions)] == [pytest.approx(e.scores, abs=1e-5) for e in expected]
    pool.shutdown()

    folder = letter_model(tmp_path / "judge")
    tok = load_tokenizer(str(folder))
    served = GeneratorPool(GeneratorConfig(backend="transformers", num_actors=2, num_cpus=0.5), str(folder))
    got = PairwiseLlmJudge(generator_complete(served, tok, max_new_tokens=1)).score(PROMPTS, JUDGED)
    local = PairwiseLlmJudge(generator_complete(TransformersGenerator(str(folder)), tok, max_new_tokens=1))
    assert got == local.score(PROMPTS, JUDGED)
    served.shutdown()
