"""CLI of distributed extraction: ``taemi extract`` options ``--shard``, ``--distributed``
(with ``--backend``, ``--ray-address``, ...) and ``--encoders``, and ``taemi store merge``.

``taemi extract --input ... --out STORE --distributed N`` lists the inputs here (so a bad
input fails once, before any worker starts), then runs N workers, each the same
``taemi extract`` command with ``--shard K/N --out STORE.shards/shard-K-of-N`` instead of
the distributed options, and merges (:mod:`taemi.extract.distributed`). The worker's
command line is rebuilt from the parsed options of ``extract``, so every extraction
option, present or future, reaches the workers unchanged.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from taemi.cli.common import print_line

log = logging.getLogger("taemi")

#: Options of ``taemi extract`` that concern the driver, not the workers.
_DRIVER_ONLY = {
    "out",
    "shard",
    "distributed",
    "backend",
    "ray_address",
    "threads_per_worker",
    "gpus_per_worker",
    "no_progress",
    "help",
}


def add_extract_options(sp: argparse.ArgumentParser) -> None:
    """The sharding, distribution and custom-encoder options of ``taemi extract``."""
    sp.add_argument(
        "--encoders",
        metavar="MODULE:FUNCTION",
        help="build the encoders with this Python function (no arguments, returns "
        "taemi.extract.pipeline.Encoders) instead of --profile/--model: custom models, "
        "the test suite's stand-ins",
    )
    g = sp.add_argument_group("distributed extraction (docs/distributed_extraction.md)")
    g.add_argument(
        "--shard",
        metavar="K/N",
        help="extract only shard K of N (K = 0..N-1; clips assigned by a hash of their id)",
    )
    g.add_argument(
        "--distributed",
        type=int,
        metavar="N",
        help="split into N shards, extract them with N workers into OUT.shards/, merge into OUT",
    )
    g.add_argument(
        "--backend",
        default="local",
        choices=("local", "ray"),
        help="--distributed: local subprocesses (default) or Ray tasks",
    )
    g.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="--backend ray: the cluster to join ('auto' on a cluster node); default: a local Ray",
    )
    g.add_argument(
        "--threads-per-worker",
        type=int,
        metavar="T",
        help="--distributed: threads (OMP_NUM_THREADS; Ray num_cpus) per worker; default: CPUs / N",
    )
    g.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        metavar="G",
        help="--backend ray: GPUs each worker task requests (with --device cuda)",
    )
    sp.set_defaults(extract_parser=sp)


def _worker_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The ``taemi extract`` options in ``args`` that differ from their defaults, as a command line."""
    out: list[str] = []
    for action in parser._actions:  # argparse has no public list of a parser's options
        if not action.option_strings or action.dest in _DRIVER_ONLY:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default or value is None:
            continue
        flag = next(
            (o for o in action.option_strings if o.startswith("--")), action.option_strings[0]
        )
        if isinstance(action, argparse.BooleanOptionalAction):
            out.append(flag if value else "--no-" + flag[2:])
        elif action.nargs == 0:  # store_true / store_false / store_const
            out.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                out += [flag, str(item)]
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def this_shard(
    args: argparse.Namespace, sources: list, input_errors: list[dict]
) -> tuple[list, list[dict]]:
    """``--shard K/N``: the sources and input errors of that shard."""
    from taemi.extract.distributed import parse_shard, select_shard

    k, n = parse_shard(args.shard)
    mine, errors = select_shard(sources, input_errors, k, n)
    log.info("shard %d/%d: %d of %d clips", k, n, len(mine), len(sources))
    return mine, errors


def run_distributed(args: argparse.Namespace, sources: list, input_errors: list[dict]) -> int:
    """``--distributed N``: run the workers, merge, print per-shard counts."""
    from taemi.extract.distributed import extract_distributed

    if args.shard is not None:
        raise ValueError(
            "--shard and --distributed exclude each other (workers get --shard from --distributed)"
        )
    if args.distributed < 1:
        raise ValueError(f"--distributed {args.distributed}: the number of workers must be >= 1")
    if args.backend != "ray" and (args.ray_address or args.gpus_per_worker):
        raise ValueError("--ray-address and --gpus-per-worker go with --backend ray")
    global_args = [f for f, on in (("--verbose", args.verbose), ("--debug", args.debug)) if on]
    res = extract_distributed(
        args.out,
        _worker_args(args.extract_parser, args),
        sources,
        args.distributed,
        input_errors=input_errors,
        backend=args.backend,
        ray_address=args.ray_address,
        threads_per_worker=args.threads_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        global_args=global_args,
        replace=args.force,
        progress=not args.no_progress,
    )
    print_line(f"{'shard':<8}{'clips':>7}{'done':>7}{'skipped':>9}{'failed':>8}  status")
    for r in res.shards:
        s = r.summary or {}
        status = "ok" if r.ok else f"FAILED: {r.error}"
        print_line(
            f"{r.k:<8}{r.clips:>7}{s.get('done', '-'):>7}{s.get('skipped', '-'):>9}{s.get('failed', '-'):>8}  "
            f"{status} ({r.log})"
        )
    if not res.ok:
        print_line(
            f"{len(res.failed)} of {len(res.shards)} workers failed; nothing merged into {args.out}. "
            "Rerun the same command to resume."
        )
        return 1
    m = res.merge
    summary = m.summary or {}
    print_line(
        f"{args.out}: {m.clips} clips from {len(res.shards)} shards ({m.copied} copied, {m.skipped} already "
        f"there), verified; {summary.get('failed', 0)} failed inputs; workers {res.workers_seconds:.0f} s, "
        f"total {res.seconds:.0f} s"
    )
    if summary.get("errors_file"):
        print_line(f"failures and their reasons: {summary['errors_file']}")
    nothing = (
        summary.get("done", 0) == 0
        and summary.get("skipped", 0) == 0
        and summary.get("failed", 0) > 0
    )
    return 1 if nothing else 0  # as a single extraction: 1 only when every clip failed


def cmd_store_merge(args: argparse.Namespace) -> int:
    from taemi.store.merge import merge_stores

    m = merge_stores(args.out, args.shards, replace=args.replace, progress=not args.no_progress)
    print_line(
        f"{args.out}: {m.clips} clips after merging {len(m.shards)} stores ({m.copied} copied, "
        f"{m.skipped} already there, {m.side_files} side files); verified OK"
    )
    if m.error_lines:
        print_line(
            f"{m.error_lines} failure records of the shards in {Path(args.out) / 'extract_errors.jsonl'}"
        )
    return 0


def register_store_merge(ssub, common) -> None:
    s2 = ssub.add_parser(
        "merge", help="merge shard stores (of taemi extract --shard) into one store, verified"
    )
    s2.add_argument(
        "out", help="the merged store (created, or extended: clips already in it are skipped)"
    )
    s2.add_argument("shards", nargs="+", metavar="SHARD_STORE", help="stores to merge")
    s2.add_argument(
        "--replace",
        action="store_true",
        help="supersede clips already in OUT with the shards' versions (after --force)",
    )
    common(s2)
    s2.set_defaults(func=cmd_store_merge)
