"""The command-line tests' helper: run a paper file the way a user would and hand back what it printed.

One thread (OMP_NUM_THREADS=1): the tiny presets gain nothing from more, and on a busy 2-core machine OpenMP
threads oversubscribe and crawl."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args, check=True, timeout=300):
    """python SCRIPT ARGS... in the repo root -> CompletedProcess; with check, a failure shows the output's tail."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p
