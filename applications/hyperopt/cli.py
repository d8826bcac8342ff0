"""``python -m applications.hyperopt [clean|distill|l2|compare] [options]``: one command line.

* ``clean`` (the default, also with no arguments): data hyper-cleaning -- one weight per
  training example, learned through the implicit gradient of a clean validation loss;
* ``distill``: dataset distillation -- one synthetic image per class;
* ``l2``: one L2 strength per feature through an external (scipy) inner solver;
* ``compare``: hypergradient estimators side by side on the hyper-cleaning problem.

Each subcommand has its own ``--help``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

#: subcommand -> module (imported only when used: each pulls in its own dependencies).
COMMANDS = {"clean": "cleaning", "distill": "distill", "l2": "l2", "compare": "compare"}
DEFAULT = "clean"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    command = DEFAULT
    if args and not args[0].startswith("-"):
        command = args.pop(0)
        if command not in COMMANDS:
            print(f"python -m applications.hyperopt: error: unknown subcommand {command!r} "
                  f"(choose from {', '.join(COMMANDS)})", file=sys.stderr)
            return 2
    module = importlib.import_module(f"applications.hyperopt.{COMMANDS[command]}")
    try:
        return int(module.main(args))
    except KeyboardInterrupt:  # these runs have no checkpoint: say so in one line
        print(f"python -m applications.hyperopt {command}: interrupted (nothing to resume: run it again)", file=sys.stderr)
        return 130
