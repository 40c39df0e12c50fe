"""The documentation runs: every `>>>` example of docs/*.md is a doctest, and docs/api.md covers the API.

A page's doctest examples are the ```python or ```pycon fenced blocks that hold
`>>>` prompts; blocks without a prompt are code to read (a module to save, a
shell session) and are not run. One test per page runs all its examples in
order as one doctest session, so later examples use names earlier ones made.

Pages make their directories with `tempfile`; while a page runs, `tempfile`
creates them under a fresh directory of the test session, so the session's
leak checks see them. Afterwards every database the page left open is closed,
and we wait for each coordinator to exit before removing the directory.
"""

from __future__ import annotations

import doctest
import inspect
import re
import tempfile
from pathlib import Path

import pytest

import protobase
from protobase import database
from tests.conftest import remove_test_directory

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
DOCTEST_LANGUAGES = {"python", "py", "pycon"}
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def doctest_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, block text) of each fenced python/pycon block holding a `>>>` prompt."""
    blocks = []
    for match in FENCE.finditer(text):
        language, body = match.group(1).lower(), match.group(2)
        if language in DOCTEST_LANGUAGES and re.search(r"^\s*>>>", body, re.MULTILINE):
            line = text.count("\n", 0, match.start(2)) + 1
            blocks.append((line, body))
    return blocks


def pages_with_doctests() -> list[Path]:
    return sorted(page for page in DOCS.glob("*.md") if doctest_blocks(page.read_text()))


def run_page(page: Path, workdir: str) -> doctest.TestResults:
    """Run every doctest block of `page` as one session; return doctest's results."""
    text = page.read_text()
    parser = doctest.DocTestParser()
    examples = []
    for line, block in doctest_blocks(text):
        for example in parser.get_examples(block):
            example.lineno += line - 1  # failures name the line in the .md file
            examples.append(example)
    test = doctest.DocTest(examples, {"__name__": f"docs.{page.stem}"}, page.name, str(page), 0, text)
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    saved_tempdir = tempfile.tempdir
    tempfile.tempdir = workdir  # the page's mkdtemp() lands in our session directory
    try:
        runner.run(test)
    finally:
        tempfile.tempdir = saved_tempdir
        test.globs.clear()
    return runner.summarize(verbose=False)


@pytest.fixture
def workdir(session_dir):
    """A directory for one page; afterwards its databases are closed and their coordinators gone."""
    path = tempfile.mkdtemp(prefix="docs", dir=session_dir)
    yield path
    for db in list(database._open_databases):
        if db.path.startswith(path):
            db.close()
    problems = remove_test_directory(path)
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("page", pages_with_doctests(), ids=lambda page: page.name)
def test_page_examples_run(page, workdir):
    results = run_page(page, workdir)
    assert results.attempted > 0
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples of {page.name} failed (see above)"


def test_tutorial_is_doctested():
    assert DOCS / "tutorial.md" in pages_with_doctests()
    assert len(doctest_blocks((DOCS / "tutorial.md").read_text())) >= 20


def test_api_reference_names_every_public_name():
    text = (DOCS / "api.md").read_text()
    missing = [name for name in protobase.__all__ if f"protobase.{name}" not in text and f"`{name}" not in text]
    assert not missing, f"docs/api.md does not document: {missing}"


PUBLIC_METHODS = {
    protobase.Database: [
        "snapshot",
        "transaction",
        "attempts",
        "transactional",
        "check",
        "stats",
        "compact",
        "checkpoint",
        "backup",
        "watch",
        "pool",
        "close",
    ],
    protobase.Transaction: ["commit", "abort"],
    protobase.Snapshot: ["close"],
    protobase.Query: [
        "explain",
        "keys",
        "items",
        "count",
        "first",
        "order_by",
        "limit",
        "sum",
        "min",
        "max",
        "avg",
        "group_by",
    ],
}


def signature_text(function) -> str:
    """`name(params)` as api.md writes it: the signature without `self` and annotations."""
    parameters = [
        parameter.replace(annotation=inspect.Parameter.empty)
        for name, parameter in inspect.signature(function).parameters.items()
        if name != "self"
    ]
    return f"{function.__name__}{inspect.Signature(parameters)}"


@pytest.mark.parametrize(
    "function",
    [protobase.open, protobase.register_dataclass]
    + [getattr(cls, name) for cls, names in PUBLIC_METHODS.items() for name in names],
    ids=lambda function: function.__qualname__,
)
def test_api_reference_signatures_match_the_code(function):
    text = (DOCS / "api.md").read_text()
    expected = signature_text(function)
    if function is protobase.open:
        expected = "protobase." + expected
    assert expected in text, f"docs/api.md should show the signature {expected}"
