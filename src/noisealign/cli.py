"""The ``noisealign`` console command: ``noisealign STAGE --config recipe.yaml [--field value ...]``.

Tools that take plain arguments instead of a recipe run the same way: ``noisealign convert_npnet IN.pth OUT``.

Each stage is also a script (``accelerate launch src/noisealign/STAGE.py --config ...``) and
a module (``python -m noisealign.STAGE --config ...``); all three call the stage's ``main``.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from .errors import NoiseAlignError

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
    "convert_npnet": "noisealign.policies.npnet_convert",  # official NPNet checkpoint -> policy folder
    "dry_run_chain": "noisealign.dry_run.chain",  # dry-run every stage recipe of a folder, in order
}


def setup_logging(level: int = logging.INFO) -> None:
    """One readable line per record on stderr; quiets chatty third-party loggers."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level
    )
    for name in ("httpx", "urllib3", "PIL", "datasets", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_stage(
    main: Callable[[Sequence[str] | None], object], args: Sequence[str] | None = None
) -> None:
    """Run a stage's ``main``; a user error becomes one line on stderr and exit status 2."""
    from .dry_run import report

    setup_logging()
    try:
        main(args)
        report()  # a dry run's report (nothing otherwise)
    except NoiseAlignError as exc:
        logger.error("%s", exc)
        sys.exit(2)


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
