"""The judge built from its settings (:func:`make_judge`), the reward-model judge in an actor pool
of its own, and the wiring of an LLM judge to a generator.

:class:`RewardModelJudge` loads a sequence-classification model once and scores each completion of
a prompt (a :class:`raydpo.online.judges.Judge`). It is a plain class; the caller places it as Ray
actors: ``ray.remote(num_cpus=..., num_gpus=...)(RewardModelJudge).remote(model_path, ...)``.

:func:`generator_complete` turns a generator (:mod:`actors.generator`) and its tokenizer into the
``complete`` function of :class:`raydpo.online.judges.PairwiseLlmJudge`: greedy, one answer each.
"""
from __future__ import annotations

from typing import Callable

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from actors.generator import Generator, GeneratorPool, SamplingSettings
from raydpo.config import GeneratorConfig, JudgeConfig
from raydpo.models import DTYPES, load_tokenizer
from raydpo.online.judges import DEFAULT_PAIRWISE_TEMPLATE, Judge, PairwiseLlmJudge, PromptItem, Scored, VerifierJudge


def load_reward_model(model_path: str, dtype: str = "float32") -> PreTrainedModel:
    """A sequence-classification model with one or two labels (a reward model)."""
    model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=DTYPES[dtype], use_safetensors=True)
    if model.config.num_labels not in (1, 2):
        raise ValueError(f"reward model {model_path}: {model.config.num_labels} labels; a reward model has "
                         "1 (the score) or 2 (score = logit 1 - logit 0)")
    return model


class RewardModelJudge:
    """Scores ``prompt + completion`` with a reward model: ``logits[:, 0]`` for one label,
    ``logits[:, 1] - logits[:, 0]`` for two. Load once, then :meth:`score`.

    Texts are batched ``batch_size`` at a time, sorted by length (less padding), right-padded with
    the pad id the model pools on, and right-truncated to ``max_length`` tokens; a truncated text
    still gets its score, and is counted as ``failures["truncated"]`` because its end was not seen.
    """

    def __init__(self, model_path: str, dtype: str = "float32", batch_size: int = 16, max_length: int = 1024) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(model_path)  # a pad token even where the tokenizer has none
        self.model = load_reward_model(model_path, dtype).to(self.device).eval()
        # The model scores the last token that is not its pad id: without one it cannot find the end of
        # a padded text; with one other than the id we pad with it would score the padding.
        text_config = self.model.config.get_text_config()
        if text_config.pad_token_id is None:
            text_config.pad_token_id = self.tokenizer.pad_token_id
        self.pad_id = int(text_config.pad_token_id)
        self.batch_size = batch_size
        self.max_length = max_length

    def text(self, prompt: PromptItem, completion: str) -> str:
        """The prompt's messages + the completion as the assistant's turn, through the chat template
        where the tokenizer has one; else the prompt's text followed by the completion."""
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                prompt.messages + [{"role": "assistant", "content": completion}], tokenize=False)
        return prompt.text + completion

    def ids(self, prompt: PromptItem, completion: str) -> list[int]:
        # A chat template writes its own special tokens (BOS included); plain text gets the tokenizer's.
        add_special = not self.tokenizer.chat_template
        return list(self.tokenizer(self.text(prompt, completion), add_special_tokens=add_special)["input_ids"])

    def score(self, prompts: list[PromptItem], completions: list[list[str]]) -> list[Scored]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} lists of completions")
        where = [(p, c) for p, texts in enumerate(completions) for c in range(len(texts))]
        seqs = [self.ids(prompts[p], completions[p][c]) for p, c in where]
        truncated = [len(s) > self.max_length for s in seqs]
        seqs = [s[: self.max_length] for s in seqs]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        values: list[float] = [0.0] * len(seqs)
        for start in range(0, len(order), self.batch_size):
            batch = order[start: start + self.batch_size]
            for i, v in zip(batch, self._forward([seqs[i] for i in batch])):
                values[i] = v
        out = [Scored([None] * len(texts)) for texts in completions]
        for i, (p, c) in enumerate(where):
            out[p].scores[c] = values[i]
            if truncated[i]:
                out[p].failures["truncated"] = out[p].failures.get("truncated", 0) + 1
        return out

    def _forward(self, seqs: list[list[int]]) -> list[float]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, : len(s)] = 1
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
        score = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
        return score.cpu().tolist()


