"""The dashboard's solver process (impq_tui.solver_process): the same answers as
core.solver and impq_tui.analysis computed here, one child kept across budget moves (its
programs reused), stale jobs cancelled, errors brought back, and no child left behind
when the app ends however it ends."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from core.errors import UserError
from core.interactions import quadratic_model
from core.results import IMPQ_LOCAL
from core.runs import RunDir
from core.solver import Costs, solve_impq, solve_local
from impq_tui import analysis
from impq_tui.app import ImpqApp
from impq_tui.solver_process import FrontierJob, SolveJob, SolverProcess
from run_factory import synthetic_run
from test_app import ROOT, SIZE, pilot_test, settled, until

L, M = 14, 24


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = synthetic_run(tmp_path_factory.mktemp("solver") / "run", L, M, seed=3)
    r = RunDir.open(path)
    return r.D(), r.P(), r.costs()


@pytest.fixture
def solver():
    s = SolverProcess()
    yield s
    s.close()


def test_answers_as_the_solver_here_and_keeps_its_programs_across_budgets(run, solver):
    D, P, costs = run
    allocations = analysis.Allocations(costs)
    pids, built = set(), []
    for k, bits in enumerate((3.0, 2.5, 3.55)):
        replies = list(solver.solve(SolveJob(D=D, P=P, costs=costs, bits=bits, fit=k == 0)))
        kinds = [r[0] for r in replies]
        assert kinds == (["solved", "colors", "unchanged"] if k == 0 else ["solved", "unchanged"])
        fit, allocation = replies[0][1], replies[0][2]
        direct = solve_impq(D, costs, bits=bits)
        assert allocation.q == direct.q and allocation.bytes == direct.bytes <= direct.budget_bytes
        assert allocation.predicted_delta_nll == pytest.approx(direct.predicted_delta_nll, abs=1e-12)
        assert replies[-1][1] == analysis.unchanged_for(D, allocations, bits)
        if k == 0:
            here = analysis.fit(D)
            assert fit.settle == pytest.approx(here.settle, rel=1e-12)
            np.testing.assert_allclose(fit.model.K, here.model.K)
            assert replies[1][1] == analysis.diverging_colors(here.layer_K)
            assert replies[1][2] == analysis.legend_colors()
        else:
            assert fit is None            # the screen has it already
        info = solver.info()
        pids.add(info["pid"])
        built.append(info["built"])
        assert info["nice"] > os.nice(0) or os.nice(0) == 19     # below the app
        # the model of D and those of the ten fewer sample counts (the stability check)
        assert info["programs"] == 11
    assert pids == {solver.pid}           # one child for every budget
    # each model's programs are built once: its first form at the first budget, the other
    # tried at the second (core.solver._Programs), none at the third
    assert built[0] <= built[1] == built[2]


def test_imps_local_and_the_frontier_as_computed_here(run, solver):
    D, P, costs = run
    (solved, *_), = [list(solver.solve(SolveJob(D=D, P=P, costs=costs, bits=2.8,
                                                 method=IMPQ_LOCAL, fit=False)))]
    assert solved[2].q == solve_local(D, P, costs, bits=2.8).q
    batches = list(solver.frontier(FrontierJob(D=D, P=P, costs=costs, every_s=0.0)))
    assert [len(points) for points, _ in batches][0] == 5     # 2.0 to 4.0 by halves first
    assert [complete for _, complete in batches] == [False] * (len(batches) - 1) + [True]
    assert batches[-1][0] == analysis.frontier_points(D, analysis.Allocations(costs))


def test_the_settle_curve_is_that_of_the_whole_models():
    rng = np.random.default_rng(5)
    D = rng.normal(size=(21, 9)) * rng.uniform(0.01, 1.0, 9)
    for paired in (False, True):
        fit = analysis.fit(D, paired=paired)
        whole = [analysis.relative_se(quadratic_model(D[:m], paired=paired)) for m in fit.settle_m]
        assert fit.settle == pytest.approx(whole, rel=1e-12)


def test_a_cancelled_job_stops_and_the_next_is_answered(run, solver):
    D, P, costs = run
    stop = False
    first = solver.frontier(FrontierJob(D=D, P=P, costs=costs, every_s=0.0),
                            cancelled=lambda: stop)
    points, complete = next(first)
    stop = True
    rest = list(first)               # it returns without waiting for the whole frontier
    assert len(points) == 5 and not complete and all(not c for _, c in rest)
    (solved, *_), = [list(solver.solve(SolveJob(D=D, P=P, costs=costs, bits=3.3, fit=False)))]
    assert solved[2].q == solve_impq(D, costs, bits=3.3).q


def test_errors_come_back_as_errors(run, solver):
    D, P, costs = run
    with pytest.raises(UserError, match="outside"):
        list(solver.solve(SolveJob(D=D, P=P, costs=costs, bits=4.5)))
    # and the child goes on answering
    assert list(solver.solve(SolveJob(D=D, P=P, costs=costs, bits=3.0, fit=False)))[0][0] == "solved"


def test_a_killed_child_is_started_again(run, solver):
    D, P, costs = run
    first = solver.pid
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(first):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # the next call starts a fresh child, even before the reply reader has seen the death
    replies = list(solver.solve(SolveJob(D=D, P=P, costs=costs, bits=3.0, fit=False)))
    assert replies[0][2].q == solve_impq(D, costs, bits=3.0).q
    assert solver.pid != first


def test_the_child_ends_when_the_app_ends_without_closing_it(run):
    script = textwrap.dedent("""
        import os, sys
        from impq_tui.solver_process import SolverProcess
        s = SolverProcess()
        print(s.pid, flush=True)
        s.info()            # the child is up and answering
        os._exit(0)         # as run_app ends the app: nothing is closed
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 5
    while alive(pid):
        assert time.monotonic() < deadline, "the solver process outlived the app"
        time.sleep(0.05)


