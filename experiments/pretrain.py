"""Pretrains a Llama 3 preset on a mesh of data / FSDP / pipeline / context / tensor parallelism;
re-running resumes.

  python experiments/pretrain.py --config tiny --steps 150 --checkpoint_dir /tmp/tiny_run
  python experiments/pretrain.py --config llama3.1-8b --mesh fsdp=64,tensor=8 \\
      --data 'gs://bucket/web/*.jsonl@0.5' --data 'gs://bucket/code/*.jsonl@0.17' ...
"""

import cli
import jobs

cli.define(*cli.PRETRAINING_GROUPS)

if __name__ == "__main__":
  cli.run(jobs.pretraining_main)
