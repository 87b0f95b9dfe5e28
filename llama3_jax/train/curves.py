"""Training curves of one or several runs as a PNG: a panel per metric, a line per run (a metric's
held-out `eval_` twin dashed in the same panel)."""

from typing import Dict, Mapping, Sequence

from llama3_jax.train.metrics import scalars

PANELS = ("loss", "lr", "tokens_per_s")
TITLES = {"loss": "loss", "lr": "learning rate", "tokens_per_s": "tokens/s"}


def series(records: Sequence[Dict], name: str):
  """(steps, values) of the records that hold a number for `name`."""
  points = [(r["step"], scalars(r)[name]) for r in records if name in scalars(r)]
  return [s for s, _ in points], [v for _, v in points]


def plot_curves(
  runs: Mapping[str, Sequence[Dict]], path: str, metrics: Sequence[str] = PANELS
) -> None:
  """Draws `metrics` of `runs` ({run name: records}) against the step into the PNG `path`; a
  metric no run holds (nor its `eval_` twin) gets no panel. ValueError when none is left."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  held = {name for records in runs.values() for record in records for name in scalars(record)}
  panels = [m for m in metrics if m in held or f"eval_{m}" in held]
  if not panels:
    raise ValueError(f"No run holds any of the metrics {list(metrics)} (they hold {sorted(held)})")
  figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
  for axis, metric in zip(axes[0], panels):
    for index, (run, records) in enumerate(runs.items()):
      for name, style, kind in ((metric, "-", ""), (f"eval_{metric}", "--", " (held-out)")):
        steps, values = series(records, name)
        marker = "." if len(steps) < 30 else None
        if steps:
          axis.plot(steps, values, style, color=f"C{index}", label=run + kind, marker=marker)
    axis.set_title(TITLES.get(metric, metric))
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)
