"""The tunables (protobase/settings.py): defaults, validation, flags, and the one table that documents them.

- a `Settings` holds only valid values: each bad value is a ValueError that
  names the option, the value and what to pass;
- the flags of `add_arguments` parse into the same values, refuse the same
  ones (as argparse errors), and leave what was not given to the base;
- the module constants that come from the defaults (store, control, btree,
  WAL) agree with them, and docs/operations.md shows exactly
  `markdown_table()`;
- settings.py is a leaf: it imports nothing of protobase.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
from pathlib import Path

import pytest

from protobase import settings
from protobase.core import btree, store
from protobase.persistence.wal import writer as wal_writer
from protobase.settings import CONSTANTS, DEFAULTS, Settings
from protobase.shm import control

OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
FIELDS = [spec.name for spec in dataclasses.fields(Settings)]


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="test", exit_on_error=False)
    settings.add_arguments(result)
    return result


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"flush_interval": -1},
            "flush_interval must be a number of seconds >= 0, got -1; pass e.g. flush_interval=0.01 (the default)",
        ),
        (
            {"reader_slots": 0},
            "reader_slots must be a whole number from 1 to 4294967295, got 0; "
            "pass e.g. reader_slots=1024 (the default)",
        ),
        ({"reader_slots": 2**32}, "reader_slots must be a whole number from 1 to 4294967295, got 4294967296;"),
        (
            {"shutdown_grace": -0.5},
            "shutdown_grace must be a number of seconds >= 0, or None to serve forever, got -0.5; "
            "pass e.g. shutdown_grace=2.0 (the default)",
        ),
        ({"tick": 0}, "tick must be a number of seconds > 0, got 0; pass e.g. tick=0.2 (the default)"),
        ({"checkpoint_bytes": 1.5}, "checkpoint_bytes must be a whole number of bytes >= 0, got 1.5;"),
        ({"receive_bytes": 0}, "receive_bytes must be a whole number of bytes >= 1, got 0;"),
        ({"flat_list_entries": 0}, "flat_list_entries must be a whole number of entries >= 1, got 0;"),
        ({"flush_interval": True}, "flush_interval must be a number of seconds >= 0, got True;"),
        ({"compact_min_bytes": True}, "compact_min_bytes must be a whole number of bytes >= 0, got True;"),
        ({"stop_timeout": math.inf}, "stop_timeout must be a number of seconds >= 0, got inf;"),
        ({"lock_wait": math.nan}, "lock_wait must be a number of seconds >= 0, got nan;"),
        ({"flush_interval": "0.01"}, "flush_interval must be a number of seconds >= 0, got '0.01';"),
        ({"object_cache": None}, "object_cache must be a whole number of entries >= 1, got None;"),
    ],
)
def test_a_bad_value_is_a_value_error_naming_the_option_and_what_to_pass(changes, message):
    with pytest.raises(ValueError) as raised:
        Settings(**changes)
    assert str(raised.value).startswith(message)


def test_replace_validates_too():
    with pytest.raises(ValueError, match="^partial_frame_timeout must be a number of seconds >= 0, got -3;"):
        dataclasses.replace(DEFAULTS, partial_frame_timeout=-3)


def test_good_values_are_kept_as_given():
    chosen = Settings(
        flush_interval=0, shutdown_grace=None, tick=1, checkpoint_bytes=10**30, reader_slots=2**32 - 1, inline_bytes=0
    )
    assert (chosen.flush_interval, chosen.shutdown_grace, chosen.tick) == (0, None, 1)
    assert (chosen.checkpoint_bytes, chosen.reader_slots, chosen.inline_bytes) == (10**30, 2**32 - 1, 0)
    assert chosen == dataclasses.replace(
        DEFAULTS,
        flush_interval=0,
        shutdown_grace=None,
        tick=1,
        checkpoint_bytes=10**30,
        reader_slots=2**32 - 1,
        inline_bytes=0,
    )


def test_settings_are_frozen_and_constants_are_not_arguments():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS.flush_interval = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        Settings(btree_max_entries=128)  # type: ignore[call-arg]
    assert set(CONSTANTS) == {"btree_max_entries", "wal_preallocate_bytes"}
    assert not set(CONSTANTS) & set(FIELDS)


def test_every_field_has_a_doc_and_a_valid_default():
    for spec in dataclasses.fields(Settings):
        assert spec.metadata["doc"] and "\n" not in spec.metadata["doc"], spec.name
    assert Settings() == DEFAULTS


# -- the constants that come from the defaults -----------------------------------------------


def test_module_constants_agree_with_the_defaults():
    assert store.DEFAULT_OBJECT_CACHE == DEFAULTS.object_cache == 1 << 18
    assert store.DEFAULT_BYTES_CACHE == DEFAULTS.bytes_cache == 1 << 16
    assert control.DEFAULT_READER_SLOTS == DEFAULTS.reader_slots == 1024
    # Kept where old data (btree) or another process (the WAL writer) reads them: the same values.
    assert btree.MAX_ENTRIES == Settings.btree_max_entries
    assert wal_writer.PREALLOCATE_BYTES == Settings.wal_preallocate_bytes


# -- flags ---------------------------------------------------------------------------------


def test_flags_given_override_the_base_and_the_others_keep_it():
    args = parser().parse_args(["--flush-interval", "0.05", "--reader-slots", "3", "--checkpoint-bytes", "1000"])
    assert settings.from_arguments(args) == Settings(flush_interval=0.05, reader_slots=3, checkpoint_bytes=1000)
    base = Settings(shutdown_grace=None, tick=0.5)
    assert settings.from_arguments(parser().parse_args([]), base) == base
    assert settings.from_arguments(parser().parse_args(["--tick", "1"]), base) == Settings(shutdown_grace=None, tick=1)


def test_grace_is_an_alias_and_a_negative_grace_serves_forever():
    assert settings.from_arguments(parser().parse_args(["--grace", "0.5"])).shutdown_grace == 0.5
    assert settings.from_arguments(parser().parse_args(["--shutdown-grace", "-1"])).shutdown_grace is None
    assert settings.from_arguments(parser().parse_args(["--grace", "0"])).shutdown_grace == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reader-slots", "0"], "--reader-slots takes a whole number from 1 to 4294967295, got '0'"),
        (["--reader-slots", "x"], "--reader-slots takes a whole number from 1 to 4294967295, got 'x'"),
        (["--flush-interval", "-1"], "--flush-interval takes a number of seconds >= 0, got '-1'"),
        (["--flush-interval", "nan"], "--flush-interval takes a number of seconds >= 0, got 'nan'"),
        (["--checkpoint-bytes", "1e6"], "--checkpoint-bytes takes a whole number of bytes >= 0, got '1e6'"),
        (["--compact-min-bytes", "-5"], "--compact-min-bytes takes a whole number of bytes >= 0, got '-5'"),
        (["--tick", "0"], "--tick takes a number of seconds > 0, got '0'"),
        (["--grace", "soon"], "--shutdown-grace takes a number of seconds >= 0 (negative: serve forever), got 'soon'"),
    ],
)
def test_a_bad_flag_is_an_argparse_error_saying_what_it_takes(argv, message):
    with pytest.raises(argparse.ArgumentError) as raised:
        parser().parse_args(argv)
    assert str(raised.value).endswith(message)


def test_excluded_fields_get_no_flag_and_unknown_names_are_refused():
    narrow = argparse.ArgumentParser(exit_on_error=False)
    settings.add_arguments(narrow, exclude=("shutdown_grace",))
    given, unknown = narrow.parse_known_args(["--grace", "1", "--tick", "1"])
    assert unknown == ["--grace", "1"] and settings.from_arguments(given) == Settings(tick=1)
    with pytest.raises(ValueError, match=r"exclude names no Settings field: \['grace'\]"):
        settings.add_arguments(argparse.ArgumentParser(), exclude=("grace",))


def test_the_coordinator_command_line_builds_its_settings_from_the_flags():
    from protobase.coordinator.__main__ import parse

    args = parse(["/srv/db", "--daemon", "--grace", "-1", "--max-buffered-bytes", "4096", "--inline-bytes", "16"])
    assert args.daemon and args.path == "/srv/db"
    assert settings.from_arguments(args) == Settings(shutdown_grace=None, max_buffered_bytes=4096, inline_bytes=16)
    assert settings.from_arguments(parse(["/srv/db"])) == DEFAULTS


# -- documentation and layering ------------------------------------------------------------


def test_operations_md_documents_every_tunable_with_the_generated_table():
    table = settings.markdown_table()
    assert table in OPERATIONS.read_text()
    rows = [line for line in table.splitlines()[2:]]
    assert [row.split("`")[1] for row in rows] == [*FIELDS, *CONSTANTS]
    assert "| `checkpoint_bytes` | `--checkpoint-bytes` | 64 MiB |" in table
    assert "| `shutdown_grace` | `--shutdown-grace`, `--grace` | 2.0 s |" in table


def test_settings_imports_nothing_of_protobase():
    tree = ast.parse(Path(settings.__file__).read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert imported and not [name for name in imported if name.split(".")[0] == "protobase"]
