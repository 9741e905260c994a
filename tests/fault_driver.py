"""`python -m bits_jax.main` with fault hooks, for the subprocesses of tests/test_faults.py.

  python -m tests.fault_driver --config=... --workdir=... [main's flags]

Hooks (environment variables; none changes the config, so a restart without them is the
"same command"):
  BITS_TEST_STEP_DELAY=seconds   sleep before each train batch, so a test can signal the run
                                 while it is mid-way;
  BITS_TEST_NAN_AT_STEPS=2,4     a NaN in the batch of those updates (1-based, = step after);
  BITS_TEST_KILL_AT_COMMIT=1     SIGKILL this process when Orbax is about to commit (rename)
                                 the first checkpoint it writes: the data are on disk, the
                                 commit is not.
"""

import os
import signal
import time


def _install_hooks():
  from bits_jax import data  # pylint: disable=g-import-not-at-top

  delay = float(os.environ.get("BITS_TEST_STEP_DELAY", "0") or 0)
  nan_steps = {int(s) for s in os.environ.get("BITS_TEST_NAN_AT_STEPS", "").split(",") if s}
  if delay or nan_steps:
    # The loop calls `bits_jax.data.make_train_iterator` (through the package) at run time.
    make = data.make_train_iterator

    def make_train_iterator(config, *, start_step=0, **kwargs):
      for i, batch in enumerate(make(config, start_step=start_step, **kwargs)):
        if delay:
          time.sleep(delay)
        if start_step + i + 1 in nan_steps:
          batch = dict(batch, **{"global": batch["global"].copy()})
          batch["global"][0, 0, 0, 0, 0] = float("nan")
        yield batch

    data.make_train_iterator = make_train_iterator

  if os.environ.get("BITS_TEST_KILL_AT_COMMIT"):
    from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_or_die(self, *args, **kwargs):
      final = self._final_path  # pylint: disable=protected-access
      if final.name.isdigit():  # the step directory, not an item inside it
        print(f"fault_driver: SIGKILL before committing {final}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
      return await finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from bits_jax import main  # pylint: disable=g-import-not-at-top

  _install_hooks()
  app.run(main.main)
