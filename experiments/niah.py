"""Needle-in-a-haystack retrieval of a checkpoint (any format) or a random-weight preset, over a grid
of context lengths x needle depths; writes DIR/results.jsonl and DIR/heatmap.png.

  python experiments/niah.py --checkpoint /ckpt/Llama3.1-8B --lengths 8192,32768,131072 \\
      --depths 0,25,50,75,100 --needles 1 --mesh fsdp=2,context=4 --output_dir /tmp/niah
  python experiments/niah.py --config tiny --lengths 512,1024 --needles 4 --output_dir /tmp/niah
"""

import cli
from absl import flags, logging

import llama3_jax as l3
from llama3_jax.eval import niah
from llama3_jax.parallel import make_mesh

cli.define("checkpoint", "preset", "model", "mesh", "lengths", "niah")
cli.required("output_dir")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  lengths = niah.parse_numbers(FLAGS.lengths, "--lengths")
  depths = niah.parse_numbers(FLAGS.depths, "--depths", float)
  counts = niah.parse_numbers(FLAGS.needles, "--needles")
  mesh = make_mesh(cli.mesh_config())
  cfg, params = cli.load_model(mesh)
  tokenizer = l3.Tokenizer.default()
  records = []
  for needles in counts:
    records += niah.evaluate(
      cfg,
      params,
      tokenizer,
      lengths=lengths,
      depths=depths,
      needles=needles,
      samples=FLAGS.niah_samples,
      haystack=FLAGS.haystack,
      seed=FLAGS.seed,
      mesh=mesh,
      batch_size=FLAGS.niah_batch_size,
    )
  niah.write_outputs(records, FLAGS.output_dir, FLAGS.checkpoint or f"{FLAGS.config} (random)")
  for needles in counts:
    print(f"NIAH, {needles} needle(s), mean score by length: {niah.summary(records, needles)}")
  logging.info("Wrote %s and %s in %s", niah.RESULTS_FILE, niah.HEATMAP_FILE, FLAGS.output_dir)


if __name__ == "__main__":
  cli.run(main)
