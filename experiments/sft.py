"""Supervised fine-tuning (SFT, Llama 3 paper Sec. 4.1.3): pretraining's loop on chat dialogs, the
loss on the assistant's tokens only (content and end tokens; prompts, headers and padding are not
learned), dialogs packed with document masks, learning rate 1e-5 by default. Takes pretrain.py's
flags; --data takes JSONL files of {"messages": [...]}.

  python experiments/sft.py --checkpoint /ckpt/Llama3.1-8B --data 'sft/*.jsonl' \\
      --steps 2000 --global_batch_size 64 --seq_len 8192 --checkpoint_dir /runs/sft
"""

import cli
import jobs
from absl import flags

cli.define(*cli.PRETRAINING_GROUPS)

if __name__ == "__main__":
  flags.FLAGS.set_default("data_kind", "chat")
  flags.FLAGS.set_default("lr", 1e-5)
  flags.FLAGS.set_default("sample_prompt", "")
  cli.run(jobs.pretraining_main)
