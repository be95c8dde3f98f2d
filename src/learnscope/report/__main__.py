"""``python -m learnscope.report LOGDIR`` = ``learnscope report LOGDIR``;
``python -m learnscope.report report LOGDIR`` works too."""

import sys

from learnscope.report.cli import main


def _run(argv: list[str]) -> int:
    # The module name already says "report": accept the subcommand or not.
    if argv and argv[0] not in ("report", "-h", "--help"):
        argv = ["report", *argv]
    return main(argv)


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1:]))
