"""Shim: `python -m bench.serve_workers serve --workers N` runs the service's own CLI
(`service.__main__.main`), imported as `service.__main__` instead of run as `__main__`.

Why: multiprocessing's spawn does not re-import a `package.__main__` module in the
child, so `python -m service serve --workers N` cannot unpickle its `_worker` target
(`AttributeError: Can't get attribute '_worker' on <module '__main__'>`). Imported
from here, the target pickles as `service.__main__._worker`, which the child imports
normally. The harness uses this only when `python -m service serve --workers 2` itself
fails to come up, and says so in the report; the code path measured
(`_serve_workers`, SO_REUSEPORT workers) is the service's own.
"""

from __future__ import annotations

import sys

from service.__main__ import main

if __name__ == "__main__":
    main(sys.argv[1:])
