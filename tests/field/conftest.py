"""Field tests: ckptconv against MaxText 0.2.5 and HF transformers 4.57.6 themselves.

They need the field venv (Python 3.12, `.ci/field` builds `.venv-field` from
`.ci/field-requirements.txt`). The main suite's venv has no MaxText: there this
directory is not collected. `.ci/field` sets CKPTCONV_FIELD=1, so that a broken field
venv fails at collection instead of quietly collecting nothing.
"""

from __future__ import annotations

import os

try:
    import maxtext  # noqa: F401

    _HAVE_MAXTEXT = True
except ImportError:
    _HAVE_MAXTEXT = False

if not _HAVE_MAXTEXT and os.environ.get("CKPTCONV_FIELD") != "1":
    collect_ignore_glob = ["*.py"]


def pytest_terminal_summary(terminalreporter):
    """List every MaxText run with its wall time (they are most of the stage's time)."""
    if not _HAVE_MAXTEXT:
        return
    import maxtext_run

    if maxtext_run.RUNS:
        terminalreporter.section("MaxText runs")
        for name, seconds in maxtext_run.RUNS:
            loss = maxtext_run.LOSSES.get(name)
            first = f", first loss {loss!r}" if loss is not None else ""
            terminalreporter.write_line(f"{name}: {seconds:.1f} s{first}")
        total = sum(s for _, s in maxtext_run.RUNS)
        terminalreporter.write_line(f"{len(maxtext_run.RUNS)} runs, {total:.1f} s")
