"""`kvdist cache ls|verify|evict` on a cache written by the disk connector."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from records import flip_version_bit, make_newer_format

from kvdist.api.types import SchedulerOutput
from kvdist.cli import cache as cache_cli
from kvdist.connectors.disk.store import namespace_id
from kvdist.connectors.testing import (
    SimulatedRanks,
    full_kv,
    make_request,
    new_request_output,
    tp_context,
)


def cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="kvdist")
    cache_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture
def cache_dir(tmp_path):
    """Two namespaces: model A with 3 prompts of 2 blocks at TP=2, model B with one."""
    full = full_kv(tp_context(0, 1))
    for ns, prompts in (("model-a", 3), ("model-b", 1)):
        kw = {"name": "disk", "kwargs": {"path": str(tmp_path)}}
        ranks = SimulatedRanks(kw, 2, full, fill=True, model_namespace=ns)
        for p in range(prompts):
            req = make_request(f"r{p}", [p * 100 + t for t in range(9)], ranks.ctx)
            ranks.scheduler.get_num_new_matched_tokens(req, 0)
            ranks.scheduler.update_state_after_alloc(req, [0, 1, 2], 0)
            ranks.step(new_request_output(2 * p, req, [0, 1, 2], 0, 9))
            ranks.scheduler.request_finished(req, [0, 1, 2])
            ranks.step(SchedulerOutput(step=2 * p + 1, finished_req_ids=[req.request_id]))
            ranks.wait(finished={req.request_id})
            time.sleep(0.02)  # distinct mtimes: prompt p is older than p + 1
        ranks.shutdown()
    return tmp_path


def _flip_payload_byte(path) -> None:
    """Change one byte of a record's payload (its checksum then fails)."""
    with open(path, "r+b") as f:
        f.seek(-5, os.SEEK_END)
        b = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))


def _kvb(root):
    return sorted(
        os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".kvb")
    )


def test_ls_counts_blocks_records_bytes(cache_dir, capsys):
    """ls reports per namespace its blocks, records (one per rank per block) and bytes."""
    assert cli("cache", "ls", str(cache_dir), "--json") == 0
    rows = {r["namespace"]: r for r in json.loads(capsys.readouterr().out)}
    a = rows["model-a"]
    assert (a["blocks"], a["complete_blocks"], a["records"]) == (6, 6, 12)
    assert a["namespace_id"] == namespace_id("model-a")
    assert rows["model-b"]["blocks"] == 2
    assert a["bytes"] + rows["model-b"]["bytes"] == sum(os.path.getsize(p) for p in _kvb(cache_dir))
    assert a["temp_files"] == 0
    # A write in flight (or one that died) leaves a temporary file: counted, and shown.
    block = os.path.dirname(_kvb(os.path.join(cache_dir, a["namespace_id"]))[0])
    with open(os.path.join(block, "r0.kvb.12345.tmp"), "wb") as f:
        f.write(b"partial")
    assert cli("cache", "ls", str(cache_dir)) == 0
    out = capsys.readouterr().out
    assert "temp files" in out.splitlines()[0]
    (line,) = [ln for ln in out.splitlines() if ln.endswith("model-a")]
    assert line.split()[-2] == "1", line


def test_verify_finds_corrupt_records(cache_dir, capsys):
    """verify exits 0 on a clean cache, and 1 listing the record whose payload was changed."""
    assert cli("cache", "verify", str(cache_dir)) == 0
    assert "16 records checked, 0 corrupt" in capsys.readouterr().out
    victim = _kvb(cache_dir)[3]
    _flip_payload_byte(victim)
    assert cli("cache", "verify", str(cache_dir)) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT {victim}: payload checksum mismatch" in out
    assert "1 corrupt" in out


def test_verify_removes_corrupt_records_when_asked(cache_dir, capsys):
    """verify --remove-corrupt deletes the corrupt record (exit 0: none is left), and
    nothing else; a later verify checks the 15 others."""
    victim = _kvb(cache_dir)[5]
    _flip_payload_byte(victim)
    assert cli("cache", "verify", str(cache_dir), "--remove-corrupt") == 0
    out = capsys.readouterr().out
    assert f"CORRUPT {victim}: payload checksum mismatch" in out
    assert "removed 1 corrupt records" in out
    assert not os.path.exists(victim) and len(_kvb(cache_dir)) == 15
    assert cli("cache", "verify", str(cache_dir)) == 0
    assert "15 records checked, 0 corrupt" in capsys.readouterr().out


