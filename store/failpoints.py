"""Named points where a test has the process killed with SIGKILL, as a crash would.

``GRACEFUL_FAILPOINT=NAME`` kills the process the moment it reaches ``failpoint(NAME)``:
no exception handler, ``finally`` or ``atexit`` runs, exactly as with ``kill -9``. The
kill tests use it to stop a cycle, an indexing or a gallery write at a chosen step;
unset (always, in production) it is one dictionary look-up. It lives in ``store`` so the
store's own writers can name points too; workers and flows import it from here.
"""

from __future__ import annotations

import os
import signal

ENV = "GRACEFUL_FAILPOINT"


def failpoint(name: str) -> None:
    """SIGKILL this process if ``GRACEFUL_FAILPOINT`` names this point."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
