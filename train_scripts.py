"""Training entry point: `train`, `datagen` and `customize`, all `--config FILE` + `key.sub=value` overrides.

    torchrun --nproc_per_node=8 [--nnodes N --node_rank R --rdzv_endpoint HOST:PORT] \\
        train_scripts.py train --config configs/train.yaml name=run1
    python train_scripts.py train --config configs/train.yaml --nproc 8      # launches torchrun itself
    python train_scripts.py train --config configs/train.yaml                # one process
    python train_scripts.py train --config configs/train.yaml name=run1 --resume   # newest checkpoint of run1
    python train_scripts.py datagen --config configs/datagen.yaml [--merge-only]
    python train_scripts.py customize --pairs DIR --base CHECKPOINT [--instruction TEXT] [--name NAME]
    python train_scripts.py train --config configs/train.yaml name=run1 --print-config   # show the resolved config

`--nproc` without a number uses every visible GPU (1 on a CPU machine).
`--print-config` prints the whole resolved config (defaults ← file ← overrides ← flags) as YAML and exits 0
without building anything. A run keeps its resolved config as its record: exps/<name>/config.yaml (customize:
its `train` section), OUT/datagen_config.yaml.
`datagen` is `python -m tools.datagen` (same summary, `--merge-only`, exit code 1 when units failed).
A user error (a bad config key or value, a missing file or folder) prints one line `error: ...` and exits
with code 2; under torchrun every rank that hits it prints its line, prefixed with its rank.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
NPROC_ENV = "THREEDPE_LAUNCHED_NPROC"  # set by `--nproc N` for the ranks it starts
SHUTDOWN_SECONDS = 300  # `--nproc`: how long torchrun waits for the ranks to save after a signal
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _default_nproc() -> int:
    import torch

    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_scripts.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "distil the editing module"), ("datagen", "generate training pairs"),
                        ("customize", "adapt a trained model to a new style from ~10 pairs")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", default=None, help="YAML config (default: configs/<command>.yaml)")
        s.add_argument("--nproc", nargs="?", type=int, const=-1, default=None,
                       help="launch torchrun with N processes on this node (no N: all visible GPUs)")
        s.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        s.add_argument("--print-config", action="store_true",
                       help="print the resolved config as YAML and exit (nothing is built or run)")
        if name in ("train", "customize"):
            s.add_argument("--resume", nargs="?", const="auto", default=None,
                           help="resume the run: no value = its newest checkpoint, or a checkpoint directory")
        if name == "datagen":
            s.add_argument("--merge-only", action="store_true", help="only merge the per-rank manifests/labels")
        if name == "customize":
            s.add_argument("--pairs", default=None, help="DIR with input/<stem>.png (+ edited/<stem>.png)")
            s.add_argument("--base", default=None, help="trained 3DPE checkpoint (3dpe.pt or project format)")
            s.add_argument("--instruction", default=None, help="edit DIR/input/ on the fly with InstructPix2Pix")
            s.add_argument("--name", default=None, help="run name (exps/<name>/)")
    return p


def _launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run this script under torchrun with `nproc` processes on this node (the --nproc flag removed).

    The launcher runs in this process, so a failed rank ends in one line (its own message is above it)
    instead of torchrun's ChildFailedError traceback. Returns the first failed rank's exit code, or 130/143
    without a traceback when Ctrl-C/SIGTERM stopped the ranks (torchrun passes the signal on; training
    saves a checkpoint of its step and rank 0 prints how to resume).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parser = get_args_parser()
    # On Ctrl-C/SIGTERM torchrun passes the signal on and waits this long (its default: 30 s) before it kills
    # the ranks, which meanwhile finish their step and save it: room for a slow step.
    wait = [] if "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in os.environ or "--shutdown-timeout" not in \
        parser._option_string_actions else [f"--shutdown-timeout={SHUTDOWN_SECONDS}"]
    args = parser.parse_args(["--standalone", f"--nproc_per_node={nproc}", *wait, str(Path(__file__).resolve()),
                              *argv])
    os.environ[NPROC_ENV] = str(nproc)  # the ranks name this command (with --nproc) in their resume hint
    try:
        run(args)
    except SignalException as e:  # Ctrl-C / SIGTERM: torchrun passed it on; the ranks saved and said so
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        stop = _stop_code([f.exitcode for f in e.failures.values()])
        if stop:
            return stop  # the ranks stopped on a signal, after saving (rank 0 printed how to resume)
        rank, failure = e.get_first_failure()
        print(f"error: {len(e.failures)} of {nproc} processes failed; rank {rank} first, with exit code "
              f"{failure.exitcode} (its message is above)", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def _stop_code(exit_codes: list[int]) -> int:
    """128 + signal when the ranks stopped on SIGINT/SIGTERM (130/143; the ranks that left last may have been
    ended by torchrun after the first one exited, a negative code), else 0."""
    stops = {128 + int(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if not any(c in stops for c in exit_codes) or not all(c in stops or c < 0 for c in exit_codes):
        return 0
    return max(c for c in exit_codes if c in stops)


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            if i + 1 < len(argv) and argv[i + 1].lstrip("-").isdigit():
                skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def _resolved_config(args: argparse.Namespace, config: str, overrides: list[str]) -> object:
    """The subcommand's whole config, as its run resolves it: defaults ← `config` ← `overrides` (customize: ←
    its flags `--pairs`, `--base`, `--instruction`, `--name`). Builds nothing."""
    from utils.config import load_config

    if args.command == "train":
        from training.config import TrainConfig

        return load_config(TrainConfig, config, overrides)
    if args.command == "datagen":
        from pipelines.datagen_config import DatagenConfig

        return load_config(DatagenConfig, config, overrides)
    from training.customize import resolve_config

    return resolve_config(config, overrides, pairs=args.pairs, base=args.base, instruction=args.instruction,
                          name=args.name)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from utils.distributed import launched_by_torchrun

    config = args.config or str(ROOT / "configs" / f"{args.command}.yaml")
    overrides = list(args.overrides)
    if getattr(args, "resume", None):
        overrides.append(f"{'train.' if args.command == 'customize' else ''}resume={args.resume}")
    if args.print_config:
        from utils.config import config_yaml

        sys.stdout.write(config_yaml(_resolved_config(args, config, overrides)))
        return 0
    if args.nproc is not None and not launched_by_torchrun():
        n = _default_nproc() if args.nproc < 0 else args.nproc
        if n > 1:
            _resolved_config(args, config, overrides)  # a bad key fails here, not on n ranks
            return _launch_torchrun(n, _strip_nproc(argv))

    if args.command == "train":
        from training.train import run

        return run(config, overrides).exit_code
    elif args.command == "datagen":
        from tools.datagen import cli as datagen_cli

        return datagen_cli(["--config", config, *(["--merge-only"] if args.merge_only else []), *overrides])
    else:
        from training.customize import run as customize_run

        result = customize_run(config, overrides, pairs=args.pairs, base=args.base, instruction=args.instruction,
                               name=args.name)
        return result.exit_code
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run the subcommand; returns the exit code.

    0 = done, 1 = datagen finished with failed units (a rerun retries them), 2 = usage or config error,
    130 / 143 = training stopped by Ctrl-C / SIGTERM (after saving a checkpoint of its last step).
    """
    from utils.errors import ThreeDPEError, report_user_error

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    # Overrides may come anywhere, also after an option such as `--nproc 2` (argparse alone would reject them).
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + extra
    resume = getattr(args, "resume", None)
    if resume and "=" in resume and not Path(resume).exists():  # `--resume key=value`: an override, not a DIR
        args.resume, args.overrides = "auto", [*args.overrides, resume]
    try:
        return _run(args, argv)
    except ThreeDPEError as e:
        return report_user_error(e)
    except KeyboardInterrupt:  # Ctrl-C before the first step, or twice during training: nothing more is saved
        print("interrupted: nothing saved since the last checkpoint (if any)", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
