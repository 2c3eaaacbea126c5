"""The ``noisealign`` console command:

    noisealign STAGE --config recipe.yaml [--field value ...]

Tools that take plain arguments instead of a recipe run the same way:
``noisealign convert_npnet IN.pth OUT``.

Each stage is also a script (``accelerate launch src/noisealign/STAGE.py --config ...``) and
a module (``python -m noisealign.STAGE --config ...``); all three call the stage's ``main``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

from .errors import Interrupted
from .failures import explain

logger = logging.getLogger("noisealign")

# stage name -> module holding its ``main(args)``; imported only when chosen.
STAGES: dict[str, str] = {
    "collect": "noisealign.collect",
    "collect_npd": "noisealign.collect_npd",
    "image_npd": "noisealign.image_npd",
    "distill": "noisealign.distill",
    "pretrain": "noisealign.pretrain",
    "train_projector": "noisealign.train_projector",
    "train_npnet": "noisealign.train_npnet",
    "generate": "noisealign.generate",
    "evaluate": "noisealign.evaluate",
}

# commands that are not recipe stages (no YAML, plain arguments) -> module holding ``main(args)``
TOOLS: dict[str, str] = {
    # an official NPNet checkpoint -> a policy folder
    "convert_npnet": "noisealign.policies.npnet_convert",
    "dry_run_chain": "noisealign.dry_run.chain",  # dry-run every stage recipe of a folder, in order
}


def setup_logging(level: int = logging.INFO) -> None:
    """One readable line per record on stderr; quiets chatty third-party loggers."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level
    )
    for name in ("httpx", "urllib3", "PIL", "datasets", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)


DEBUG_ENV = "NOISEALIGN_DEBUG"  # "1": every error keeps its traceback


def run_stage(
    main: Callable[[Sequence[str] | None], object], args: Sequence[str] | None = None
) -> None:
    """Run a stage's ``main``; a failure of the user's input or environment becomes one line.

    User errors (:class:`NoiseAlignError`, a full / read-only / forbidden disk, a path that is
    a file or missing, an undecodable or corrupt file, CUDA asked for but absent) log one line
    naming the path or field and the fix, and exit with status 2. Ctrl-C exits 130 and SIGTERM
    143, after the stage unwound through its ``finally`` blocks; shards and checkpoints are
    written by rename, so what is on disk stays consistent. Anything else is a bug and keeps
    its traceback, as does every error with ``NOISEALIGN_DEBUG=1``.

    Example:
        >>> from noisealign import collect
        >>> run_stage(collect.main, ["--config", "recipes/toy/collect.yaml"])  # doctest: +SKIP
    """
    setup_logging()
    with _sigterm_raises_interrupted():
        try:
            main(args)
            # imported after the stage, not at the top: it imports torch and the model loaders,
            # which `noisealign --help` and a stage's `--help` need not wait for
            from .dry_run.report import report

            report()  # a dry run's report (nothing otherwise)
        except (Exception, KeyboardInterrupt, Interrupted) as exc:
            explained = None if os.environ.get(DEBUG_ENV) == "1" else explain(exc, args)
            if explained is None:
                raise
            status, line = explained
            logger.error("%s", line)
            sys.exit(status)


@contextlib.contextmanager
def _sigterm_raises_interrupted() -> Iterator[None]:
    """SIGTERM raises :class:`Interrupted` while the stage runs (signals reach the main thread
    only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {**STAGES, **TOOLS}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        message = (
            f"usage: noisealign STAGE --config recipe.yaml [--field value ...]\n"
            f"stages: {', '.join(STAGES)}\ntools: {', '.join(TOOLS)} (noisealign TOOL --help)"
        )
        if argv and argv[0] not in ("-h", "--help"):
            sys.stderr.write(f"noisealign: unknown stage '{argv[0]}'\n{message}\n")
            sys.exit(2)
        sys.stdout.write(message + "\n")
        return
    module = importlib.import_module(commands[argv[0]])
    run_stage(module.main, argv[1:])


if __name__ == "__main__":
    main()
