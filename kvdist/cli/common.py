"""Arguments and setup shared by the `kvdist` subcommands."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
"""What a command reports as one line, `kvdist CMD: error: ...` (bad arguments, settings,
paths), rather than as a traceback; other errors (a timeout, a lost connection, a bug)
keep theirs."""


@contextlib.contextmanager
def command_errors(comm: Any, command: str) -> Iterator[None]:
    """`abort_on_error` for command `command` (e.g. "generate"): user errors in one line;
    a SIGTERM to one rank reaches rank 0, which ends the job (`sigterm_to_rank_0`)."""
    from kvdist.cli.main import sigterm_to_rank_0
    from kvdist.comm.setup import abort_on_error

    errors = abort_on_error(comm, user_errors=USER_ERRORS, command=f"kvdist {command}")
    with errors, sigterm_to_rank_0(comm):
        yield


class CommandParser(argparse.ArgumentParser):
    """A mistake on the command line is one line, as every other user error is: argparse
    would print the usage block before it, on every rank of the job. `--help` prints on
    rank 0 alone (every rank parses the same command line); a mistake still prints on
    every rank, since one rank alone may see it (a path missing on its host)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def print_help(self, file: Any = None) -> None:
        if _launch_rank() == 0:
            super().print_help(file)

    def print_usage(self, file: Any = None) -> None:
        if _launch_rank() == 0:
            super().print_usage(file)


def _launch_rank() -> int:
    """This process's rank as its launcher's variables give it (0 for a plain process,
    or when they cannot be read: a bad setting is reported later, by the command)."""
    from kvdist.comm.launch_env import read_launch_env

    try:
        return read_launch_env(dict(os.environ)).rank
    except Exception:
        return 0


def count_list_arg(least: int) -> Callable[[str], list[int]]:
    """An argparse `type`: comma-separated integers, each of at least `least`."""
    one = count_arg(least)

    def parse(text: str) -> list[int]:
        values = [one(part) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        return values

    return parse


def count_arg(least: int) -> Callable[[str], int]:
    """An argparse `type`: an integer of at least `least`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return parse


def number_arg(what: str, ok: Callable[[float], bool], must_be: str) -> Callable[[str], float]:
    """An argparse `type`: a number (`what`, for the message) for which `ok` holds."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {must_be}, got {text}")
        return value

    return parse


def bench_device(name: str) -> Any:
    """The torch device of a benchmark's --device: "auto" (CUDA when there is one), cpu,
    cuda or cuda:N; a clear error when it is not one, or when CUDA is not there."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return device


def add_model_args(p: argparse.ArgumentParser, default_model: str = "tiny") -> None:
    p.add_argument(
        "--model",
        default=default_model,
        help="HF checkpoint directory or preset name (tiny, tiny-qwen2, tiny-qwen3, llama3-8b)",
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16 or float16 (default: bfloat16 on cuda, float32 on cpu)",
    )
    p.add_argument(
        "--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)"
    )
    p.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help="KV blocks per rank (default: half the free GPU memory, or 256 MiB on the CPU)",
    )
    p.add_argument(
        "--eager", action="store_true", help="run decode steps eagerly, without CUDA graphs"
    )
    p.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="do not reuse on-device KV blocks of identical prefixes: a prefix seen before "
        "in this run is the connector's to load",
    )


def add_connector_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument(
        "--connector",
        default=default,
        help="registered connector name (disk, cpu, tiered) or module:Scheduler:Worker",
    )
    p.add_argument(
        "--connector-kwargs",
        default="{}",
        type=json_object_arg("--connector-kwargs"),
        help='connector settings as JSON, e.g. \'{"path": "/tmp/kv"}\'',
    )


def json_object_arg(flag: str) -> Callable[[str], dict[str, Any]]:
    """An argparse `type` that parses a JSON object, naming `flag` when it is not one."""

    def parse(text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{flag} is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON object")
        return value

    return parse


def connector_config(name: str | None, kwargs: dict[str, Any]):
    """A ConnectorConfig from the command line (None when no connector was asked for)."""
    from kvdist.api.types import ConnectorConfig

    if name is None or name == "none":
        if kwargs:
            raise ValueError(
                "--connector-kwargs given without --connector (nothing would use them)"
            )
        return None
    from kvdist.connectors.registry import DEFAULT_REGISTRY

    own_form = "module:SchedulerClass:WorkerClass (e.g. my_pkg.store:StoreScheduler:StoreWorker)"
    if ":" in name:
        parts = name.split(":")
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"--connector {name!r}: a connector of your own is {own_form}")
        # As `python -m` does (the kvdist command does not): a module in the current
        # directory imports.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        config = ConnectorConfig(
            module=parts[0], scheduler_class=parts[1], worker_class=parts[2], kwargs=kwargs
        )
        try:  # imported now, so that classes of the wrong kind are a usage error
            DEFAULT_REGISTRY.resolve(config)
        except TypeError as exc:
            raise ValueError(f"--connector {name!r}: {exc}") from None
        return config
    if name not in DEFAULT_REGISTRY.names():
        raise ValueError(
            f"--connector {name!r}: not a registered connector "
            f"({', '.join(DEFAULT_REGISTRY.names())}); a connector of your own is {own_form}"
        )
    return ConnectorConfig(name=name, kwargs=kwargs)


def llm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "block_size": args.block_size,
        "dtype": args.dtype,
        "cuda_graphs": not args.eager,
        "enable_prefix_caching": not args.no_prefix_caching,
    }
    if args.num_blocks is not None:
        kw["num_blocks"] = args.num_blocks
    return kw
