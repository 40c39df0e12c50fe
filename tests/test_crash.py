"""Short crash test: kill -9 every kind of process mid-commit; no acknowledged commit is lost."""

from __future__ import annotations

from stress.crash import run


def test_no_acknowledged_commit_is_lost_whichever_process_is_killed(session_dir):
    outcome = run(rounds=8, writers=2, base=session_dir)
    assert outcome.kills == 8
    assert outcome.acknowledged > 8
    assert outcome.lost == 0, f"{outcome.lost} acknowledged commits lost"
    assert outcome.half_applied == 0
