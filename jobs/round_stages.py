"""The stages of one round of online DPO, on the whole config (only ``jobs/`` sees it). Not a job.

    generate -> judge -> pair -> reference log-probs -> train -> sync -> evaluate

Each stage writes its file in the round's folder (``raydpo.online.rounds``) and is skipped when
that file exists, so a re-run resumes where the last one stopped and reuses its generations,
scores and pairs. The round's policy is the offline flow's result: the same reference stage and
``train_policy`` as ``raydpo train``, on the pairs as a Ray Dataset.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from actors.generator import GeneratorPool
from actors.reference import ReferencePool
from jobs import stages
from raydpo.config import Config
from raydpo.online import evaluation, rounds
from raydpo.online.judges import Judge, Scored
from raydpo.online.pairs import make_pairs
from raydpo.online.prompts import Prompt, PromptSet
from raydpo.online.rounds import RoundDir
from raydpo.progress import say
from raydpo.tracking import Tracker
from raydpo.train.round_trainer import RoundTrainer

ROUND_SEED_STRIDE = 1_000_003  # round r samples with sampling.seed + r * stride: new samples every round
EVAL_SEED = 7_777_777  # the evaluation samples of every policy use one seed: differences are the policy's


@dataclass
class Online:
    """What every round shares, made once by the job."""

    cfg: Config
    out: Path
    initial: str  # the initial policy's folder (or hub id)
    prompts: PromptSet
    pool: GeneratorPool  # holds the policy of version ``pool.version``
    judge: Judge
    tokenizer: Any
    parent: Tracker
    trainer: RoundTrainer  # holds the policy of the last round trained
    reference: ReferencePool | None  # the initial policy's log-probs: the pairs' reference, the evaluation's KL


class StageClock:
    """Wall seconds per stage of one round (``with clock("train"): ...``), logged as
    ``round/seconds_{stage}``; a stage timed inside another (the reference inside train) is
    subtracted from it, and ``round/seconds`` is the whole round."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._open: list[str] = []

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        self._open.append(stage)
        try:
            yield
        finally:
            self._open.pop()
            took = time.perf_counter() - t0
            self.seconds[stage] = self.seconds.get(stage, 0.0) + took
            if self._open:  # the enclosing stage's own time excludes this one
                self.seconds[self._open[-1]] = self.seconds.get(self._open[-1], 0.0) - took

    def metrics(self) -> dict[str, float]:
        return {**{f"round/seconds_{k}": v for k, v in self.seconds.items()},
                "round/seconds": time.perf_counter() - self.t0}


def _texts(o: Online, completions: list[list[int]]) -> list[str]:
    return [o.tokenizer.decode(c, skip_special_tokens=True) for c in completions]


def _generate(o: Online, prompts: list[Prompt], k: int, seed_offset: int) -> tuple[list[dict], float]:
    """Sample ``k`` completions of each prompt from the pool's policy; the rows and seconds."""
    t0 = time.perf_counter()
    samples = o.pool.generate([p.ids for p in prompts], o.cfg.online.sampling.settings(k, seed_offset))
    seconds = time.perf_counter() - t0
    rows = [{"prompt_index": p.index, "prompt_ids": p.ids, "completions": s.completions,
             "texts": _texts(o, s.completions), "logps": s.logps, "finished": s.finished, "version": s.version}
            for p, s in zip(prompts, samples)]
    return rows, seconds


def _score(o: Online, prompts: list[Prompt], completions: list[list[str]]) -> list[Scored]:
    return o.judge.score([p.item for p in prompts], completions)


def _round_prompts(o: Online, r: int) -> list[Prompt]:
    import random

    n = o.cfg.online.prompts_per_round
    train = o.prompts.train
    if n is None or n >= len(train):
        return train
    return sorted(random.Random(o.cfg.online.sampling.seed + r).sample(train, n), key=lambda p: p.index)


