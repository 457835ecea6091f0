"""The keeper: ``rbee``, the command-line client of the queen.

:mod:`~rbee.keeper.cli` (commands), :mod:`~rbee.keeper.session` (options, auto-start,
running a job), :mod:`~rbee.keeper.client` (HTTP), :mod:`~rbee.keeper.render` (events
for people), :mod:`~rbee.keeper.tables` (rich tables), :mod:`~rbee.keeper.daemon`
(the queen process), :mod:`~rbee.keeper.errors` (outcomes and exit codes).
"""

__all__: list[str] = []