def generator_complete(generator: Generator, tokenizer: PreTrainedTokenizerBase,
                       max_new_tokens: int = 8) -> Callable[[list[str]], list[str]]:
    """``complete`` for :class:`raydpo.online.judges.PairwiseLlmJudge`: each question goes to the
    judge model as one user message (through its chat template where it has one, else as plain
    text) and is answered greedily; answers are decoded without special tokens. All questions of a
    call are one ``generate`` call."""
    greedy = SamplingSettings(k=1, temperature=0.0, max_new_tokens=max_new_tokens)

    def encode(question: str) -> list[int]:
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                 add_generation_prompt=True)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(tokenizer(question)["input_ids"])

    def complete(questions: list[str]) -> list[str]:
        samples = generator.generate([encode(q) for q in questions], greedy)
        return [tokenizer.decode(s.completions[0], skip_special_tokens=True) for s in samples]

    return complete


class RewardModelPool:
    """``num_actors`` :class:`RewardModelJudge` actors behind one :meth:`score` (a
    :class:`raydpo.online.judges.Judge`): the prompts are split into contiguous shards, one per
    actor; an actor that dies is replaced and its shard scored again (``actors.shards``)."""

    MAX_RESTARTS = 3

    def __init__(self, model_path: str, *, num_actors: int, num_cpus: float, num_gpus: float, dtype: str = "float32",
                 batch_size: int = 16, max_length: int = 1024, accelerator_type: str | None = None,
                 resources: dict[str, float] | None = None) -> None:
        import ray

        self._actor = ray.remote(RewardModelJudge).options(num_cpus=num_cpus, num_gpus=num_gpus,
                                                           accelerator_type=accelerator_type, resources=resources)
        self._args = (model_path, dtype, batch_size, max_length)
        self.actors = [self._actor.remote(*self._args) for _ in range(num_actors)]

    def _replace(self, i: int, error: Exception) -> None:
        from raydpo.progress import say

        say(f"[raydpo] reward-model actor {i} died ({type(error).__name__}); starting another and scoring its prompts again")
        self.actors[i] = self._actor.remote(*self._args)

    def score(self, prompts: list[PromptItem], completions: list[list[str]]) -> list[Scored]:
        from actors.shards import run_sharded

        def call(i: int, lo: int, hi: int):
            return self.actors[i].score.remote(prompts[lo:hi], completions[lo:hi])

        shards = run_sharded(len(prompts), len(self.actors), call, self._replace, self.MAX_RESTARTS)
        return [s for shard in shards for s in shard]

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


def make_judge(judge: JudgeConfig, generator: GeneratorConfig, max_length: int) -> Judge:
    """The judge ``judge.type`` names: a verifier in the driver, a reward model in an actor pool of
    its own (texts cut at ``max_length`` tokens), or an LLM served by generator actors of its own
    (greedy, version 0) on ``judge``'s resources, with the policy generators' ``backend`` and ``env``."""
    if judge.type == "verifier":
        return VerifierJudge(judge.verifier, judge.verifier_args)
    if judge.type == "reward_model":
        return RewardModelPool(judge.model, num_actors=judge.num_actors, num_cpus=judge.num_cpus,
                               num_gpus=judge.num_gpus, dtype=judge.model_dtype, batch_size=judge.batch_size,
                               max_length=max_length,
                               accelerator_type=judge.accelerator_type, resources=judge.resources)
    served = GeneratorPool(GeneratorConfig(backend=generator.backend, num_actors=judge.num_actors,
                                           num_cpus=judge.num_cpus, num_gpus=judge.num_gpus,
                                           accelerator_type=judge.accelerator_type, resources=judge.resources,
                                           env=generator.env, dtype=judge.model_dtype),
                           judge.model)
    return PairwiseLlmJudge(generator_complete(served, load_tokenizer(judge.model)),
                            judge.template or DEFAULT_PAIRWISE_TEMPLATE)
