import sys

from ._interrupt import exit_on_sigint

exit_on_sigint()  # before the imports below: Ctrl-C while starting ends with one line, exit 130

from .cli import main  # noqa: E402

sys.exit(main())