def test_verify_finds_a_damaged_version_field(cache_dir, capsys):
    """A record whose version field alone was damaged (one bit flipped) is corrupt, not
    another format's: verify exits 1 naming it, and --remove-corrupt deletes it. A
    failure means a bad record passes verify as "not checked" with exit 0, and is kept."""
    victim = _kvb(cache_dir)[2]
    flip_version_bit(victim)
    assert cli("cache", "verify", str(cache_dir)) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT {victim}: format version 5 before a sound version-1 header" in out
    assert "16 records checked, 1 corrupt, 0 not checked" in out
    assert cli("cache", "verify", str(cache_dir), "--remove-corrupt") == 0
    assert "removed 1 corrupt records" in capsys.readouterr().out
    assert not os.path.exists(victim) and len(_kvb(cache_dir)) == 15


def test_verify_finds_a_damaged_reserved_field(cache_dir, capsys):
    """A flipped bit in the prefix's reserved field (written 0; no checksum covers it) is
    corruption: verify exits 1 naming it. A failure means a damaged record passes verify
    (and loads) as sound. (The fuzz of damaged caches found it: of every byte of a
    record, only these two went unnoticed.)"""
    from kvdist.connectors.disk.record import MAGIC

    victim = _kvb(cache_dir)[4]
    with open(victim, "r+b") as f:
        f.seek(len(MAGIC) + 2)
        b = f.read(1)
        f.seek(len(MAGIC) + 2)
        f.write(bytes([b[0] ^ 0x01]))
    assert cli("cache", "verify", str(cache_dir)) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT {victim}: reserved field is 1, not 0" in out
    assert "16 records checked, 1 corrupt, 0 not checked" in out


def test_remove_corrupt_takes_a_misplaced_record_and_spares_a_rewritten_one(cache_dir, capsys):
    """A record copied into another block's directory passes its checksums but not the
    place check: --remove-corrupt deletes it (it kept it and exited 0). A corrupt record
    that a good write replaced (renamed over it) after the check is kept."""
    import shutil

    from kvdist.connectors.disk.maintenance import remove_corrupt, verify_cache

    files = sorted(_kvb(cache_dir))
    misplaced = os.path.join(os.path.dirname(files[2]), os.path.basename(files[0]))
    assert os.path.dirname(files[0]) != os.path.dirname(files[2])
    os.replace(files[2], files[2] + ".bak")
    shutil.copyfile(files[0], misplaced)
    assert cli("cache", "verify", str(cache_dir), "--remove-corrupt") == 0
    assert "header does not match the record's place" in capsys.readouterr().out
    assert not os.path.exists(misplaced)

    victim = files[4]
    good = Path(victim).read_bytes()
    _flip_payload_byte(victim)
    report = verify_cache(str(cache_dir))
    assert [p for p, _ in report.corrupt] == [victim]
    with open(victim + ".new", "wb") as f:  # a writer's good record, renamed into place
        f.write(good)
    os.replace(victim + ".new", victim)
    assert remove_corrupt(report) == (0, [])
    assert Path(victim).read_bytes() == good


def test_verify_of_an_emptied_cache_passes(cache_dir, capsys):
    """A cache whose blocks were all evicted (its namespaces still there) is healthy:
    verify exits 0 saying it holds no records, where a monitor would otherwise flap."""
    assert cli("cache", "evict", str(cache_dir), "--all") == 0
    capsys.readouterr()
    assert cli("cache", "verify", str(cache_dir)) == 0
    assert "the cache holds no records" in capsys.readouterr().out


def test_evict_to_bytes_removes_least_recently_used(cache_dir, capsys):
    """evict --to-bytes keeps at most N bytes in the namespace, dropping the oldest blocks
    (all their records), and leaves other namespaces alone."""
    before = {p: os.path.getmtime(p) for p in _kvb(cache_dir)}
    ns_a = os.path.join(str(cache_dir), namespace_id("model-a"))
    a_files = [p for p in before if p.startswith(ns_a)]
    per_block = sum(os.path.getsize(p) for p in a_files) // 6
    assert (
        cli(
            "cache",
            "evict",
            str(cache_dir),
            "--namespace",
            "model-a",
            "--to-bytes",
            str(per_block * 4),
        )
        == 0
    )
    assert "evicted 2 blocks" in capsys.readouterr().out
    kept = [p for p in _kvb(cache_dir) if p.startswith(ns_a)]
    assert len(kept) == 8
    newest = sorted(a_files, key=before.get)[-8:]
    assert sorted(kept) == sorted(newest)
    assert cli("cache", "evict", str(cache_dir), "--all") == 0
    assert _kvb(cache_dir) == []


