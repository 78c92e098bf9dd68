"""Iterative online DPO: R rounds of generate -> judge -> pair -> train, each round's policy
synced into the generators in place. One trainer and one reference actor group serve every round
(``raydpo.train.round_trainer``, ``actors.reference.ReferencePool``); with
``online.max_staleness`` >= 1 the next round's samples are drawn while a round trains.

``python -m jobs.iterative_dpo CONFIG [--set key=value ...] [--verbose]`` (or ``raydpo iterate``).
One MLflow run holds the whole run (``round/*`` metrics at step = round, the rounds plot, the
final model), with a nested run per round (its training metrics, continuing one step axis across
rounds, and its ``round/*`` metrics). Re-running the same command resumes at the first incomplete
round, reusing what it had saved (``raydpo.online.rounds``). A SIGTERM checkpoints a round's
training at the next step (or, outside training, stops at once, keeping the round's finished
parts) and exits 143; the same command resumes (docs/reliability.md).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from actors.preemption import SigtermStop
from jobs import round_stages, stages
from jobs.round_stages import Online
from raydpo import tracking
from raydpo.config import Config, ConfigError
from raydpo.online import rounds
from raydpo.online.rounds import RoundDir
from raydpo.progress import say
from raydpo.tracking import Tracker


@dataclass
class Outcome:
    run_id: str
    final_dir: str
    history: list[dict[str, float]]  # round r's metrics at index r - 1
    seconds: float


def setup(cfg: Config, tracker: Tracker) -> Online:
    """The initial policy, the prompts, the judge, and the generators holding the policy of the
    last complete round."""
    from actors import placement
    from actors.generator import GeneratorPool
    from actors.reference import ReferencePool
    from raydpo.train.round_trainer import RoundTrainer

    prepared = stages.prepare(cfg)
    stages.save_run_config(cfg, prepared.out)
    tok = round_stages.tokenizer(prepared.model_path)  # once: the prompts and the decoding of samples
    prompts = round_stages.load_prompts(cfg, tok)
    say(prompts.summary())
    tracker.log_dict({"read": prompts.read, "train": len(prompts.train), "eval": len(prompts.eval),
                      "dropped": dict(prompts.dropped), "truncated": prompts.truncated}, "prompts_report.json")
    done = rounds.first_incomplete(prepared.out, cfg.online.rounds) - 1
    policy = rounds.policy_path(prepared.out, done, prepared.model_path)  # the newest complete round's
    trained = rounds.policy_path(prepared.out, rounds.last_trained(prepared.out, cfg.online.rounds), prepared.model_path)
    # Every pool lives for the whole run: before any starts, they must fit the cluster together.
    needs_reference = (cfg.loss.needs_reference() and cfg.online.reference == "initial") or bool(prompts.eval)
    placement.check([placement.generator_pool(cfg.online.generator), placement.judge_pool(cfg.online.judge),
                     placement.reference_pool(cfg.reference) if needs_reference else None,
                     placement.trainer_pool(cfg.train)])
    # Started together: the trainer loads while round 0 is evaluated.
    trainer = RoundTrainer(trained, prepared.out, cfg.train, cfg.loss, cfg.model.dtype)
    reference = None
    if needs_reference:
        reference = ReferencePool(stages.cache_for(cfg, prepared.model_path), prepared.model_path, cfg.reference)
    pool = GeneratorPool(cfg.online.generator, prepared.model_path)
    online = Online(cfg, prepared.out, prepared.model_path, prompts, pool, round_stages.make_judge(cfg), tok,
                    tracker, trainer, reference)
    if done:
        say(f"[raydpo] resuming after round {done}: syncing its policy into the generators")
        pool.sync(policy, done)
    say(f"[raydpo] generators: {cfg.online.generator.num_actors} x {pool.backend()}")
    return online


def run_rounds(o: Online, stop: SigtermStop) -> list[dict[str, float]]:
    """Round 0 evaluates the initial policy; rounds 1..R each train the next one. Raises
    :class:`Preempted` where ``stop`` had a SIGTERM."""
    cfg, out = o.cfg, o.out
    baseline = round_stages.evaluate(o, RoundDir(out, 0))
    o.parent.log_metrics(baseline, step=0)
    if baseline:
        say(f"[raydpo] round 0 (the initial policy): eval score {baseline['round/eval_score_mean']:.3f}")
    first = rounds.first_incomplete(out, cfg.online.rounds)
    history = [rounds.read_json(RoundDir(out, r).done) for r in range(1, first)]
    last_step = int(history[-1]["round/last_step"]) if history else 0
    for r in range(first, cfg.online.rounds + 1):
        rd = RoundDir(out, r)
        child, _ = Tracker.start(cfg.tracking, rd.path, f"round {r}",
                                 tags={"mlflow.parentRunId": o.parent.run_id, "raydpo.job": "iterate", "raydpo.round": str(r)})
        try:
            metrics = run_round(o, rd, child, last_step, stop)
        except BaseException as e:
            child.finish("KILLED" if stop.preempted(e) else "FAILED", timeout=cfg.tracking.flush_timeout_s)
            raise
        child.finish("FINISHED", timeout=cfg.tracking.flush_timeout_s)
        o.parent.log_metrics(metrics, step=r)
        o.parent.log_rounds_plot(round_stages.plot_rows(o, r))
        say(f"[raydpo] round {r}: judge score {metrics['round/judge_score_mean']:.3f} -> eval score "
            f"{metrics.get('round/eval_score_mean', float('nan')):.3f}, win rate vs initial "
            f"{metrics.get('round/win_rate_vs_initial', float('nan')):.2f}, KL "
            f"{metrics.get('round/kl_to_initial', float('nan')):.3f}, {metrics['round/pairs']:.0f} pairs")
        history.append(metrics)
        last_step = int(metrics["round/last_step"])
    return history


def run_round(o: Online, rd: RoundDir, child: Tracker, last_step: int, stop: SigtermStop) -> dict[str, float]:
    """One round, stage by stage, each timed (``round/seconds_*``); its metrics once complete.
    With ``online.max_staleness`` >= 1 the next round's samples are drawn while this one trains."""
    cfg, clock = o.cfg, round_stages.StageClock()
    with clock("generate"):
        generations = round_stages.generate(o, rd)
    with clock("judge"):
        scored = round_stages.judge(o, rd, generations)
        accounting = round_stages.pair(o, rd, generations, scored)
    with stop.training(rd.train_dir), clock("train"):
        training = round_stages.begin_train(o, rd, child, last_step, clock)
        if cfg.online.max_staleness and rd.round < cfg.online.rounds:
            with clock("ahead"):
                ahead = RoundDir(o.out, rd.round + 1)
                round_stages.judge(o, ahead, round_stages.generate(o, ahead))
        trained = round_stages.end_train(o, rd, training)
    stop.raise_if_stopped()
    with clock("sync"):
        sync_seconds = round_stages.sync(o, rd, trained)
    with clock("evaluate"):
        evaluation = round_stages.evaluate(o, rd)
    with clock("save"):  # the trainer wrote the round's HF folder meanwhile
        round_stages.keep_policy(o, rd, trained)
    metrics = round_stages.round_metrics(rd, scored, accounting, trained, evaluation, sync_seconds) | clock.metrics()
    child.log_metrics(metrics, step=trained["last_step"])
    rounds.write_json(rd.done, metrics)  # the round is complete
    return metrics