@pilot_test
async def test_the_dashboard_keeps_one_solver_process_across_budget_moves(tmp_path):
    path = synthetic_run(tmp_path / "run", 12, 16, seed=1)
    r = RunDir.open(path)
    D, costs = r.D(), r.costs()
    app = ImpqApp(str(path), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await settled(pilot)
        dash = app.dashboard
        pid = dash.solver.pid
        for key in ("right", "right", "left_square_bracket", "right"):
            await pilot.press(key)
            await settled(pilot)
            assert dash.solver.pid == pid and alive(pid)
            assert dash.allocation.target_bits == dash.bits
            assert dash.allocation.q == solve_impq(D, costs, bits=dash.bits).q
        assert dash.bits == pytest.approx(2.9)
        await pilot.press("4")
        await until(pilot, lambda: dash.frontier is not None and len(dash.frontier) == 41,
                    "the frontier")
        assert dash.frontier == analysis.frontier_points(D, analysis.Allocations(costs))
        assert dash.solver.pid == pid
    deadline = time.monotonic() + 5
    while alive(pid):          # the screen went away: so did its solver
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_costs_with_three_levels_cross_the_pipe(solver):
    """Costs and a model of drops (3 levels) are solved by the child as here."""
    rng = np.random.default_rng(2)
    costs = Costs(m_lo=[100] * 5, m_hi=[300] * 5, params=[800] * 5, levels=(2, 3, 4),
                  mid=([200] * 5,))
    D = rng.normal(0.01, 0.005, size=(12, 10))
    (solved, *_), = [list(solver.solve(SolveJob(D=D, P=np.zeros((12, 10), dtype=np.int64),
                                                 costs=costs, bits=3.0)))]
    assert solved[1].steps == 2
    assert solved[2].q == solve_impq(D, costs, bits=3.0).q


def test_a_newer_job_on_a_channel_ends_the_older(run, solver):
    """A moved budget or new samples: the frontier in work is stale once the next is sent,
    and ends without its last batch."""
    import threading

    D, P, costs = run
    older: list = []
    reader = threading.Thread(target=lambda: older.extend(
        solver.frontier(FrontierJob(D=D, P=P, costs=costs, method=IMPQ_LOCAL, every_s=0.0))))
    reader.start()
    deadline = time.monotonic() + 10
    while not solver._replies:           # the older job is on its way to the child
        assert time.monotonic() < deadline
        time.sleep(0.001)
    time.sleep(0.01)
    newer = list(solver.frontier(FrontierJob(D=D, P=P, costs=costs, every_s=0.0)))
    reader.join(30)
    assert not reader.is_alive()
    assert not any(complete for _, complete in older)
    assert newer[-1][1] and len(newer[-1][0]) == 41
