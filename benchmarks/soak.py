r"""Soak: a tiny pre-training killed (SIGKILL) at random moments, resumed each time, must end
bit for bit where an uninterrupted run ends.

    nice -n 10 python benchmarks/soak.py [--kills 20] [--steps 40] [--latest-every 2]

1. A reference run: `python -m rrcm_jax.pretrain` on the synthetic data source with a
   tiny ViT, uninterrupted; its time to the first training step and its time per step
   set the kill windows.
2. The soak: the same command in another workdir, SIGKILLed `--kills` times, then run to
   completion. Every fifth kill lands at a uniform moment of the start-up (Python, XLA
   compilation, restoring); the others at a uniform moment within the time of
   `steps / kills` training steps after the resumed run logs its first step (between
   steps, and while Orbax writes or commits a checkpoint), so the run does not finish
   before the last kill.
3. Both final checkpoints are restored and every array (parameters, EMA and target copies,
   optimizer moments, step) is compared bit for bit.

Prints one JSON line: kills (delivered while the run was alive), restarts, final steps,
equal, the number of arrays compared and differing, damaged-checkpoint notices seen,
orphaned temporary checkpoint directories, and wall seconds.
"""
import argparse
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
PROGRESS = re.compile(rb"\] step \d+/")   # a progress line: "[####....] step 12/40 loss ..."
RESUMED = re.compile(r"(?:starting|resuming) at step (\d+)")
TINY = ["--config.data.name=synthetic", "--config.model.width=32", "--config.model.depth=1",
        "--config.model.num_heads=2", "--config.model.proj_hidden=16",
        "--config.model.proj_out=8", "--config.batch_size=16", "--config.log_every=1"]


def command(workdir, steps, latest_every):
  return [sys.executable, "-m", "rrcm_jax.pretrain", "--config=configs/fashion_mnist_pretrain.py",
          f"--workdir={workdir}", *TINY, f"--config.total_steps={steps}",
          f"--config.latest_every={latest_every}"]


_CHILDREN = []


def start(cmd, log):
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1"))
  _CHILDREN.append(proc)
  return proc


def _stop_children(*_):
  """SIGTERM to the soak: no run is left writing into its workdirs."""
  for proc in _CHILDREN:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  raise SystemExit(1)


def reference_run(cmd, log_path):
  """(wall seconds, seconds to the first training step) of an uninterrupted run."""
  begin = time.time()
  first_step = None
  with open(log_path, "w") as log:
    proc = start(cmd, log)
    while proc.poll() is None:
      time.sleep(0.2)
      if first_step is None and PROGRESS.search(pathlib.Path(log_path).read_bytes()):
        first_step = time.time() - begin
    if proc.returncode:
      raise SystemExit(f"the reference run failed (status {proc.returncode}); see {log_path}.")
  wall = time.time() - begin
  return wall, first_step or wall


def _wait_for_training(proc, log_path, offset, deadline=float("inf")):
  """Waits until the run logs a training step after byte `offset` of its log (True), or
  until `deadline` (time.time()) or its end (False)."""
  while proc.poll() is None and time.time() < deadline:
    with open(log_path, "rb") as f:
      f.seek(offset)
      if PROGRESS.search(f.read()):
        return True
    time.sleep(0.05)
  return False


def soak(cmd, kills, startup, step_window, log_path, rng):
  """Kills the run `kills` times at random moments, then lets it finish; (kills delivered,
  kills during start-up, restarts, final status)."""
  delivered = early = restarts = 0
  with open(log_path, "w") as log:
    while delivered < kills:
      log.flush()
      offset = os.path.getsize(log_path)
      proc = start(cmd, log)
      restarts += 1
      during_startup = delivered % 5 == 4   # kills 5, 10, 15, 20
      if during_startup:   # at the drawn moment, or at the first step if that comes sooner
        _wait_for_training(proc, log_path, offset, time.time() + rng.uniform(0.0, startup))
      if during_startup or _wait_for_training(proc, log_path, offset):
        try:
          proc.wait(timeout=0.0 if during_startup else rng.uniform(0.0, step_window))
        except subprocess.TimeoutExpired:
          proc.send_signal(signal.SIGKILL)
          proc.wait()
          delivered += 1
          early += during_startup
          log.write(f"\n=== soak: SIGKILL {delivered} ===\n")
          continue
      proc.wait()
      if proc.returncode == 0:   # finished before the next kill: nothing left to interrupt
        break
      raise SystemExit(f"a resumed run failed by itself (status {proc.returncode}); see {log_path}.")
    proc = start(cmd, log)
    restarts += 1
    status = proc.wait()
  return delivered, early, restarts, status


def final_arrays(workdir):
  """(step, {path: numpy array}) of the newest verified checkpoint of `workdir`."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from rrcm_jax import checkpoints  # pylint: disable=g-import-not-at-top
  ckpt = checkpoints.Checkpointer(workdir)
  try:
    step = ckpt.newest_verified_step()
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
  finally:
    ckpt.close()
  flat = jax.tree_util.tree_flatten_with_path(restored)[0]
  return step, {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def compare(reference, soaked):
  """(arrays compared, paths whose dtype, shape or bits differ)."""
  differ = sorted(set(reference) ^ set(soaked))
  for path in sorted(set(reference) & set(soaked)):
    a, b = reference[path], soaked[path]
    if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
      differ.append(path)
  return len(reference), differ


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--latest-every", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--root", default=None, help="directory for both workdirs (default: temp)")
  parser.add_argument("--keep", action="store_true", help="keep the workdirs and logs")
  args = parser.parse_args(argv)
  signal.signal(signal.SIGTERM, _stop_children)
  rng = random.Random(args.seed)
  root = pathlib.Path(args.root or tempfile.mkdtemp(prefix="rrcm_soak_"))
  root.mkdir(parents=True, exist_ok=True)
  begin = time.time()
  wall, startup = reference_run(command(root / "reference", args.steps, args.latest_every),
                                root / "reference.log")
  step_window = (wall - startup) / max(args.kills, 1)   # the time of steps / kills steps
  delivered, early, restarts, status = soak(
      command(root / "soaked", args.steps, args.latest_every), args.kills, startup, step_window,
      root / "soaked.log", rng)
  if status:
    raise SystemExit(f"the last resumed run failed (status {status}); see {root / 'soaked.log'}.")
  ref_step, ref = final_arrays(str(root / "reference"))
  soak_step, soaked = final_arrays(str(root / "soaked"))
  compared, differ = compare(ref, soaked)
  text = (root / "soaked.log").read_text(errors="replace")
  result = dict(kills=delivered, kills_during_startup=early, restarts=restarts, steps=args.steps, reference_step=ref_step,
                soaked_step=soak_step, equal=not differ and ref_step == soak_step,
                arrays=compared, differing=differ[:5],
                resumed_from=sorted({int(s) for s in RESUMED.findall(text)}),
                damaged_notices=text.count("failed verification"),
                orphaned_tmp_dirs=len(list((root / "soaked" / "checkpoints").glob("*tmp*"))),
                startup_s=round(startup, 1), step_window_s=round(step_window, 2),
                wall_s=round(time.time() - begin, 1))
  print(json.dumps(result), flush=True)
  if not args.keep:
    shutil.rmtree(root, ignore_errors=True)
  return 0 if result["equal"] else 1


if __name__ == "__main__":
  sys.exit(main())
