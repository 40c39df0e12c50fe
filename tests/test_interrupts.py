"""Short interrupt test: Ctrl-C and kill -9 clients mid-commit; every acknowledged commit is there exactly once."""

from __future__ import annotations

from stress.interrupts import run


def test_interrupted_and_killed_clients_lose_and_duplicate_nothing(session_dir):
    # At least 50 acknowledged commits, however loaded the machine: it goes on past the 8 s until there are.
    outcome = run(seconds=8, clients=3, kill_every=10, base=session_dir, at_least=51)
    assert outcome.interrupts > 50 and outcome.kills > 0
    assert outcome.acknowledged > 50
    assert outcome.ok, outcome