def generate(o: Online, rd: RoundDir) -> list[dict]:
    """The round's samples, from the policy the pool holds: the previous round's, or with
    ``online.max_staleness`` >= 1 the one before when drawn while the previous round trains.
    Each row carries its policy version; :func:`pair` refuses the ones out of bounds."""
    if not rd.generations.exists():
        prompts = _round_prompts(o, rd.round)
        say(f"[raydpo] round {rd.round}: sampling {o.cfg.online.sampling.k} completions of {len(prompts)} prompts")
        rows, seconds = _generate(o, prompts, o.cfg.online.sampling.k, rd.round * ROUND_SEED_STRIDE)
        tokens = sum(len(c) for row in rows for c in row["completions"])
        rounds.write_json(rd.path / "generation.json", {"seconds": seconds, "tokens": tokens})
        rounds.write_jsonl(rd.generations, rows)  # last: the stage is complete when this exists
    return rounds.read_jsonl(rd.generations)


def judge(o: Online, rd: RoundDir, generations: list[dict]) -> list[Scored]:
    if not rd.scores.exists():
        by_index = {p.index: p for p in o.prompts.train}
        scored = _score(o, [by_index[g["prompt_index"]] for g in generations], [g["texts"] for g in generations])
        rounds.write_jsonl(rd.scores, [{"prompt_index": g["prompt_index"], "scores": s.scores, "failures": s.failures}
                                       for g, s in zip(generations, scored)])
    return [Scored(row["scores"], row["failures"]) for row in rounds.read_jsonl(rd.scores)]


def pair(o: Online, rd: RoundDir, generations: list[dict], scored: list[Scored]) -> dict[str, Any]:
    """Writes the pairs; returns the accounting (pairs, skipped prompts by reason, judge failures,
    and the staleness of the pairs' samples: versions behind the policy the round trains, which
    is ``rd.round - 1``). Samples more than ``online.max_staleness`` versions behind, or of a
    version not yet trained, give no pair (counted as ``stale``): never trained on silently."""
    online, trains = o.cfg.online, rd.round - 1
    versions = [g["version"] for g in generations]
    columns, stats = make_pairs([g["prompt_ids"] for g in generations], [g["completions"] for g in generations],
                                scored, online.pairs, online.min_score_margin, versions,
                                accept=(trains - online.max_staleness, trains))
    if not rd.pairs.exists():
        rounds.write_pairs(rd.pairs, columns)
    say(f"[raydpo] round {rd.round}: {stats.summary()}")
    if not stats.pairs:  # e.g. a verifier that fails on everything (its first error was logged above)
        raise RuntimeError(f"round {rd.round}: the judge's scores gave no pair: {stats.summary()}")
    lags = [trains - versions[row] for row in columns["prompt_row"]]
    return {"pairs": stats.pairs, "skipped": dict(stats.skipped), "judge_failures": dict(stats.judge_failures),
            "staleness_mean": statistics.fmean(lags), "staleness_max": max(lags)}


def _reference_columns(o: Online, rd: RoundDir, pairs: pa.Table, child: Tracker) -> pa.Table:
    """The pairs' reference log-probs, written to the round's folder once: the initial policy's
    from the reference actors (through the cache), or, for ``online.reference: previous_round``,
    the trainer's own before it trains (so a round resumed mid-training reads them, not its
    half-trained policy's)."""
    from actors.reference import log_stats, summary

    if not rd.reference.exists():
        if o.cfg.online.reference == "initial":
            with_ref, stats = o.reference.add_logps(pairs)
            say(summary(stats))
            log_stats(child, stats)
            columns = {k: with_ref[k] for k in ("ref_chosen_logps", "ref_rejected_logps")}
        else:
            scored = o.trainer.score(pairs)
            columns = {k: pa.array(v, pa.float32()) for k, v in scored.items()}
        rounds.write_table(rd.reference, pa.table(columns))
    ref = rounds.read_table(rd.reference)
    return pairs.append_column("ref_chosen_logps", ref["ref_chosen_logps"]).append_column(
        "ref_rejected_logps", ref["ref_rejected_logps"])


