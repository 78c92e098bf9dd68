"""Online DPO end to end (``raydpo iterate``) on a real local Ray, a real MLflow store and the
real generators: the quickstart's rounds, shrunk; a run stopped by SIGTERM mid-round checkpoints,
resumes from there and reuses what the round saved; the judge score rises."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raydpo.config import load_config
from raydpo.online.rounds import RoundDir, read_json, read_jsonl, read_table
from tests.jobs.strike import Strike, checkpoints, freeze, trained_rows, wait_for_step, wait_until

pytestmark = pytest.mark.slow  # two online jobs of two rounds each, one stopped by a real SIGTERM (minutes)
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["online.synthetic.rows=160"]  # 128 training prompts, 32 held out: half the quickstart's


def online(tmp_path: Path, uri: str, *overrides: str):
    return load_config(ROOT / "configs/quickstart_online.yaml",
                       [f"output_dir={tmp_path / 'out'}", f"tracking.uri={uri}", "tracking.experiment=test",
                        f"reference.cache_dir={tmp_path / 'ref-cache'}", "tracking.log_model=false", *overrides])


def steps(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}


def test_rounds_raise_the_score_resume_and_are_tracked(ray_local, tmp_path, mlflow_uri):
    import ray

    from actors.preemption import Preempted
    from jobs.iterative_dpo import run
    from raydpo.train.loop import stop_signal_name

    out, r1 = tmp_path / "out", RoundDir(tmp_path / "out", 1)
    # A real SIGTERM (a spot instance's notice) to this process, the driver, while round 1 trains:
    # its worker is frozen after step 1 so the signal lands mid-training on any machine, and
    # thawed once the driver has asked the workers to stop.
    struck: dict[str, int] = {}

    def sigterm(running) -> None:
        worker = wait_for_step(r1.train_dir, 1, set(), running)["pid"]
        try:
            struck["after_step"], struck["worker"] = freeze(worker, r1.train_dir), worker
            os.kill(os.getpid(), signal.SIGTERM)
            stop = ray.get_actor(stop_signal_name(str(r1.train_dir), ray.get_runtime_context().get_job_id()))
            wait_until(lambda: ray.get(stop.requested.remote()), "the stop request", running)
        finally:
            os.kill(worker, signal.SIGCONT)

    smaller = ["train.batch_size=16", "train.micro_batch_size=16"]  # about 6 steps a round: the stop lands before the last
    with Strike(sigterm), pytest.raises(Preempted) as preempted:
        run(online(tmp_path, mlflow_uri, *SMALL, *smaller))
    stopped = preempted.value.step  # the step round 1's training checkpointed on the way out
    assert stopped is not None and stopped >= struck["after_step"], str(preempted.value)
    assert checkpoints(r1.train_dir, out / "trainer" / "ray" / "train")[-1] == stopped  # the run's one trainer
    assert r1.pairs.exists() and not r1.complete() and not r1.policy.exists()
    client = MlflowClient(mlflow_uri)
    run_id = (out / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"
    saved = {p: p.read_bytes() for p in (r1.generations, r1.scores, r1.pairs)}
    mtimes = {p: p.stat().st_mtime_ns for p in saved}

    outcome = run(online(tmp_path, mlflow_uri, *SMALL, *smaller))  # the same command: resumes round 1's training, then round 2

    resumed = [line for line in trained_rows(r1.train_dir) if line["pid"] != struck["worker"]]
    assert min(line["step"] for line in resumed) == stopped + 1  # from the checkpoint, nothing trained twice
    for p, body in saved.items():  # reused, not regenerated
        assert p.read_bytes() == body and p.stat().st_mtime_ns == mtimes[p], p
    assert len(outcome.history) == 2 and Path(outcome.final_dir) == RoundDir(out, 2).policy

    # Every prompt of a round gives pairs or is counted as skipped, and the pairs on disk are the ones counted.
    for r, m in enumerate(outcome.history, start=1):
        rd = RoundDir(out, r)
        generations = read_jsonl(rd.generations)
        assert all(g["version"] == r - 1 for g in generations)  # sampled from the previous round's policy
        assert all(len(g["completions"]) == 4 for g in generations)
        assert read_table(rd.pairs).num_rows == m["round/pairs"] > 0
        assert m["round/pairs"] <= len(generations)  # best_worst: at most one pair per prompt
        assert m["round/skipped"] == len(generations) - len({int(i) for i in read_table(rd.pairs)["prompt_row"].to_pylist()})

    # The score rises: the last policy beats the initial one on the held-out prompts.
    baseline, last = read_json(RoundDir(out, 0).eval), outcome.history[-1]
    assert baseline["round/win_rate_vs_initial"] == 0.5 and abs(baseline["round/kl_to_initial"]) < 1e-3
    assert last["round/eval_score_mean"] > baseline["round/eval_score_mean"]
    assert last["round/win_rate_vs_initial"] > 0.5
    assert last["round/kl_to_initial"] > 0

    # One parent run (the same one after the resume) with round/* at step = round, and a nested
    # run per round whose training steps continue one axis.
    parent = client.get_run(outcome.run_id)
    assert parent.info.run_id == run_id and parent.info.status == "FINISHED"
    assert sorted(steps(client, parent.info.run_id, "round/eval_score_mean")) == [0, 1, 2]
    assert sorted(steps(client, parent.info.run_id, "round/pairs")) == [1, 2]
    assert "plots/rounds.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_round = {int(c.data.tags["raydpo.round"]): c for c in children}
    assert sorted(by_round) == [1, 2] and all(c.info.status == "FINISHED" for c in by_round.values())
    loss1 = steps(client, by_round[1].info.run_id, "loss")
    loss2 = steps(client, by_round[2].info.run_id, "loss")
    assert max(loss1) == outcome.history[0]["round/last_step"] < min(loss2)
    assert max(loss2) == outcome.history[1]["round/last_step"]


def test_staleness_one_and_the_previous_round_as_reference(ray_local, tmp_path, mlflow_uri):
    """``online.max_staleness: 1``: round 2's samples are drawn from the initial policy while round
    1 trains, and round 2 trains on them (staleness 1, logged). Round 1's training fails once
    (``train.fail_at_step``) after those samples were drawn: the same command resumes, keeps them
    and does not draw them again. ``online.reference: previous_round``: the trainer scores each
    round's pairs before it trains them, and in round 1 (policy = the initial one that sampled
    them) its numbers are the generator's own log-probs of the same completions."""
    from jobs.iterative_dpo import run

    out = tmp_path / "out"
    r1, r2 = RoundDir(out, 1), RoundDir(out, 2)
    cfg = online(tmp_path, mlflow_uri, *SMALL, "online.max_staleness=1", "online.reference=previous_round")
    with pytest.raises(Exception, match="injected failure after step 2"):
        run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"fail_at_step": 2})}))
    assert not RoundDir(out, 1).complete() and r2.generations.exists() and not r2.pairs.exists()
    drawn = r2.generations.read_bytes()

    outcome = run(cfg)  # resumes: round 1 trains again, round 2 on the samples drawn before
    assert r2.generations.read_bytes() == drawn
    assert {g["version"] for g in read_jsonl(r2.generations)} == {0}  # drawn while round 1 trained
    first, second = outcome.history
    assert first["round/staleness_max"] == 0 and second["round/staleness_mean"] == second["round/staleness_max"] == 1
    assert second["round/stale_refused"] == 0 and second["round/pairs"] > 0
    client = MlflowClient(mlflow_uri)
    assert sorted(steps(client, outcome.run_id, "round/staleness_mean").values()) == [0.0, 1.0]

    pairs, reference = read_table(r1.pairs), read_table(r1.reference)
    sampled = {(row["prompt_index"], tuple(c)): lp for row in read_jsonl(r1.generations)
               for c, lp in zip(row["completions"], row["logps"])}
    prompt_index = [row["prompt_index"] for row in read_jsonl(r1.generations)]
    for side in ("chosen", "rejected"):
        own = [sampled[(prompt_index[p], tuple(c))] for p, c in zip(pairs["prompt_row"].to_pylist(),
                                                                   pairs[f"{side}_ids"].to_pylist())]
        assert reference[f"ref_{side}_logps"].to_pylist() == pytest.approx(own, abs=1e-4)
    assert r2.reference.exists()

    # Killed after round 2 trained, before its evaluation: the re-run's trainer starts from round 2's
    # policy (not round 1's, the newest complete round), so the collective sync hands the generators
    # round 2's weights and the evaluation is the same as before, sample for sample.
    evaluated = read_json(r2.eval)
    for p in (r2.done, r2.eval, r2.eval_generations):
        p.unlink()
    run(cfg)
    assert read_json(r2.eval) == evaluated
