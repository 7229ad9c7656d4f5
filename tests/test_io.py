"""Atomic outputs: temporaries of dead processes are cleaned up, those of live ones are left alone."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline.io import atomic_file, remove_stale_temporaries


def test_stale_temporary_of_a_dead_process_is_removed_and_a_live_ones_kept(tmp_path):
    target = tmp_path / "out.bin"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f".out.bin.tmp-{dead}-abc"
    stale.write_text("left by a killed run")
    live = tmp_path / f".out.bin.tmp-{os.getppid()}-def"  # our parent is alive: a concurrent writer
    live.write_text("being written")
    remove_stale_temporaries(target)
    assert not stale.exists() and live.exists()


def test_two_writers_of_the_same_output_do_not_break_each_other(tmp_path):
    target = tmp_path / "cache.npy"
    with atomic_file(target) as first:
        first.write_text("a")
        with atomic_file(target) as second:  # a second writer starts while the first is still writing
            second.write_text("a")
        assert first.exists()  # not mistaken for a stale temporary
    assert target.read_text() == "a"
    assert not list(tmp_path.glob(".cache.npy.tmp-*"))
