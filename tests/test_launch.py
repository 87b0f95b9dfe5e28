"""Job scripts in launch/: valid bash and JobSet YAML, running binaries with flags those define."""

import glob
import math
import os
import re
import subprocess

import pytest
import yaml
from binary_flags import binary_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")))
SCRIPTS += sorted(glob.glob(os.path.join(REPO, "launch", "*.sbatch")))
JOBSETS = sorted(glob.glob(os.path.join(REPO, "launch", "*.yaml")))

_BINARY = re.compile(r"experiments/(\w+)\.py")
_FLAG = re.compile(r"(?<![\w-])--([A-Za-z]\w*)")


def _invocations(command_line):
  """(binary, its flags) for each experiments/*.py in one command line."""
  matches = list(_BINARY.finditer(command_line))
  ends = [m.start() for m in matches[1:]] + [len(command_line)]
  return [(m[1], set(_FLAG.findall(command_line[m.end() : end]))) for m, end in zip(matches, ends)]


def _check(invocations):
  assert invocations, "runs no experiments/*.py binary"
  for binary, used in invocations:
    defined = binary_flags(binary)
    # A boolean flag may also be given as --noNAME.
    unknown = {f for f in used if f not in defined and f.removeprefix("no") not in defined}
    assert not unknown, f"{binary}.py defines no flag {sorted(unknown)}"


def _command_line(container):
  return " ".join(container.get("command", []) + container.get("args", []))


def _name(path):
  return os.path.basename(path)


def test_launch_files_found():
  assert {"tpu_vm_pod.sh", "slurm_gpu.sbatch"} <= set(map(_name, SCRIPTS))
  assert "gke_jobset.yaml" in set(map(_name, JOBSETS))


@pytest.mark.parametrize("path", SCRIPTS, ids=_name)
def test_script_is_valid_bash(path):
  result = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", SCRIPTS, ids=_name)
def test_script_runs_binaries_with_their_flags(path):
  with open(path) as f:
    lines = f.read().replace("\\\n", " ").splitlines()
  commands = [line for line in lines if not line.lstrip().startswith("#")]
  _check([inv for line in commands for inv in _invocations(line)])


@pytest.mark.parametrize("path", JOBSETS, ids=_name)
def test_jobset_runs_pretrain_on_every_host(path):
  with open(path) as f:
    documents = [d for d in yaml.safe_load_all(f) if d is not None]
  assert documents
  for jobset in documents:
    assert (jobset["apiVersion"], jobset["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    for job in jobset["spec"]["replicatedJobs"]:
      spec = job["template"]["spec"]
      pod = spec["template"]["spec"]
      hosts = spec["completions"]
      assert spec["parallelism"] == hosts
      [trainer] = [c for c in pod["containers"] if "experiments/pretrain.py" in _command_line(c)]
      command_line = _command_line(trainer)
      _check(_invocations(command_line))
      processes = re.search(r"--num_processes[= ](\d+)", command_line)
      if processes:
        assert int(processes[1]) == hosts * job.get("replicas", 1)
      topology = pod.get("nodeSelector", {}).get("cloud.google.com/gke-tpu-topology")
      if topology:
        chips = math.prod(map(int, topology.split("x")))
        assert chips == hosts * int(trainer["resources"]["limits"]["google.com/tpu"])
