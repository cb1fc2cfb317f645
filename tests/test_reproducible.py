"""Reproducible parallel calibration (``batch_size``): the same spec with 1, 2 and 3 workers on
one shared study storage gives the identical trials, Pareto front and recommendation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from calibration._errors import InvalidParameters
from calibration.spec import decode_spec, spec_hash, validate_spec
from tests.conftest import walk_frame

SCRIPT = """
import json, sys
from pathlib import Path
import optuna
import calibration.calibrate as cal
from calibration.spec import decode_spec
from calibration.storage import Coordination

root, url, workers = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
spec = decode_spec((root / "spec.json").read_bytes())
result = cal.calibrate(spec, root=root, storage=url, study="repro", workers=workers)
with Coordination(url) as coordination:
    study = optuna.load_study(study_name="repro", storage=coordination.storage)
    trials = [[t.number, t.params, t.values, t.state.name] for t in study.get_trials()]
out = {"trials": trials, "workers": result.workers, "reproducible": result.reproducible,
       "why": result.reproducibility,
       "front": [[p.params, p.objectives] for p in result.pareto_front],
       "recommendation": None if (rec := result.recommendation) is None
       else [rec.params, rec.trial, rec.objectives]}
print(json.dumps(out))
"""


def _spec(batch_size: int | None) -> dict[str, Any]:
    return {
        "data": [{"instrument": "SYN", "ref": "bars.parquet"}],
        "model": "ewma",
        "search_space": {"decay": {"low": 0.9, "high": 0.99},
                         "confidence": {"low": 0.99, "high": 0.999},
                         "floor_rate": {"low": 0.005, "high": 0.05, "log": True},
                         "apc_buffer": {"value": 0.5}, "horizon_bars": {"value": 4},
                         "warmup_bars": {"value": 200}},
        "stress_windows": [],
        "liquidation": {"leverages": [5, 20], "notionals_usd": [10000]},
        "n_trials": 18, "seed": 5, **({"batch_size": batch_size} if batch_size else {}),
    }


def _run(root: Path, tmp: Path, workers: int) -> dict[str, Any]:
    url = f"journal:{tmp / f'studies-{workers}.log'}"
    env = {**os.environ, "MARGINLAB_DATA_ROOT": str(root), "PYTHONWARNINGS": "error"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(root), url, str(workers)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return out


@pytest.mark.slow
def test_one_two_and_three_workers_give_the_same_calibration(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    walk_frame(4000, seed=11).to_parquet(root / "bars.parquet", index=False)
    (root / "spec.json").write_text(json.dumps(_spec(batch_size=6)))
    runs = {w: _run(root, tmp_path, w) for w in (1, 2, 3)}
    one = runs[1]
    assert len(one["trials"]) == 18
    assert one["recommendation"] is not None
    assert one["front"]
    for workers in (2, 3):
        other = runs[workers]
        assert other["workers"] == workers  # every worker ran trials
        assert other["trials"] == one["trials"]
        assert other["front"] == one["front"]
        assert other["recommendation"] == one["recommendation"]
        assert other["reproducible"] is True
        assert "reproducible batches of 6" in other["why"]


def test_batch_size_keeps_old_spec_hashes_and_refuses_nsga2_batches_of_one() -> None:
    without = decode_spec(json.dumps(_spec(None)))
    with_none = msgspec.structs.replace(without, batch_size=None)
    assert spec_hash(without) == spec_hash(with_none)
    assert spec_hash(decode_spec(json.dumps(_spec(6)))) != spec_hash(without)
    with pytest.raises(InvalidParameters) as err:
        decode_spec(json.dumps({**_spec(1), "sampler": "nsga2"}))
    assert err.value.field == "batch_size"
    validate_spec(decode_spec(json.dumps({**_spec(6), "sampler": "nsga2"})))
    validate_spec(decode_spec(json.dumps(_spec(6))))


def _calibration_record(url: str, study: str, result: Any) -> dict[str, Any]:
    """Everything a calibration produced but the workers' identities: each trial's number,
    parameters, values, state, constraints and stored metrics; the front; the
    recommendation."""
    import optuna

    from calibration.calibrate._evaluate import trial_metrics
    from calibration.storage import Coordination

    with Coordination(url) as coordination:
        opt = optuna.load_study(study_name=study, storage=coordination.storage)
        trials = []
        for t in opt.get_trials():
            metrics = trial_metrics(t) or {}
            metrics.pop("worker")
            trials.append([t.number, t.params, t.values, t.state.name,
                           t.system_attrs.get("constraints"),
                           msgspec.json.encode(metrics).decode()])
    rec = result.recommendation
    return {"trials": trials,
            "front": [[p.params, p.objectives] for p in result.pareto_front],
            "recommendation": None if rec is None else [rec.params, rec.trial, rec.objectives]}


def test_batched_coverage_gives_the_trials_of_one_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker claiming several queued trials of a batch computes their coverage in one pass
    (``batch_coverage``); the calibration is bit for bit the one of trials evaluated alone,
    with one worker and with two."""
    import calibration.calibrate as cal
    import calibration.calibrate._evaluate as evaluation
    from calibration.calibrate._study import create_or_load_study
    from calibration.calibrate._workers import run_worker
    from calibration.storage import Coordination

    root = tmp_path / "data"
    root.mkdir()
    walk_frame(3000, seed=11).to_parquet(root / "bars.parquet", index=False)
    spec = decode_spec(json.dumps({**_spec(batch_size=6), "n_trials": 12}))
    prepared = cal.prepare(spec, root)
    batched_sets: list[int] = []
    original = evaluation.coverage_of_models

    def counted(bars: Any, models: Any, **kwargs: Any) -> Any:
        batched_sets.append(len(models))
        return original(bars, models, **kwargs)

    monkeypatch.setattr(evaluation, "coverage_of_models", counted)
    runs = {}
    for label, claim in (("alone", 1), ("claim 6", 6), ("claim 4", 4)):
        url = f"journal:{tmp_path / f'{claim}.log'}"
        with Coordination(url) as coordination:
            study = create_or_load_study(spec, prepared, coordination, "b")
            run_worker(study, prepared, coordination, n_trials=spec.n_trials, claim_trials=claim)
        runs[label] = _calibration_record(url, "b", cal.summarize(study, prepared, url))
        if label == "alone":
            assert batched_sets == []  # one trial at a time: no batch
        if label == "claim 6":
            assert batched_sets == [6, 6]  # two batches of six, each in one pass
    # A share below the batch (a worker of two): guided claims of two, each in one pass.
    assert batched_sets[2:] == [2] * 6
    url = f"journal:{tmp_path / 'two.log'}"
    two = cal.calibrate(spec, root=root, storage=url, study="b", prepared=prepared, workers=2)
    runs["two workers"] = _calibration_record(url, "b", two)
    assert len(batched_sets) == 8  # calibrate claims one trial at a time: no batch pass here
    alone = runs["alone"]
    assert len(alone["trials"]) == 12
    assert {t[3] for t in alone["trials"]} <= {"COMPLETE", "PRUNED"}
    assert alone["front"]
    for label in ("claim 6", "claim 4", "two workers"):
        assert runs[label] == alone, label