def begin_train(o: Online, rd: RoundDir, child: Tracker, step_offset: int, clock: StageClock):
    """The round's reference log-probs, then the start of the update of the trainer's policy (the
    previous round's) on the round's pairs; :func:`end_train` waits for it. A round already
    trained gives its record instead (a dict)."""
    if rd.trained.exists():
        return rounds.read_json(rd.trained)
    pairs = rounds.read_table(rd.pairs).select(["prompt_ids", "chosen_ids", "rejected_ids"])
    if o.cfg.loss.needs_reference():
        with clock("reference"):
            pairs = _reference_columns(o, rd, pairs, child)
    return o.trainer.begin_train(pairs, rd.round, rd.train_dir, step_offset, child.spec)


def end_train(o: Online, rd: RoundDir, training) -> dict[str, Any]:
    """``{last_step, metrics, stopped}`` of the round's training (its record once written)."""
    if isinstance(training, dict):
        return training
    return o.trainer.end_train(training)


def keep_policy(o: Online, rd: RoundDir, trained: dict[str, Any]) -> None:
    """Once the trainer has written the round's HF folder (in the background, meanwhile), the
    training's record: a re-run then starts the trainer from this policy instead of training the
    round again."""
    if not rd.trained.exists():
        o.trainer.wait_saved()
        rounds.write_json(rd.trained, {"last_step": trained["last_step"], "metrics": trained["metrics"]})
    o.trainer.policy_saved(str(rd.policy))


def sync(o: Online, rd: RoundDir, trained: dict[str, Any]) -> float:
    """The round's policy into every generator; the seconds the slowest receiver took.
    ``collective``: broadcast by the trainer (it holds the policy) to every generator rank;
    ``disk``: every generator reloads the round's HF folder."""
    if o.cfg.online.generator.sync == "disk":
        keep_policy(o, rd, trained)  # the folder the generators read
        return o.pool.sync(str(rd.policy), rd.round)
    generator = o.cfg.online.generator
    index, endpoint = o.trainer.begin_send(o.pool.receivers(), generator.sync_timeout_s, generator.sync_bucket_mib * 2**20)
    receiving = o.pool.begin_receive(endpoint, rd.round)
    o.trainer.end_send(index)
    return o.pool.finish_receive(receiving, rd.round, str(rd.policy))


def _initial_logps(o: Online, prompt_ids: list[list[int]], completions: list[list[list[int]]]) -> list[list[float]]:
    """Each completion's summed log-prob under the initial policy, from the reference actors
    (through the cache: a completion seen before is not recomputed)."""
    rows = [(p, c) for p, cs in zip(prompt_ids, completions) for c in cs]
    table = pa.table({"prompt_ids": [p for p, _ in rows], "chosen_ids": [c for _, c in rows],
                      "rejected_ids": [c for _, c in rows]},  # one sequence per row: the cache computes it once
                     schema=pa.schema([(k, pa.list_(pa.int32())) for k in ("prompt_ids", "chosen_ids", "rejected_ids")]))
    with_ref, _ = o.reference.add_logps(table)
    flat = with_ref["ref_chosen_logps"].to_pylist()
    out, i = [], 0
    for cs in completions:
        out.append(flat[i: i + len(cs)])
        i += len(cs)
    return out


def evaluate(o: Online, rd: RoundDir) -> dict[str, float]:
    """The pool's policy on the fixed evaluation prompts, against the initial policy's samples
    there (round 0's): judge score statistics, win rate (a tie counts half), a sequence-level KL
    estimate (mean over its samples y of log pi(y) - log pi_initial(y)) and completion lengths;
    the arithmetic is :mod:`raydpo.online.evaluation`'s."""
    if rd.eval.exists():
        return rounds.read_json(rd.eval)
    prompts, k = o.prompts.eval, o.cfg.online.eval_samples
    if not prompts:
        return {}
    if not rd.eval_generations.exists():
        rows, _ = _generate(o, prompts, k, EVAL_SEED)
        rounds.write_jsonl(rd.eval_generations, rows)
    mine = rounds.read_jsonl(rd.eval_generations)
    if rd.round:  # scored beside the initial policy's samples: a pairwise judge compares them
        base = rounds.read_jsonl(RoundDir(o.out, 0).eval_generations)
        scored = _score(o, prompts, [m["texts"] + b["texts"] for m, b in zip(mine, base)])
    else:  # the initial policy against itself: the same scores twice, not asked twice
        scored = [Scored(s.scores * 2, s.failures) for s in _score(o, prompts, [m["texts"] for m in mine])]
    own = evaluation.score_stats([x for s in scored for x in s.scores[:k]])
    initial = _initial_logps(o, [m["prompt_ids"] for m in mine], [m["completions"] for m in mine])
    lengths = evaluation.length_stats([c for m in mine for c in m["completions"]],
                                      [f for m in mine for f in m["finished"]])
    metrics = {"round/eval_score_mean": own.mean,
               "round/eval_score_std": own.std,
               "round/eval_score_ci95": own.ci95,
               "round/win_rate_vs_initial": evaluation.win_rate([s.scores[:k] for s in scored],
                                                                [s.scores[k:] for s in scored]),
               "round/kl_to_initial": evaluation.kl_estimate([lp for m in mine for lp in m["logps"]],
                                                             [lp for lps in initial for lp in lps]),
               "round/eval_tokens_mean": lengths.mean_tokens,
               "round/eval_finished_fraction": lengths.finished_fraction}
    rounds.write_json(rd.eval, metrics)
    return metrics


