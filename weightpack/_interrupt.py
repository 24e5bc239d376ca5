"""Ctrl-C for the command line (import-light: installed before anything heavy is imported)."""

from __future__ import annotations

import signal

# -- interrupts (the command line) ---------------------------------------------------------------
# The first Ctrl-C raises KeyboardInterrupt in the main thread; later ones are ignored while the command
# cleans up (removes its temporary output, kills its workers), so a second Ctrl-C cannot interrupt the
# cleanup. Once an output has been committed (renamed into place) the command has done its work: an
# interrupt from then on is ignored and the command reports success.

_sigint = {"armed": False, "interrupted": False, "committed": False}


def _on_sigint(signum, frame) -> None:
    if _sigint["interrupted"] or _sigint["committed"]:
        return
    _sigint["interrupted"] = True
    raise KeyboardInterrupt


def install_sigint_handler() -> None:
    _sigint.update(armed=True, interrupted=False, committed=False)
    signal.signal(signal.SIGINT, _on_sigint)


def ignore_interrupts() -> None:
    """From here on the command finishes whatever comes (its output is complete)."""
    _sigint["committed"] = True


def output_started() -> None:
    """A new output is being written: an interrupt stops it again (rate control packs more than once)."""
    _sigint["committed"] = False


def output_committed() -> None:
    """Called just before an output is renamed into place: from then on the command completes."""
    if _sigint["armed"]:
        _sigint["committed"] = True


def _exit_now(signum, frame) -> None:
    import os

    os.write(2, b"weightpack: interrupted\n")
    os._exit(130)


def exit_on_sigint() -> None:
    """While the command starts (imports, before it has anything to clean up): Ctrl-C exits at once."""
    signal.signal(signal.SIGINT, _exit_now)
