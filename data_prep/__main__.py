"""The data stage: python -m data_prep --config configs/data.yaml [key=value ...] [--force].

Faces, image edits and Stable Diffusion fakes with provenance, written under `prep.out`
(see data_prep/stage.py for the layout). Exit status: 0 done, 2 bad config or input.

Several processes, GPUs or nodes share the work with torchrun, with the same result as one:
    torchrun --nproc_per_node K -m data_prep --config configs/data.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from core.config import ConfigError, load_config
from core.data.labels import LabelError
from core.distributed import init_distributed, shutdown
from core.log import get_logger
from data_prep.demo import DemoError
from data_prep.stage import PrepError, prepare


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/data.yaml", help="data config (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild every output (the face cache is kept)")
    parser.add_argument("--workers", type=int, help="worker processes (default: prep.workers)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. prep.counts.swap=100")
    # Intermixed: overrides may come before or after the options.
    args = parser.parse_intermixed_args(argv)
    dist = init_distributed()  # one process unless started by torchrun
    if not dist.is_main:
        get_logger("data_prep").setLevel(logging.WARNING)  # the first process speaks for all
    try:
        cfg = load_config([args.config], args.overrides)
        progress = False if args.no_progress else None
        prepare(cfg, force=args.force, progress=progress, workers=args.workers, dist=dist)
    except (ConfigError, LabelError, PrepError, DemoError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown(dist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