def round_metrics(rd: RoundDir, scored: list[Scored], accounting: dict[str, Any], trained: dict[str, Any],
                  evaluation: dict[str, float], sync_seconds: float) -> dict[str, float]:
    scores = [x for s in scored for x in s.scores if x is not None]
    gen = rounds.read_json(rd.path / "generation.json")
    return {
        "round/judge_score_mean": statistics.fmean(scores) if scores else float("nan"),
        "round/judge_score_std": statistics.pstdev(scores) if len(scores) > 1 else 0.0,
        "round/pairs": accounting["pairs"],
        "round/skipped": sum(accounting["skipped"].values()),
        "round/stale_refused": accounting["skipped"].get("stale", 0),
        "round/judge_failures": sum(accounting["judge_failures"].values()),
        "round/gen_tokens_per_s": gen["tokens"] / gen["seconds"] if gen["seconds"] else float("nan"),
        "round/sync_seconds": sync_seconds,
        "round/staleness_mean": accounting["staleness_mean"],
        "round/staleness_max": accounting["staleness_max"],
        "round/last_step": trained["last_step"],
        **evaluation,
    }


def plot_rows(o: Online, upto: int) -> list[dict[str, float]]:
    """Per policy 0..``upto`` (0: the initial one), its evaluation as ``raydpo.plots.rounds_plot``
    reads it: score and KL of the same policy, so the frontier is the paper's reward vs KL."""
    out = []
    for r in range(upto + 1):
        path = RoundDir(o.out, r).eval
        ev = rounds.read_json(path) if path.exists() else {}
        out.append({"round/judge_score_mean": ev.get("round/eval_score_mean", float("nan")),
                    "round/judge_score_std": ev.get("round/eval_score_std", 0.0),
                    "round/kl_to_initial": ev.get("round/kl_to_initial", float("nan"))})
    return out


def tokenizer(model_path: str):
    from raydpo.models import load_tokenizer

    return load_tokenizer(model_path)


def load_prompts(cfg: Config, tok) -> PromptSet:
    """The config's prompts (files, or the synthetic task's), templated and tokenized with the
    data section's settings, the evaluation set held out."""
    from raydpo.data.synthetic import TASKS
    from raydpo.online.prompts import load_prompts as load, read_prompt_rows

    online, d = cfg.online, cfg.data
    if online.synthetic is not None:
        s = online.synthetic
        rows = [{"prompt": row["prompt"], "answer": row["chosen"]} for row in TASKS[s.task](s.rows, seed=s.seed)]
    else:
        rows = read_prompt_rows(online.prompts)
    prompts = load(rows, tok, d.tokenize_settings(), d.chat_template, online.eval_prompts, d.seed)
    if not prompts.train:
        raise ValueError(f"no training prompts left: {prompts.summary()}")
    return prompts


def make_judge(cfg: Config) -> Judge:
    """The judge ``online.judge`` names (:func:`actors.judge.make_judge`)."""
    from actors.judge import make_judge as build

    return build(cfg.online.judge, cfg.online.generator, cfg.data.max_length)