def shutdown(o: Online) -> None:
    """The generators and the judge's actors, ended however the job ends (a caller in the same
    process, a test or a notebook, must not keep them holding CPUs)."""
    o.trainer.close()
    o.pool.shutdown()
    if o.reference is not None:
        o.reference.shutdown()
    if hasattr(o.judge, "shutdown"):  # a judge with actors of its own
        o.judge.shutdown()


def finish(cfg: Config, o: Online, history: list[dict[str, float]], t0: float) -> Outcome:
    final = rounds.policy_path(o.out, cfg.online.rounds, o.initial)
    if cfg.tracking.log_model:
        o.parent.log_model(final, cfg.tracking.register_as)
    delivered = o.parent.finish("FINISHED", timeout=cfg.tracking.flush_timeout_s)
    seconds = time.perf_counter() - t0
    say(f"[raydpo] {cfg.online.rounds} rounds finished in {seconds:.1f}s; final policy {final}")
    where = tracking.ui_hint(o.parent.spec.uri, o.parent.spec.experiment_id, o.parent.run_id)
    say(f"[raydpo] MLflow run {o.parent.run_id}: {where}"
        + ("" if delivered else " (some tracking data is still spooled, see above)"))
    return Outcome(o.parent.run_id, final, history, seconds)


def run(cfg: Config, config_path: str | None = None, verbose: bool = False) -> Outcome:
    """The whole job. The MLflow run is marked FAILED if anything raises (KILLED on a SIGTERM), and
    a user's error or a failed checkpoint raised inside Ray is raised as itself, unwrapped
    (``stages.failing_run``); re-running the same command resumes at the first incomplete round."""
    if cfg.online is None:
        raise ConfigError("raydpo iterate needs an online section (see configs/quickstart_online.yaml)")
    t0 = time.perf_counter()
    tracker = stages.start_run(cfg, config_path, verbose, job="iterate",
                               resumable=lambda out: (out / "rounds").exists())
    o = None
    with SigtermStop() as stop:  # after start_run: ray.init installs a SIGTERM handler of its own
        try:
            with stages.failing_run(tracker, cfg.tracking.flush_timeout_s, stop.preempted):
                o = setup(cfg, tracker)
                history = run_rounds(o, stop)
        finally:
            if o is not None:
                shutdown(o)
    return finish(cfg, o, history, t0)


def main(argv: list[str] | None = None) -> int:
    from jobs import stages

    return stages.training_job_main(argv, "raydpo iterate", __doc__, run)


if __name__ == "__main__":
    sys.exit(main())
