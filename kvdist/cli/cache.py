"""`kvdist cache ls|verify|evict DIR`: inspect and trim a disk connector's cache directory."""

from __future__ import annotations

import argparse
import json

from kvdist.comm.launch_env import started_world_size
from kvdist.connectors import settings
from kvdist.connectors.disk.maintenance import (
    evict_cache,
    list_cache,
    namespaces,
    remove_corrupt,
    verify_cache,
)
from kvdist.connectors.disk.store import STALE_TEMP_S, check_temp_age


def parse_bytes(text: str) -> int:
    """A byte count for argparse (`settings.parse_bytes`, its error as argparse's)."""
    try:
        return settings.parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_temp_age(text: str) -> float:
    """Seconds for argparse (`store.check_temp_age`, its error as argparse's)."""
    try:
        return check_temp_age(float(text), "--temp-age")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--temp-age must be a number of seconds >= 0, got {text!r}"
        ) from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `cache` on the `kvdist` command's subparsers."""
    parser = subparsers.add_parser("cache", help="list, verify or evict a disk KV cache")
    sub = parser.add_subparsers(dest="cache_command", required=True)
    ls = sub.add_parser(
        "ls", aliases=["list"], help="blocks, records and bytes per model namespace"
    )
    ls.add_argument("dir", help="the disk connector's path=")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    verify = sub.add_parser(
        "verify",
        help="re-check every record; exit 1 if any is corrupt (and not removed), or records "
        "were found and none could be checked",
    )
    verify.add_argument("dir")
    verify.add_argument("--namespace", help="a namespace id (from ls) or full namespace string")
    verify.add_argument(
        "--remove-corrupt",
        action="store_true",
        help="delete the corrupt records found (their blocks miss and are saved again)",
    )
    evict = sub.add_parser(
        "evict", help="delete least recently used blocks; exit 1 if some could not be"
    )
    evict.add_argument("dir")
    evict.add_argument("--namespace", help="only this namespace (id or full string)")
    how = evict.add_mutually_exclusive_group(required=True)
    how.add_argument("--all", action="store_true", help="delete every block")
    how.add_argument("--to-bytes", type=parse_bytes, metavar="N", help="keep at most N bytes")
    evict.add_argument(
        "--temp-age",
        type=parse_temp_age,
        metavar="S",
        help=f"with --to-bytes: remove the temporary files of writes untouched for S seconds "
        f"(default {STALE_TEMP_S:g}: a live write renames its file within seconds; less, "
        "beside running engines, may fail their writes in flight, whose blocks are then "
        "saved again)",
    )
    parser.set_defaults(func=run)
    return parser


_NO_NAMESPACES = (
    "(no namespaces in {}: is it the directory given to the disk connector as its path?)"
)


_SHOWN = 20  # failures listed one per line


def run(args: argparse.Namespace) -> int:
    """Run the chosen `cache` subcommand; returns the exit code."""
    if started_world_size() > 1:
        raise ValueError(
            f"kvdist cache {args.cache_command} runs in one process (every rank would "
            "list or delete the same files); run it without a launcher"
        )
    if args.cache_command in ("ls", "list"):
        rows = list_cache(args.dir)
        if args.json:
            print(json.dumps([r.__dict__ for r in rows], indent=1))
            return 0
        print(
            f"{'namespace id':16}  {'blocks':>8}  {'complete':>8}  {'records':>8}  {'bytes':>14}  "
            f"{'temp files':>10}  namespace"
        )
        for r in rows:
            print(
                f"{r.namespace_id:16}  {r.blocks:8d}  {r.complete_blocks:8d}  {r.records:8d}  "
                f"{r.bytes:14d}  {r.temp_files:10d}  {r.namespace or '?'}"
            )
        if not rows:
            print(_NO_NAMESPACES.format(args.dir))
        return 0
    if args.cache_command == "verify":
        report = verify_cache(args.dir, args.namespace)
        for path, reason in report.corrupt:
            print(f"CORRUPT {path}: {reason}")
        for path, reason in report.unchecked:
            print(f"NOT CHECKED {path}: {reason}")
        print(
            f"{report.records} records checked, {len(report.corrupt)} corrupt, "
            f"{len(report.unchecked)} not checked (another format version or unreadable), "
            f"{report.vanished} removed meanwhile"
        )
        if not namespaces(args.dir, args.namespace):
            print(_NO_NAMESPACES.format(args.dir))
            return 1  # nothing was verified: not a pass
        left = len(report.corrupt)
        if args.remove_corrupt and report.corrupt:
            removed, failed = remove_corrupt(report)
            for path, reason in failed[:_SHOWN]:
                print(f"NOT REMOVED {path}: {reason}")
            print(f"removed {removed} corrupt records")
            left = len(failed)
        if not report.records and not report.unchecked:
            print("(the cache holds no records: empty, or evicted)")
            return 0
        return 1 if left or not report.records else 0
    if args.cache_command == "evict":
        if args.all and args.temp_age is not None:
            raise ValueError(
                "--temp-age applies to --to-bytes: --all removes every file, temporary "
                "ones included"
            )
        evicted = evict_cache(
            args.dir,
            namespace=args.namespace,
            to_bytes=None if args.all else args.to_bytes,
            temp_age_s=STALE_TEMP_S if args.temp_age is None else args.temp_age,
        )
        for path, reason in evicted.failed[:_SHOWN]:
            print(f"NOT REMOVED {path}: {reason}")
        if len(evicted.failed) > _SHOWN:
            print(f"... and {len(evicted.failed) - _SHOWN} more")
        print(f"evicted {evicted.removed} blocks, {evicted.freed} bytes")
        return 1 if evicted.failed else 0
    raise AssertionError(args.cache_command)
