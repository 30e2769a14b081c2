"""Run a command with a file-size limit, for the full-disk tests.

    python tests/file_size_limit.py BYTES PROGRAM [arguments ...]

The limit is set here, in a fresh process that then becomes PROGRAM (limits survive exec), not by
subprocess's preexec_fn: that runs Python between fork and exec in the test process, which JAX has
made multithreaded, and can deadlock there.
"""

import os
import resource
import sys

limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execv(sys.argv[2], sys.argv[2:])
