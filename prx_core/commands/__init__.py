"""Sub-commands of ``prx-run`` that live outside :mod:`prx_core.cli` (each module has ``main(argv) -> int``).

They are imported only when their command is typed, so ``prx-run plugins`` and ``check`` stay fast.
"""
