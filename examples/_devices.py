"""Several CPU devices for the multi-device examples: set before JAX starts.

Kept apart from ``_common`` (which imports JAX) so that an example can import it first.
"""

from __future__ import annotations

import os
import re

_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")


def force_host_devices(n: int, override: bool = False) -> None:
  """Makes XLA:CPU present ``n`` devices, keeping the other flags in ``XLA_FLAGS``.

  Call it before importing JAX. A device count already in ``XLA_FLAGS`` is kept unless
  ``override`` (an example whose layout needs exactly ``n`` devices per process).

  Args:
    n: The number of CPU devices.
    override: Whether to replace a device count already set.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if _COUNT.search(flags) and not override:
    return
  flags = _COUNT.sub("", flags)
  count = f"--xla_force_host_platform_device_count={n}"
  os.environ["XLA_FLAGS"] = " ".join([*flags.split(), count])
