"""Suite-wide settings.

On a GPU, XLA runs float32 matmuls as TF32 unless told otherwise (about 1e-3 relative), while the
suite's references are float64 or full-float32 CPU runs with tolerances near 1e-5. Seen on the first
GPU visit (H200, jax 0.11.2, 2026-12-04): five test_sparq checks off by ~2e-3 under the default,
all passing with JAX_DEFAULT_MATMUL_PRECISION=highest. The suite states what it checks (the
function, at float32), so it runs at full precision; the kernel's own TF32 behaviour is checked
where it is named (TestPallas.test_default_precision_is_tf32_close). On the CPU this changes nothing.
"""

from __future__ import annotations

import jax

from pallas_kernels.backend import on_gpu

if on_gpu():
    jax.config.update("jax_default_matmul_precision", "highest")


def draws(default: int) -> int:
    """How many random inputs a randomized check draws: `default` in CI, SELFSPAN_DRAWS when set (the
    longer runs README names, e.g. SELFSPAN_DRAWS=200)."""
    import os

    value = os.environ.get("SELFSPAN_DRAWS")
    if value is None:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"SELFSPAN_DRAWS must be a positive int, got {value!r}")
    return int(value)


class WorkStarted(Exception):
    """Raised by a fuzzed CLI's stubbed work: every check before it passed."""


def fuzz_cli(main, argv, *, stub, error_code: int | tuple[int, ...], prog: str, cwd=None) -> None:
    """One fuzz draw of a script's `main(argv)`, with the function `stub` = (module, name) that starts its
    real work replaced by one raising WorkStarted. The draw must end in argparse's usage error (exit 2),
    the script's own "<prog>: error:" line with `error_code` (or one of them), or WorkStarted -- never
    anything else.
    With SELFSPAN_FUZZ_LOG=FILE, each draw's argv and the end of its stderr are appended there."""
    import contextlib
    import io
    import json
    import os

    module, name = stub
    err, real = io.StringIO(), getattr(module, name)

    def start(*args, **kwargs):
        raise WorkStarted

    setattr(module, name, start)
    try:
        with contextlib.redirect_stderr(err), contextlib.chdir(cwd or os.getcwd()):
            rc = main(argv)
        codes = (error_code,) if isinstance(error_code, int) else error_code
        assert rc in codes and f"{prog}: error: " in err.getvalue(), (argv, rc, err.getvalue())
    except SystemExit as exit_:  # argparse: a value of the wrong type, or the script's own parser.error
        assert exit_.code == 2 and f"{prog}: error: " in err.getvalue(), (argv, err.getvalue())
    except WorkStarted:
        pass
    finally:
        setattr(module, name, real)
    if os.environ.get("SELFSPAN_FUZZ_LOG"):  # which way each draw ended, for a person checking the fuzz
        with open(os.environ["SELFSPAN_FUZZ_LOG"], "a") as log:
            log.write(json.dumps({"argv": argv, "stderr": err.getvalue().strip()[-200:]}) + "\n")


def load_script(relpath: str):
    """A benchmark or tool script (`benchmarks/*.py`, `tools/gpu/*.py`, the `scripts/` shims) loaded from
    its file as the module its command line runs, for tests of that command line. Logic the tests
    check on its own lives in the package; this is only for the scripts' own flags and output."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / relpath
    spec = importlib.util.spec_from_file_location(f"{path.stem}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
