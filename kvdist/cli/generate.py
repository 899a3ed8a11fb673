"""`kvdist generate`: run prompts through the engine (TP size from the launcher)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvdist.cli.common import (
    add_connector_args,
    add_model_args,
    command_errors,
    connector_config,
    count_arg,
    llm_kwargs,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text or tokens for prompts")
    add_model_args(p)
    add_connector_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument(
        "--prompts-file",
        type=Path,
        help="one prompt per line, or a JSON list of prompts (strings or lists of token ids)",
    )
    p.add_argument(
        "--max-tokens", type=count_arg(1), default=16, help="per prompt (default: %(default)s)"
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy (default: %(default)s)"
    )
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling (default: %(default)s)"
    )
    p.add_argument("--seed", type=count_arg(0), default=None, help="of the sampling")
    p.add_argument("--json", action="store_true", help="print one JSON object per output")
    p.set_defaults(func=run)


def _read_prompts(args: argparse.Namespace) -> list:
    prompts: list = list(args.prompt)
    if args.prompts_file is not None:
        prompts += _prompts_file(args.prompts_file)
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT or --prompts-file FILE")
    return prompts


def _prompts_file(path: Path) -> list:
    """A JSON list of prompts (when the whole file parses as a list), else one prompt per
    line: a line such as `[INST] ...` is text, not broken JSON."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--prompts-file {str(path)!r}: {exc}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list):  # a line such as `42` or `"hi"` is a prompt too
        return [line for line in text.splitlines() if line.strip()]
    if value and all(isinstance(v, int) for v in value):
        raise ValueError(
            f"--prompts-file {str(path)!r}: a JSON list of numbers; a prompt of token ids "
            "is a list inside the list: [[1, 2, 3]]"
        )
    return value


_SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "seed")


def run(args: argparse.Namespace) -> int:
    from kvdist.comm import init_distributed
    from kvdist.engine.llm import LLM
    from kvdist.engine.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    try:  # the same checks as every request's, made a usage error here
        params.validate()
    except ValueError as exc:
        flags = {f"SamplingParams.{f}": f"--{f.replace('_', '-')}" for f in _SAMPLING_FLAGS}
        message = str(exc)
        for field, flag in flags.items():
            message = message.replace(field, flag)
        raise ValueError(message) from None
    topo = init_distributed(device=args.device)
    # Read once the ranks are up: a file that only some ranks can read (on one node's
    # disk) ends every rank, instead of leaving the others waiting to start.
    with command_errors(topo.comm, "generate"):
        prompts = _read_prompts(args)
        llm = LLM(
            args.model,
            connector=connector_config(args.connector, args.connector_kwargs),
            topology=topo,
            **llm_kwargs(args),
        )
        outputs = llm.generate(prompts, params)
        # Shown before the shutdown, which waits for the connector's saves and may fail
        # (a transfer never reported): the outputs are served by then.
        if topo.rank == 0:
            for out in outputs:
                print(json.dumps(out.__dict__) if args.json else _output_line(out))
            _note_context_cut(outputs, args.max_tokens, llm.max_model_len)
            sys.stdout.flush()
        llm.shutdown()
        # After the shutdown, whose drain finishes the saves still in flight.
        if topo.rank == 0 and args.connector and not args.json:
            print(_connector_summary(args.connector, llm.stats))
    topo.close()
    return 1 if any(o.finish_reason == "error" for o in outputs) else 0


def _output_line(out) -> str:
    """`req-N: [ids] 'text' [finish, ttft, prompt tokens: device hit, loaded]`."""
    # The token ids always: a byte tokenizer's text drops ids past 255 and shows bad
    # UTF-8 as U+FFFD, so texts alone may hide differences.
    text = f" {out.text!r}" if out.text else ""
    extra = f" error={out.error}" if out.error else ""
    return (
        f"{out.request_id}: {out.output_token_ids}{text} "
        f"[{out.finish_reason}{extra}, ttft {out.ttft_s * 1e3:.1f} ms, "
        f"{len(out.prompt_token_ids)} prompt tokens: {out.num_cached_tokens} device hit, "
        f"{out.num_external_tokens} loaded]"
    )


def _connector_summary(name: str, stats: dict) -> str:
    """One line of the run's connector counters: the scheduler's (every rank's loads),
    then rank 0's connector's own where it keeps the built-ins' `stats` keys."""
    line = (
        f"connector {name}: {stats['external_tokens']} tokens loaded, "
        f"{stats['load_failures']} blocks failed to load, "
        f"{stats['lookup_failures']} lookups failed"
    )
    if not all(f"connector_{k}" in stats for k in _CONNECTOR_COUNTERS):
        return line  # a connector of its own, without them
    own = {k: stats[f"connector_{k}"] for k in _CONNECTOR_COUNTERS}
    mb = {k: own[k] / 1e6 for k in ("bytes_loaded", "bytes_saved")}
    return line + (
        f"; rank 0: {own['hits']} blocks hit, {own['misses']} missed, "
        f"{own['blocks_loaded']} loaded ({mb['bytes_loaded']:.2f} MB), "
        f"{own['blocks_saved']} saved ({mb['bytes_saved']:.2f} MB), "
        f"{own['evictions']} evicted, {own['save_failures']} failed to save"
    )


_CONNECTOR_COUNTERS = (
    "hits",
    "misses",
    "blocks_loaded",
    "bytes_loaded",
    "blocks_saved",
    "bytes_saved",
    "evictions",
    "save_failures",
)


def _note_context_cut(outputs, max_tokens: int, max_model_len: int) -> None:
    """Say on stderr which requests stopped at the model's context before --max-tokens."""
    cut = [
        o.request_id
        for o in outputs
        if o.finish_reason == "length"
        and len(o.output_token_ids) < max_tokens
        and len(o.prompt_token_ids) + len(o.output_token_ids) >= max_model_len
    ]
    if cut:
        shown = ", ".join(cut[:5]) + (f" and {len(cut) - 5} more" if len(cut) > 5 else "")
        print(
            f"kvdist generate: {shown} stopped at the model's context of {max_model_len} "
            f"tokens, before --max-tokens {max_tokens}",
            file=sys.stderr,
        )