def test_evict_temp_age_sets_when_a_temporary_file_is_a_dead_writes(cache_dir, capsys):
    """evict --to-bytes removes the temporary files of writes untouched for ten minutes
    by default, and for --temp-age seconds when given (a crashed fleet's leftovers, at
    once): a 2-minute-old one stays by default and goes with --temp-age 60, a fresh one
    stays. A bad age, or one given with --all (which removes every file), is an error
    naming the option."""
    from kvdist.connectors.disk.maintenance import evict_cache

    bdir = os.path.dirname(_kvb(cache_dir)[0])

    def temp(name, age_s):
        path = os.path.join(bdir, name)
        with open(path, "wb") as f:
            f.write(b"x" * 100)
        t = time.time() - age_s
        os.utime(path, (t, t))
        return path

    old, fresh = temp(".h0-2of4.kvb.dead-0.tmp", 120), temp(".h0-2of4.kvb.live-1.tmp", 1)
    assert cli("cache", "evict", str(cache_dir), "--to-bytes", "1T") == 0
    assert "evicted 0 blocks, 0 bytes" in capsys.readouterr().out
    assert os.path.exists(old) and os.path.exists(fresh)
    assert cli("cache", "evict", str(cache_dir), "--to-bytes", "1T", "--temp-age", "60") == 0
    assert "evicted 0 blocks, 100 bytes" in capsys.readouterr().out
    assert not os.path.exists(old) and os.path.exists(fresh)
    for bad in ("-1", "soon", "nan"):
        with pytest.raises(SystemExit):
            cli("cache", "evict", str(cache_dir), "--to-bytes", "1T", "--temp-age", bad)
        assert "--temp-age must be a number of seconds >= 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--temp-age applies to --to-bytes"):
        cli("cache", "evict", str(cache_dir), "--all", "--temp-age", "60")
    with pytest.raises(ValueError, match="temp_age_s must be a number of seconds >= 0"):
        evict_cache(str(cache_dir), to_bytes=0, temp_age_s=-5)
    assert os.path.exists(fresh) and len(_kvb(cache_dir)) == 16  # nothing removed by those


