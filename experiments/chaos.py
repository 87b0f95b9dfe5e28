"""Fault injection around a small pretraining job: `experiments/pretrain.py` is SIGKILLed at random
moments (start-up, steps, saves, deletions of old steps) and resumed each time; between restarts
the newest saved step is damaged (a flipped block, a truncated or deleted file, an emptied step,
a garbled manifest); once a save meets a full disk (`ulimit -f`). Then the run is finished and its
losses compared with an uninterrupted run of the same job.

Prints, and writes as JSON with --output_json: kills, failed resumes, steps retrained, corruptions
detected and missed, the full-disk save's outcome, whether every step's loss equals the straight
run's bitwise, and goodput across the whole interrupted run (the loop's own figure, carried across
restarts in the checkpoints, and the straight run's wall time over the interrupted run's).

  python experiments/chaos.py --kills=20 --corruptions=5
"""

import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import cli
from absl import flags

from llama3_jax.convert.step_integrity import MANIFEST_FILE, UNDIGESTED, step_numbers

_WORK_DIR = flags.DEFINE_string("work_dir", None, "Where the runs go (default: a new temp dir).")
_KILLS = flags.DEFINE_integer("kills", 20, "SIGKILLs to inject.")
_CORRUPTIONS = flags.DEFINE_integer("corruptions", 5, "Damaged newest steps to inject.")
_STEPS = flags.DEFINE_integer("job_steps", 60, "Steps of the job.")
_SAVE_EVERY = flags.DEFINE_integer("job_save_every", 2, "The job's --save_every.")
_SEED = flags.DEFINE_integer("chaos_seed", 0, "Seed of the kill times and damage.")
_FULL_DISK = flags.DEFINE_bool("full_disk", True, "Make one save meet a full disk (ulimit -f).")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write the summary here too.")

DAMAGES = ("flip", "truncate", "delete", "empty", "manifest")
FULL_DISK_BYTES = 1 << 16


class _Job:
  """pretrain.py running on `directory`, its stderr going to the file `log`."""

  def __init__(self, directory: str, metrics: str, log: str, limit_file_bytes: int = 0):
    self.directory, self.metrics, self.log = directory, metrics, log
    self.records_at_start, self.started = len(_records(metrics)), time.time()
    with open(log, "w") as stderr:
      self.process = _start(directory, metrics, stderr, limit_file_bytes)

  def wait(self, timeout=None) -> str:
    """Its stderr once it has ended; SIGKILLed when still running after `timeout` seconds, noting
    in `killed_during` what it was doing: "start-up" (not yet training), "save" (a step's
    temporary directory exists: writing, sealing or deleting old steps) or "steps"."""
    self.killed_during = None
    try:
      self.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      saving = self._saving()
      self.process.send_signal(signal.SIGKILL)
      self.process.wait()
      stepped = len(_records(self.metrics)) > self.records_at_start
      self.killed_during = "save" if saving else "steps" if stepped else "start-up"
    with open(self.log) as f:
      return f.read()

  def _saving(self) -> bool:
    """Whether this job is writing a step: a temporary step directory touched since it started."""
    if not os.path.isdir(self.directory):
      return False
    return any(
      "orbax-checkpoint-tmp" in name
      and os.path.getmtime(os.path.join(self.directory, name)) >= self.started
      for name in os.listdir(self.directory)
    )

  @property
  def returncode(self) -> int:
    return self.process.returncode


def _start(directory: str, metrics: str, stderr, limit_file_bytes: int) -> subprocess.Popen:
  command = [
    sys.executable,
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.py"),
    "--config=tiny",
    f"--steps={_STEPS.value}",
    "--global_batch_size=2",
    "--seq_len=16",
    "--eval_every=0",
    "--log_every=1",
    "--max_new_tokens=0",
    f"--save_every={_SAVE_EVERY.value}",
    "--keep_checkpoints=3",
    f"--checkpoint_dir={directory}",
    f"--metrics_file={metrics}",
  ]

  def limit_files():
    if limit_file_bytes:
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
      resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  return subprocess.Popen(
    command,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=stderr,
    preexec_fn=limit_files,
  )


def _records(metrics: str) -> list:
  if not os.path.exists(metrics):
    return []
  with open(metrics) as f:
    return [json.loads(line) for line in f if line.strip()]


