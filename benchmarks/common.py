"""Device benchmark helpers: the package's timing utilities (mixprec.kernels.timing)."""

from mixprec.kernels.timing import Clock, capture, env_info, summarize, time_fn, time_graph, write_json  # noqa: F401
