"""`kvdist bench cpu-pool`: host copies per block of the `cpu` connector once its pool is
full, with the step's blocks moved in slot order (kvdist) against the order the scheduler
lists them in (the baseline: what the worker did before).

Drives `kvdist.connectors.cpu.slots.SlotMap` as the connector's scheduler does (one
process, no model, no device): multi-turn conversations sharing a system prompt, each turn
a request whose history is looked up (the blocks found are loaded and touched, in chain
order), whose new blocks are saved (each given the least recently used slot), and whose
whole chain is touched when it finishes, its last block the least recently used.
Conversations are picked with a Zipf-like popularity, so some come back often and others
are evicted between turns. The worker makes one host copy per run of consecutive slots;
both orders are counted on the same requests and slots.

Why the order matters: a request saved into slots s, s+1, ... is evicted last block first,
so the next request to take its slots gets them as ..., s+1, s, one run in slot order
and none in the order given. On an H200 a copy per block shard reaches 65 % (256 KiB shards)
to 91 % (2 MiB) of one contiguous copy's bandwidth, runs of 3 slots 83-95 %
(`kvdist bench transfer --slot-run N`).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvdist.connectors.cpu.slots import SlotMap
from kvdist.kv.transfer import row_runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def arg(name: str, default: float, help_text: str, kind: type = int) -> None:
        parser.add_argument(
            name, type=kind, default=default, help=f"{help_text} (default: %(default)s)"
        )

    arg("--slots", 4096, "pool slots")
    arg("--conversations", 2000, "conversations")
    arg("--requests", 20000, "turns in all")
    arg("--system-blocks", 8, "blocks of the shared prompt")
    arg("--turn-blocks", 6, "blocks each turn adds")
    arg("--max-turns", 12, "turns before a conversation is replaced by a new one")
    arg("--zipf", 1.1, "popularity exponent of the conversations", float)
    arg("--seed", 0, "seed of the conversation picks")


@dataclass
class _Counts:
    looked_up: int = 0
    found: int = 0
    saved: int = 0
    loaded: int = 0
    save_copies_slot_order: int = 0
    save_copies_given_order: int = 0
    load_copies_slot_order: int = 0
    load_copies_given_order: int = 0

    def request(self, slots: SlotMap, chain: list[bytes]) -> None:
        """One turn: look up its chain, load what is found, save the rest, finish."""
        hits: list[int] = []
        for key in chain:
            slot = slots.get(key)
            if slot is None:
                break
            hits.append(slot)
        self.looked_up += len(chain)
        if hits:
            slots.touch_chain(chain[: len(hits)])
            self.loaded += len(hits)
            self.load_copies_slot_order += len(row_runs(sorted(hits)))
            self.load_copies_given_order += len(row_runs(hits))
        pinned = set(hits)  # a load's slots are not reassigned before it is done
        taken: list[int] = []
        for key in chain[len(hits) :]:
            if slots.get(key) is not None:  # a later block still held, an earlier evicted
                continue
            slot = slots.allocate(key, lambda s: s in pinned or s in taken, set(chain).__contains__)
            if slot is None:
                break
            taken.append(slot)
        if taken:
            self.saved += len(taken)
            self.save_copies_slot_order += len(row_runs(sorted(taken)))
            self.save_copies_given_order += len(row_runs(taken))
        slots.touch_chain(chain)
        self.found += len(hits)


def _key(*parts: object) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


def simulate(args: argparse.Namespace) -> dict[str, Any]:
    for name in ("slots", "conversations", "requests", "turn_blocks", "max_turns"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.system_blocks < 0 or not args.zipf > 0:
        raise ValueError("--system-blocks must be >= 0 and --zipf > 0")
    rng = np.random.default_rng(args.seed)
    weights = 1.0 / np.arange(1, args.conversations + 1) ** args.zipf
    picks = rng.choice(args.conversations, size=args.requests, p=weights / weights.sum())
    system = [_key("system", i) for i in range(args.system_blocks)]
    turns = [0] * args.conversations
    generation = [0] * args.conversations
    slots = SlotMap(args.slots)
    counts = _Counts()
    for c in picks.tolist():
        if turns[c] == args.max_turns:  # a new conversation in its place
            turns[c] = 0
            generation[c] += 1
        turns[c] += 1
        own = [_key(c, generation[c], i) for i in range(turns[c] * args.turn_blocks)]
        counts.request(slots, system + own)
    n = counts
    return {
        "benchmark": "cpu-pool",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "hit_rate": n.found / max(1, n.looked_up),
        "blocks_saved": n.saved,
        "blocks_loaded": n.loaded,
        "evictions": slots.evictions,
        "blocks_per_copy": {
            "save": {
                "slot_order": n.saved / max(1, n.save_copies_slot_order),
                "given_order": n.saved / max(1, n.save_copies_given_order),
            },
            "load": {
                "slot_order": n.loaded / max(1, n.load_copies_slot_order),
                "given_order": n.loaded / max(1, n.load_copies_given_order),
            },
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }


def format_table(result: dict[str, Any]) -> str:
    per = result["blocks_per_copy"]
    return "\n".join(
        [
            f"hit rate {result['hit_rate']:.3f}, {result['evictions']} evictions, "
            f"{result['blocks_saved']} blocks saved, {result['blocks_loaded']} loaded",
            "| blocks per host copy | slot order (kvdist) | order given (before) |",
            "| --- | ---: | ---: |",
            *(
                f"| {kind} | {per[kind]['slot_order']:.2f} | {per[kind]['given_order']:.2f} |"
                for kind in ("save", "load")
            ),
        ]
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    result = simulate(args)
    print(format_table(result), flush=True)
    return result