def _damage(step_dir: str, how: str, rng: random.Random) -> str:
  """Damages the step at `step_dir` the way `how` names; says what was done."""
  files = sorted(  # the files a step's manifest covers (Orbax rewrites UNDIGESTED itself)
    os.path.join(root, name)
    for root, _, names in os.walk(step_dir)
    for name in names
    if os.path.relpath(os.path.join(root, name), step_dir) not in UNDIGESTED
    and os.path.getsize(os.path.join(root, name))
  )
  target = rng.choice(files)
  relative = os.path.relpath(target, step_dir)
  if how == "flip":
    size = os.path.getsize(target)
    with open(target, "r+b") as f:
      offset = rng.randrange(max(size - 64, 1))
      f.seek(offset)
      block = f.read(64)
      f.seek(offset)
      f.write(bytes(b ^ 0xFF for b in block))
    return f"flipped {len(block)} bytes of {relative} at {offset}"
  if how == "truncate":
    os.truncate(target, os.path.getsize(target) // 2)
    return f"truncated {relative} to half"
  if how == "delete":
    os.remove(target)
    return f"deleted {relative}"
  if how == "empty":
    for name in os.listdir(step_dir):
      path = os.path.join(step_dir, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return "emptied the step"
  with open(os.path.join(step_dir, MANIFEST_FILE), "w") as f:
    f.write('{"files": {')
  return f"garbled {MANIFEST_FILE}"


def _straight(work: str) -> dict:
  metrics = os.path.join(work, "straight.jsonl")
  start = time.time()
  job = _Job(os.path.join(work, "straight"), metrics, os.path.join(work, "straight.log"))
  first_step_at = None
  while job.process.poll() is None:
    if first_step_at is None and _records(metrics):
      first_step_at = time.time()
    time.sleep(0.05)
  if job.returncode:
    raise RuntimeError(f"The straight run failed: {job.wait()[-3000:]}")
  wall = time.time() - start
  startup = (first_step_at or time.time()) - start
  return dict(
    losses={r["step"]: r["loss"] for r in _records(metrics)},
    wall_s=wall,
    startup_s=startup,
    step_s=(wall - startup) / max(_STEPS.value - 1, 1),
  )


def _kill_window(straight: dict, directory: str) -> float:
  """Seconds within which the next kill falls: start-up and three saves' worth of steps, but
  well before the job would finish from its newest saved step (a kill must land to count)."""
  saved = step_numbers(directory)
  left = _STEPS.value - (saved[-1] if saved else 0)
  usual = straight["startup_s"] + 3 * _SAVE_EVERY.value * straight["step_s"]
  return max(min(usual, 0.7 * (straight["startup_s"] + left * straight["step_s"])), 0.2)


def main(argv):
  del argv
  rng = random.Random(_SEED.value)
  work = _WORK_DIR.value or tempfile.mkdtemp(prefix="chaos-")
  os.makedirs(work, exist_ok=True)
  straight = _straight(work)
  print(
    f"straight run: {straight['wall_s']:.1f}s ({straight['startup_s']:.1f}s start-up, "
    f"{straight['step_s']:.2f}s per step)"
  )
  directory, metrics = os.path.join(work, "chaos"), os.path.join(work, "chaos.jsonl")
  kills, runs, failures, damages, pending, detected, missed = 0, 0, [], [], None, 0, 0
  phases = {}  # kills by what the job was doing
  full_disk = None
  corrupt_at = sorted(rng.sample(range(1, _KILLS.value + 1), min(_CORRUPTIONS.value, _KILLS.value)))
  full_disk_after = _KILLS.value // 2 if _FULL_DISK.value else None
  start = time.time()
  while True:
    killing = kills < _KILLS.value
    delay = rng.uniform(0.1, _kill_window(straight, directory)) if killing else None
    job = _Job(directory, metrics, os.path.join(work, f"run-{runs}.log"))
    runs += 1
    stderr = job.wait(timeout=delay)
    resumed = re.search(r"Training from step (\d+)", stderr)
    if pending and resumed:  # the first run to get past resuming since the damage
      step, how = pending
      found = int(resumed[1]) < step
      detected, missed = detected + found, missed + (not found)
      damages[-1]["detected"] = found
      pending = None
    if job.returncode not in (0, -signal.SIGKILL) or "Traceback" in stderr:
      failures.append(stderr[-2000:])
      break
    if job.returncode == 0:
      break
    if job.returncode == -signal.SIGKILL:
      kills += 1
      phases[job.killed_during] = phases.get(job.killed_during, 0) + 1
    if kills == full_disk_after and full_disk is None:
      began = time.time()
      disk = _Job(directory, metrics, os.path.join(work, "full-disk.log"), FULL_DISK_BYTES)
      disk_err = disk.wait(timeout=600)
      ours = [line for line in disk_err.splitlines() if line.startswith("pretrain.py: error:")]
      full_disk = dict(
        returncode=disk.returncode,
        seconds=round(time.time() - began, 1),
        error=ours[-1] if ours else disk_err.strip()[-300:],
        temporary_left=[n for n in os.listdir(directory) if "orbax-checkpoint-tmp" in n],
      )
      named = full_disk["error"].startswith("pretrain.py: error: Saving step")
      if disk.returncode != 1 or not named or full_disk["temporary_left"]:
        failures.append(disk_err[-2000:])
    due = len(damages) < len(corrupt_at) and kills >= corrupt_at[len(damages)]
    if due and pending is None:  # one damage at a time: each is seen by a resume before the next
      steps = step_numbers(directory)
      if len(steps) >= 2:  # an older step to fall back to
        how = DAMAGES[len(damages) % len(DAMAGES)]
        what = _damage(os.path.join(directory, str(steps[-1])), how, rng)
        damages.append(dict(step=steps[-1], damage=what))
        pending = (steps[-1], how)
  wall = time.time() - start
  records = _records(metrics)
  final = {r["step"]: r["loss"] for r in records}
  summary = dict(
    kills=kills,
    kills_during=phases,
    failed_resumes=len(failures),
    steps_trained=len(records),
    steps_retrained=len(records) - len(final),
    corruptions=len(damages),
    corruptions_detected=detected,
    corruptions_missed=missed,
    damages=damages,
    full_disk=full_disk,
    losses_bitwise_equal=final == straight["losses"],
    goodput_loop=records[-1].get("run_goodput") if records else None,
    goodput_vs_straight=straight["wall_s"] / wall,
    wall_s=round(wall, 1),
    work_dir=work,
  )
  for failure in failures:
    print(f"failure:\n{failure}\n")
  print(json.dumps(summary, indent=1))
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump(summary, f, indent=1)
  if failures or missed or not summary["losses_bitwise_equal"]:
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
