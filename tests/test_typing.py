"""The public API's types as a user's type checker sees them (mypy --strict on a user script).

`@db.transactional` keeps the function's parameters and return type, with and
without arguments; `isolation` and `durability` are Literals, so a misspelt
level is a type error; `db.pool()`, `db.watch()` and `db.stats()` hand out
precise types, never Any; so does `where()` on a transaction's and a
snapshot's collections.
"""

from __future__ import annotations

import os
import textwrap

import pytest

mypy_api = pytest.importorskip("mypy.api")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USER_SCRIPT = """
import protobase
from protobase import Snapshot, Transaction


def score(snapshot: Snapshot, key: str) -> int:
    return len(key)


with protobase.open("data") as db:
    @db.transactional
    def add(tx: Transaction, user: str, amount: int = 1) -> float:
        return 1.0

    @db.transactional(retries=3, isolation="serializable")
    def rename(tx: Transaction, old: str, new: str) -> None:
        pass

    reveal_type(add)  # line 18
    reveal_type(add("u", amount=2))
    add(1)
    rename("a")
    db.transaction(isolation="serialisable")
    protobase.open("x", durability="fsync")
    with db.pool(2) as pool:
        reveal_type(pool.map(score, ["a", "b"]))  # line 25
        reveal_type(pool.imap(score, ["a"]))
        reveal_type(pool.map_keys(score, "users"))
    with db.watch("carts") as watcher:
        for change in watcher:
            reveal_type(change)  # line 30
        reveal_type(watcher.wait(1.0))
    reveal_type(db.stats().oldest_reader)
    reveal_type(db.readers())
    with db.transaction() as tx:
        reveal_type(tx.commit())  # line 35
        reveal_type(tx.root.where(protobase.F.city == "Paris").count())
    with db.snapshot() as snap:
        reveal_type(snap.root.where(protobase.F.n > 1))
"""


@pytest.fixture(scope="module")
def mypy_report(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    """{line -> mypy's message} for USER_SCRIPT, checked with --strict against this tree."""
    directory = tmp_path_factory.mktemp("typing")
    script = directory / "user.py"
    script.write_text(textwrap.dedent(USER_SCRIPT).lstrip("\n"))
    saved = os.environ.get("MYPYPATH")
    os.environ["MYPYPATH"] = ROOT  # the protobase of this checkout, not an installed one
    try:
        stdout, stderr, _ = mypy_api.run(
            [
                "--strict",
                "--follow-imports=silent",
                "--no-error-summary",
                "--cache-dir",
                str(directory / "cache"),
                str(script),
            ]
        )
    finally:
        if saved is None:
            del os.environ["MYPYPATH"]
        else:
            os.environ["MYPYPATH"] = saved
    assert not stderr, stderr
    messages: dict[int, str] = {}
    for line in stdout.splitlines():
        _, number, message = line.split(":", 2)
        messages[int(number)] = messages.get(int(number), "") + message.strip()
    return messages


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (18, 'Revealed type is "def (user: str, amount: int =) -> float"'),
        (19, 'Revealed type is "float"'),
        (20, 'Argument 1 to "add" has incompatible type "int"; expected "str"'),
        (21, 'Missing positional argument "new" in call to "rename"'),
        (22, '''Argument "isolation" to "transaction" of "Database" has incompatible type "Literal['serialisable']"'''),
        (23, '''Argument "durability" to "open" has incompatible type "Literal['fsync']"'''),
        (25, 'Revealed type is "list[int]"'),
        (26, 'Revealed type is "typing.Iterator[int]"'),
        (27, 'Revealed type is "list[int]"'),
        (30, 'Revealed type is "protobase.client.watch.Change"'),
        (31, 'Revealed type is "protobase.client.watch.Change | None"'),
        (32, 'Revealed type is "protobase.client.stats.OldestReader | None"'),
        (33, 'Revealed type is "tuple[protobase.client.stats.ReaderStats, ...]"'),
        (35, 'Revealed type is "int"'),
        (36, 'Revealed type is "int"'),
        (38, 'Revealed type is "protobase.query.results.Query"'),
    ],
)
def test_the_public_api_has_precise_types(mypy_report: dict[int, str], line: int, expected: str) -> None:
    assert expected in mypy_report.get(line, ""), f"line {line}: mypy said {mypy_report.get(line)!r}"


def test_nothing_else_in_the_user_script_is_an_error(mypy_report: dict[int, str]) -> None:
    expected_errors = {20, 21, 22, 23}
    errors = {line for line, message in mypy_report.items() if message.startswith("error")}
    assert errors == expected_errors, {line: mypy_report[line] for line in errors ^ expected_errors}
