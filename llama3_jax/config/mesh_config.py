"""The device mesh: degrees of data, FSDP, pipeline, context and tensor parallelism."""

import dataclasses

from llama3_jax.config.base import ConfigBase

MESH_AXES = ("data", "fsdp", "pipeline", "context", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig(ConfigBase):
  """Parallelism degrees, outermost (slowest links) to innermost; one of them may be -1 = the rest.

  `dcn_data` > 1 spreads the `data` axis over that many slices (multi-slice TPU, multi-node GPU):
  each slice holds data / dcn_data replicas and every other axis stays inside a slice.
  """

  data: int = 1
  fsdp: int = -1
  pipeline: int = 1
  context: int = 1
  tensor: int = 1
  dcn_data: int = 1

  def __post_init__(self):
    degrees = self.degrees()
    if list(degrees).count(-1) > 1:
      raise ValueError(f"At most one mesh axis may be -1 (the rest), got {self}")
    for axis, degree in zip(MESH_AXES, degrees):
      if degree == 0 or degree < -1:
        raise ValueError(f"MeshConfig.{axis} must be a positive int or -1, got {degree}")
    if self.dcn_data < 1:
      raise ValueError(f"MeshConfig.dcn_data must be >= 1, got {self.dcn_data}")
    if self.data != -1 and self.data % self.dcn_data:
      raise ValueError(f"MeshConfig.data={self.data} is not divisible by dcn_data={self.dcn_data}")

  def degrees(self):
    return tuple(getattr(self, axis) for axis in MESH_AXES)

  def resolved(self, n_devices: int) -> "MeshConfig":
    """The degrees with -1 replaced so that their product is `n_devices`."""
    known = 1
    for degree in self.degrees():
      known *= degree if degree != -1 else 1
    if -1 in self.degrees():
      if n_devices % known:
        raise ValueError(
          f"The fixed mesh degrees ({known} devices) do not divide the {n_devices} devices"
        )
      fill = n_devices // known
      return dataclasses.replace(
        self, **{axis: fill for axis, degree in zip(MESH_AXES, self.degrees()) if degree == -1}
      )
    if known != n_devices:
      raise ValueError(
        f"Mesh degrees {dict(zip(MESH_AXES, self.degrees()))} use {known} devices, but there are "
        f"{n_devices}; make the product equal or set one axis to -1"
      )
    return self

  @classmethod
  def parse(cls, text: str) -> "MeshConfig":
    """From 'fsdp=4,tensor=2' (unnamed axes are 1; fsdp is -1 unless another axis is)."""
    degrees = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
      name, sep, value = item.partition("=")
      if not sep or name.strip() not in MESH_AXES + ("dcn_data",):
        raise ValueError(
          f"Bad mesh item {item!r}; expected AXIS=N with AXIS in {MESH_AXES + ('dcn_data',)}"
        )
      try:
        degrees[name.strip()] = int(value)
      except ValueError:
        raise ValueError(
          f"Bad mesh item {item!r}: the degree {value.strip()!r} is not a whole number"
        ) from None
    if "fsdp" not in degrees:
      degrees["fsdp"] = 1 if -1 in degrees.values() else -1
    return cls(**degrees)