@pytest.mark.parametrize("interruption", [KeyboardInterrupt])  # any non-marginlab error alike
def test_an_interrupted_calibration_resumes_to_the_same_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        interruption: type[BaseException]) -> None:
    """A worker stopped in the middle of its claim (an interruption, or an error that is not
    the parameters' fault) fails the claim's trials and queues their sets again; resumed,
    the calibration runs the same sets, proposes the same later batches and ends on the same
    front and recommendation as one never interrupted (only trial numbers move)."""
    import optuna

    import calibration.calibrate as cal
    import calibration.calibrate._evaluate as evaluation
    from calibration.calibrate._study import create_or_load_study
    from calibration.calibrate._workers import run_worker
    from calibration.storage import Coordination

    root = tmp_path / "data"
    root.mkdir()
    walk_frame(3000, seed=11).to_parquet(root / "bars.parquet", index=False)
    spec = decode_spec(json.dumps(_spec(batch_size=6)))
    prepared = cal.prepare(spec, root)

    def finished_sets(study: optuna.Study) -> list[Any]:
        return sorted([json.dumps(t.params, sort_keys=True), t.values, t.state.name]
                      for t in study.get_trials()
                      if t.state.name in ("COMPLETE", "PRUNED"))

    def outcome(url: str, study: optuna.Study) -> dict[str, Any]:
        result = cal.summarize(study, prepared, url)
        rec = result.recommendation
        assert rec is not None
        return {"sets": finished_sets(study),
                "front": [[p.params, p.objectives] for p in result.pareto_front],
                "recommendation": [rec.params, rec.objectives]}

    url = f"journal:{tmp_path / 'whole.log'}"
    with Coordination(url) as coordination:
        study = create_or_load_study(spec, prepared, coordination, "r")
        run_worker(study, prepared, coordination, n_trials=spec.n_trials, claim_trials=6)
        whole = outcome(url, study)

    calls = 0
    original = evaluation.evaluate

    def stopping(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 9:  # the third set of the second batch's claim
            raise interruption("stopped")
        return original(*args, **kwargs)

    url = f"journal:{tmp_path / 'resumed.log'}"
    with Coordination(url) as coordination:
        study = create_or_load_study(spec, prepared, coordination, "r")
        monkeypatch.setattr(evaluation, "evaluate", stopping)
        with pytest.raises(interruption):
            run_worker(study, prepared, coordination, n_trials=spec.n_trials, claim_trials=6)
        monkeypatch.setattr(evaluation, "evaluate", original)
        states = [t.state.name for t in study.get_trials()]
        assert states.count("FAIL") == 4  # the one stopped and the three after it
        assert states.count("WAITING") == 4  # queued again
        run_worker(study, prepared, coordination, n_trials=spec.n_trials, claim_trials=6)
        resumed = outcome(url, study)
        assert len(study.get_trials()) == spec.n_trials + 4
    assert len(whole["sets"]) == spec.n_trials
    assert resumed == whole


def test_a_trial_whose_parameters_raise_is_failed_not_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A marginlab error while evaluating a claimed set is that set's fault: it is failed and
    not queued again; the rest of the claim is."""
    import calibration.calibrate as cal
    import calibration.calibrate._evaluate as evaluation
    from calibration._errors import InsufficientData
    from calibration.calibrate._study import create_or_load_study
    from calibration.calibrate._workers import run_worker
    from calibration.storage import Coordination

    root = tmp_path / "data"
    root.mkdir()
    walk_frame(3000, seed=11).to_parquet(root / "bars.parquet", index=False)
    spec = decode_spec(json.dumps(_spec(batch_size=6)))
    prepared = cal.prepare(spec, root)
    calls = 0
    original = evaluation.evaluate

    def failing(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise InsufficientData("too short for this set")
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", failing)
    with Coordination(f"journal:{tmp_path / 'f.log'}") as coordination:
        study = create_or_load_study(spec, prepared, coordination, "f")
        with pytest.raises(InsufficientData):
            run_worker(study, prepared, coordination, n_trials=spec.n_trials, claim_trials=6)
        trials = study.get_trials()
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert [t.number for t in failed] == [1, 2, 3, 4, 5]
    retried = [t.user_attrs["retry_history"] for t in trials if t.state.name == "WAITING"]
    assert retried == [[2], [3], [4], [5]]  # not trial 1, whose own set raised


def test_nsga2_batches_are_its_generations(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``batch_size``, NSGA-II breeds each batch as one generation of that many parents:
    the first batch is its random generation 0, each later one the next generation, its
    sets recombined from the earlier generations' (a child's values are its parents'); two
    workers run the identical trials, front and recommendation."""
    import optuna

    import calibration.calibrate as cal
    from calibration.calibrate._study import BATCH_GENERATION_ATTR
    from calibration.storage import Coordination

    root = tmp_path / "data"
    root.mkdir()
    walk_frame(3000, seed=11).to_parquet(root / "bars.parquet", index=False)
    spec = decode_spec(json.dumps({**_spec(batch_size=6), "sampler": "nsga2"}))
    url = f"journal:{tmp_path / 'studies.log'}"
    one = cal.calibrate(spec, root=root, storage=url, study="gens", workers=1)
    with Coordination(url) as coordination:
        trials = optuna.load_study(study_name="gens", storage=coordination.storage).get_trials()
    url_two = f"journal:{tmp_path / 'studies-2.log'}"
    # A trial here is quicker than the forked helper's start: slowed (in both processes,
    # the helper being forked) so that the helper claims its share of the batches.
    import time

    import calibration.calibrate._evaluate as evaluation

    evaluate = evaluation.evaluate

    def slowed(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.25)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", slowed)
    two = cal.calibrate(spec, root=root, storage=url_two, study="gens", workers=2)
    assert two.workers == 2
    assert (_calibration_record(url_two, "gens", two)
            == _calibration_record(url, "gens", one))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert [t.user_attrs[BATCH_GENERATION_ATTR] for t in trials] == [0] * 6 + [1] * 6 + [2] * 6
    # Uniform crossover takes each value from a parent; only a mutation draws a new one.
    earlier = {name: {t.params[name] for t in trials[:6]} for name in trials[0].params}
    inherited = sum(t.params[name] in earlier[name] for t in trials[6:12] for name in earlier)
    assert inherited >= 0.6 * 6 * len(earlier)


def test_stopped_while_claiming_leaves_no_trial_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interruption between two asks of one claim (a job's time limit arrives anywhere)
    fails the trials already asked for and queues their sets again: none stays RUNNING."""
    import optuna

    import calibration.calibrate as cal
    from calibration.calibrate._study import create_or_load_study
    from calibration.calibrate._workers import run_worker
    from calibration.storage import Coordination

    root = tmp_path / "data"
    root.mkdir()
    walk_frame(3000, seed=11).to_parquet(root / "bars.parquet", index=False)
    spec = decode_spec(json.dumps(_spec(batch_size=6)))
    prepared = cal.prepare(spec, root)
    asks = 0
    original = optuna.Study.ask

    def interrupted(self: optuna.Study, *args: Any, **kwargs: Any) -> Any:
        nonlocal asks
        if self.study_name == "c":  # not the batch proposer's scratch study
            asks += 1
            if asks == 3:
                raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "ask", interrupted)
    with Coordination(f"journal:{tmp_path / 'c.log'}") as coordination:
        study = create_or_load_study(spec, prepared, coordination, "c")
        with pytest.raises(KeyboardInterrupt):
            run_worker(study, prepared, coordination, n_trials=spec.n_trials, claim_trials=6)
        trials = study.get_trials()
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states
    assert states[:2] == ["FAIL", "FAIL"]
    retried = [t.user_attrs.get("retry_history") for t in trials if t.state.name == "WAITING"]
    assert [0] in retried
    assert [1] in retried


@pytest.mark.parametrize(("claim", "batch", "sizes"), [
    (24, 24, [24]),                          # alone: the whole batch at once
    (12, 24, [6, 5, 4, 3, 2, 2, 2]),         # one of two workers: shrinking claims
    (25, 50, [13, 10, 7, 5, 4, 3, 2, 2, 2, 2]),
    (3, 6, [2, 2, 2]),                       # never fewer than two while two are queued
    (2, 5, [2, 2, 1]),
])
def test_a_shared_batch_is_claimed_in_shrinking_shares(claim: int, batch: int,
                                                       sizes: list[int]) -> None:
    """Guided claims: a worker's share of half of what is queued, at most its claim, at
    least two; the claims of a batch taken one after another add up to the batch."""
    from calibration.calibrate._workers import _claim_size

    queued, taken = batch, []
    while queued:
        taken.append(_claim_size(claim, queued, batch))
        queued -= taken[-1]
    assert taken == sizes


def test_trials_under_other_numeric_libraries_are_not_called_reproducible() -> None:
    """Every trial records the numeric libraries' versions it ran under; a study whose trials
    ran under two sets (a machine with another numpy, an upgrade mid-study) is not reported
    reproducible, and one set is named in the reason."""
    import msgspec
    import optuna

    from calibration._version import numeric_libraries
    from calibration.calibrate._evaluate import METRICS_ATTR
    from calibration.calibrate._recommend import _reproducibility

    spec = decode_spec(json.dumps({**_spec(batch_size=2), "n_trials": 2}))

    def trial(worker: str, numerics: str) -> optuna.trial.FrozenTrial:
        attrs = {METRICS_ATTR: msgspec.json.encode({"worker": worker,
                                                    "numerics": numerics}).decode()}
        return optuna.trial.create_trial(values=[1.0, 2.0], user_attrs=attrs)

    here = numeric_libraries()
    assert here.startswith("numpy ")
    assert "numba " in here
    workers, reproducible, why = _reproducibility([trial("a", here), trial("b", here)], spec)
    assert (workers, reproducible) == (2, True)
    assert here in why
    other = here.replace("numpy ", "numpy 0.0.0-")
    workers, reproducible, why = _reproducibility([trial("a", here), trial("b", other)], spec)
    assert (workers, reproducible) == (2, False)
    assert "2 different numeric library versions" in why
    assert other in why


def test_a_worker_under_other_numeric_libraries_is_refused_unless_allowed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A study records the numeric libraries' versions it was created under; a worker (or
    a resumed ``calibrate``) under other versions is refused before any trial, naming both,
    unless ``--allow-other-numerics``, and then the result says it is not reproducible."""
    import optuna

    import calibration.calibrate as cal
    from calibration._version import numeric_libraries
    from calibration.calibrate._study import StudyMismatch, create_or_load_study
    from calibration.cli import main
    from calibration.storage import Coordination

    root = tmp_path / "data"
    root.mkdir()
    walk_frame(3000, seed=11).to_parquet(root / "bars.parquet", index=False)
    spec_dict = {**_spec(batch_size=None), "n_trials": 4}
    spec = decode_spec(json.dumps(spec_dict))
    prepared = cal.prepare(spec, root)
    url = f"journal:{tmp_path / 'n.log'}"
    here = numeric_libraries()
    other = here.replace("numpy ", "numpy 0.0.0-")
    with Coordination(url) as coordination:
        study = create_or_load_study(spec, prepared, coordination, "n")
        assert study.user_attrs["numerics"] == here
        # As if another machine, with another numpy, had created it.
        study.set_user_attr("numerics", other)
        with pytest.raises(StudyMismatch, match=r"was created under numpy 0\.0\.0-") as refused:
            create_or_load_study(spec, prepared, coordination, "n")
        assert here in str(refused.value)
    with pytest.raises(StudyMismatch, match="--allow-other-numerics"):
        cal.join_calibration("n", storage=url, root=root, prepared=prepared)
    with pytest.raises(StudyMismatch):
        cal.calibrate(spec, root=root, storage=url, study="n", prepared=prepared)
    with Coordination(url) as coordination:
        untouched = optuna.load_study(study_name="n", storage=coordination.storage)
        assert untouched.get_trials() == []  # refused before any trial
    # The command line: exit 2 with one error line, then joined when allowed.
    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(root))
    monkeypatch.setenv("MARGINLAB_RETAIN_FREED_MEMORY", "0")
    assert main(["worker", "--study", "n", "--storage", url, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: study 'n' was created under numpy 0.0.0-")
    assert err.count("\n") == 1
    assert main(["worker", "--study", "n", "--storage", url, "--quiet",
                 "--allow-other-numerics"]) == 0
    with Coordination(url) as coordination:
        joined = optuna.load_study(study_name="n", storage=coordination.storage)
        assert len(joined.get_trials()) == spec.n_trials
    result = cal.calibrate(spec, root=root, storage=url, study="n", prepared=prepared,
                           allow_other_numerics=True)
    # Every trial ran here, under this machine's versions: reproducible among themselves.
    assert result.reproducible
    assert here in result.reproducibility


def test_a_worker_at_a_batch_barrier_stays_when_the_others_finish_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another worker's last trials of a batch ending just after this worker saw them
    running (between its read under the lock and its next step) must not end this worker:
    it proposes the next batch and runs the study to its count. It once left there, and the
    other worker ran the rest of a 1,000-trial calibration alone (52 of 1,000 trials here).
    The other worker's trials are finished exactly in that window, from the worker's own
    next call after its read (a sleep, or a read of the running trials)."""
    import calibration.calibrate as cal
    from calibration.calibrate import _workers
    from calibration.calibrate._study import create_or_load_study, propose_batch
    from calibration.storage import Coordination

    root = tmp_path / "data"
    root.mkdir()
    walk_frame(3000, seed=11).to_parquet(root / "bars.parquet", index=False)
    spec = decode_spec(json.dumps({**_spec(batch_size=4), "n_trials": 8}))
    prepared = cal.prepare(spec, root)
    with Coordination(f"journal:{tmp_path / 'b.log'}") as coordination:
        study = create_or_load_study(spec, prepared, coordination, "b")
        for proposal in propose_batch(study, spec, prepared.space, 4):
            study.enqueue_trial(**proposal)
        others = [study.ask() for _ in range(4)]  # the first batch, held by "another worker"
        for t in others:
            _workers._suggest(t, prepared.space)

        seen_running = False

        def finish_others() -> None:
            while seen_running and others:
                study.tell(others.pop(), [0.1, 0.0])

        real_get_trials = study.get_trials

        def get_trials(*args: Any, **kwargs: Any) -> Any:
            nonlocal seen_running
            if kwargs.get("states") is not None:
                finish_others()
            trials = real_get_trials(*args, **kwargs)
            if kwargs.get("states") is None:  # the worker's read of the whole study
                seen_running |= any(t.state.name == "RUNNING" for t in trials)
            return trials

        class Clock:
            time = staticmethod(_workers.time.time)
            monotonic = staticmethod(_workers.time.monotonic)

            @staticmethod
            def sleep(seconds: float) -> None:
                finish_others()

        monkeypatch.setattr(study, "get_trials", get_trials)
        monkeypatch.setattr(_workers, "time", Clock)
        ran = _workers.run_worker(study, prepared, coordination, n_trials=spec.n_trials)
        states = [t.state.name for t in real_get_trials()]
    assert ran == 4
    assert len(states) == 8
    assert set(states) <= {"COMPLETE", "PRUNED"}
