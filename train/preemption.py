"""Pre-emption: SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next step boundary and exits.

    flag = PreemptionFlag().install()      # ... flag.signum is set by the handler ...; flag.restore()
    exit_code = EXIT_CODES[signal.SIGUSR1]  # 0: SLURM requeues the job; SIGTERM -> 143

Ranks can receive the signal at different moments, so the loop agrees on it with ``model.comm.any_rank``
after every step, and every rank saves the same checkpoint.
"""

from __future__ import annotations

import signal
from typing import Any

EXIT_CODES = {signal.SIGUSR1: 0, signal.SIGTERM: 143}
"""Exit code after a pre-emption by each signal (checkpoint written in both cases)."""


class PreemptionFlag:
    """Records the first of SIGTERM / SIGUSR1 while installed; ``restore`` puts the previous handlers back."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> PreemptionFlag:
        for s in EXIT_CODES:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