def test_user_errors(cache_dir, tmp_path):
    """A missing directory, unknown namespace, or bad byte count are clear errors."""
    with pytest.raises(FileNotFoundError):
        cli("cache", "ls", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not in"):
        cli("cache", "evict", str(cache_dir), "--namespace", "nope", "--all")
    with pytest.raises(SystemExit):
        cli("cache", "evict", str(cache_dir), "--to-bytes", "lots")
    with pytest.raises(SystemExit):  # --all or --to-bytes is required
        cli("cache", "evict", str(cache_dir))
    assert cache_cli.parse_bytes("512M") == 512 << 20 and cache_cli.parse_bytes("2GiB") == 2 << 30


@pytest.mark.parametrize("changes", [{}, {"head_start": None}])
def test_verify_tells_corrupt_from_unchecked_and_vanished(cache_dir, capsys, monkeypatch, changes):
    """A record of another format (a newer kvdist sharing the directory: another version
    before a header this one cannot read, also one whose fields have other types) is listed as not checked, and one an engine evicts while verify runs is counted as removed:
    neither is corrupt, and verify exits 0. A failure means verify cries corruption over
    a sound cache beside a running engine (or, before, stopped at such a header with a
    TypeError)."""
    from kvdist.connectors.disk import maintenance
    from kvdist.connectors.disk.record import FORMAT_VERSION

    files = _kvb(cache_dir)
    newer, evicted = files[0], files[5]
    make_newer_format(newer, **changes)
    real = maintenance.read_record

    def evicting(path, *args, **kwargs):
        if path == evicted:
            os.unlink(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(maintenance, "read_record", evicting)
    assert cli("cache", "verify", str(cache_dir)) == 0
    out = capsys.readouterr().out
    assert "CORRUPT" not in out
    assert f"NOT CHECKED {newer}: format version {FORMAT_VERSION + 1}" in out
    assert "14 records checked, 0 corrupt, 1 not checked" in out and "1 removed meanwhile" in out


def test_a_namespace_directory_that_cannot_be_listed_is_skipped(cache_dir, monkeypatch):
    """A fan directory that cannot be listed (ESTALE on NFS): the engine still starts and
    `cache ls` still runs, its blocks counted as missing (before, the start-up scan
    raised out of the connector's constructor)."""
    import errno

    from kvdist.connectors.disk import store

    real = os.listdir
    ns_a = os.path.join(str(cache_dir), namespace_id("model-a"))
    fan = sorted(d for d in real(ns_a) if len(d) == 2)[0]

    def stale(path):
        if os.path.normpath(str(path)) == os.path.join(ns_a, fan):
            raise OSError(errno.ESTALE, "Stale file handle")
        return real(path)

    monkeypatch.setattr(store.os, "listdir", stale)
    assert cli("cache", "ls", str(cache_dir), "--json") == 0
    kw = {"name": "disk", "kwargs": {"path": str(cache_dir)}}
    ranks = SimulatedRanks(kw, 1, full_kv(tp_context(0, 1)), model_namespace="model-a")
    assert 0 < len(ranks.scheduler.index) < 6
    ranks.shutdown()


def test_a_directory_that_is_no_cache_is_not_a_pass(tmp_path, capsys):
    """`verify` on a directory with no kvdist namespace (the parent of the connector's
    path, say) checked nothing: exit 1 with a hint, not "0 corrupt" and 0. A file given as
    the directory is named as such."""
    assert cli("cache", "verify", str(tmp_path)) == 1
    assert "no namespaces in" in capsys.readouterr().out
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        cli("cache", "ls", str(afile))


def test_verify_that_could_list_nothing_is_not_a_pass(cache_dir, capsys, monkeypatch):
    """A namespace directory that cannot be listed (EACCES, ESTALE): verify names it as not
    checked and exits 1, since it checked nothing (it said "0 records checked" and exited
    0); a record is counted once, as checked or as not checked."""
    import errno

    from kvdist.connectors.disk import store

    real = os.listdir
    ns_a = os.path.join(str(cache_dir), namespace_id("model-a"))

    def denied(path):
        if os.path.normpath(str(path)) == ns_a:
            raise OSError(errno.EACCES, "Permission denied")
        return real(path)

    monkeypatch.setattr(store.os, "listdir", denied)
    assert cli("cache", "verify", str(cache_dir), "--namespace", "model-a") == 1
    out = capsys.readouterr().out
    assert f"NOT CHECKED {ns_a}: cannot list the directory: Permission denied" in out
    assert "0 records checked, 0 corrupt, 1 not checked" in out
    assert cli("cache", "verify", str(cache_dir)) == 0  # model-b's 4 records are checked
    assert "4 records checked, 0 corrupt, 1 not checked" in capsys.readouterr().out


def test_evict_counts_only_blocks_it_removed(cache_dir, capsys, monkeypatch):
    """Records that cannot be deleted (a read-only directory): evict names them, counts
    their blocks neither as removed nor as freed room, and exits 1 (it said "evicted 12
    blocks, 0 bytes" and exited 0)."""
    import errno

    from kvdist.connectors.disk import store

    real = os.unlink
    ns_b = os.path.join(str(cache_dir), namespace_id("model-b"))

    def read_only(path, *args, **kwargs):
        if str(path).startswith(ns_b):
            raise OSError(errno.EACCES, "Permission denied")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(store.os, "unlink", read_only)
    assert cli("cache", "evict", str(cache_dir), "--all") == 1
    out = capsys.readouterr().out
    assert out.count("NOT REMOVED ") == 4 and "Permission denied" in out  # b: 2 blocks x 2
    assert "evicted 6 blocks," in out  # model-a's
    assert len(_kvb(cache_dir)) == 4


def test_cache_commands_refuse_to_run_on_several_ranks(cache_dir, monkeypatch):
    """Under a launcher every rank would list, or delete, the same files (two ranks of
    `evict --all` said 15 of 12 blocks evicted)."""
    # A plain process of an sbatch script has its allocation's variables, not a step's;
    # a bad kvdist setting is none of these commands' business.
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("KVDIST_TIMEOUT_S", "abc")
    assert cli("cache", "ls", str(cache_dir)) == 0
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "2")
    with pytest.raises(ValueError, match="runs in one process"):
        cli("cache", "evict", str(cache_dir), "--all")
    assert len(_kvb(cache_dir)) == 16


def test_cache_commands_do_not_import_torch(cache_dir):
    """`kvdist cache` reads files only: it starts without importing torch (1.1 s of a
    2 s `ls` before), so an operator's loop of checks beside running engines stays cheap."""
    import subprocess
    import sys

    code = (
        "import sys; from kvdist.cli.main import main; "
        f"rc = main(['cache', 'ls', {str(cache_dir)!r}]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model-a" in done.stdout


def test_stray_files_and_directories_are_not_taken_for_blocks(cache_dir, capsys):
    """Review findings, each a stray the cache did not write: a record named for another
    head count, listed first, does not make `ls` call a complete block incomplete; a record
    whose name runs past its head count is never chosen to cover heads (it was preferred,
    reaching furthest, and its load failed); a copy of a block directory outside its own
    place (another fan-out directory, the name in upper case) is no block (the engine
    counted it, could never delete it, and evicted as much of real blocks instead)."""
    from kvdist.connectors.disk.maintenance import complete_at_some_count
    from kvdist.connectors.disk.store import RecordRef, cover, iter_block_dirs

    ns = os.path.join(cache_dir, namespace_id("model-a"))
    first = _kvb(ns)[0]
    with open(os.path.join(os.path.dirname(first), "h0-10of10.kvb"), "wb") as f:
        f.write(b"stray")
    assert cli("cache", "ls", str(cache_dir), "--json") == 0
    rows = {r["namespace"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["model-a"]["complete_blocks"] == 6, rows["model-a"]
    halves = [RecordRef("h0-2of4.kvb", 0, 2, 4, 1, 0.0), RecordRef("h2-4of4.kvb", 2, 4, 4, 1, 0.0)]
    for stray in (
        RecordRef("h0-1of10.kvb", 0, 1, 10, 1, 0.0),
        RecordRef("h0-0of0.kvb", 0, 0, 0, 1, 0.0),
    ):
        assert complete_at_some_count([stray, *halves]), stray  # listed first, or not
        assert complete_at_some_count([*halves, stray]), stray
        assert not complete_at_some_count([stray, halves[0]]), stray

    wide = RecordRef("h0-9of4.kvb", 0, 9, 4, 1, 0.0)
    good = RecordRef("h0-4of4.kvb", 0, 4, 4, 1, 0.0)
    assert cover([wide, good], 0, 4, 4) == [good]
    assert cover([wide], 0, 4, 4) is None

    blocks = dict(iter_block_dirs(ns))
    key, bdir = next(iter(blocks.items()))
    other_fan = next(f for f in os.listdir(ns) if len(f) == 2 and f != key.hex()[:2])
    shutil.copytree(bdir, os.path.join(ns, other_fan, key.hex()))
    shutil.copytree(bdir, os.path.join(os.path.dirname(bdir), key.hex().upper()))
    assert dict(iter_block_dirs(ns)) == blocks


def test_remove_corrupt_takes_an_empty_directory_in_a_records_place(cache_dir, capsys):
    """An empty directory under a record's name is reported corrupt and removed by
    --remove-corrupt, as the engine removes it (it was NOT REMOVED: Is a directory)."""
    victim = _kvb(cache_dir)[3]
    os.unlink(victim)
    os.mkdir(victim)
    assert cli("cache", "verify", str(cache_dir), "--remove-corrupt") == 0
    assert not os.path.exists(victim)


def test_verify_lists_a_link_to_nothing_under_a_records_name(cache_dir, capsys):
    """A symbolic link to nothing under a record's name (records linked from a disk that
    is gone): no record, on every run. Verify lists it as not checked; before, it counted
    it as removed meanwhile (by an engine evicting), and so passed the cache each time."""
    victim = _kvb(cache_dir)[3]
    os.unlink(victim)
    os.symlink(os.path.join(str(cache_dir), "gone.kvb"), victim)
    assert cli("cache", "verify", str(cache_dir)) == 0
    out = capsys.readouterr().out
    assert f"NOT CHECKED {victim}: a symbolic link to nothing" in out
    assert "15 records checked, 0 corrupt, 1 not checked" in out and "0 removed meanwhile" in out
