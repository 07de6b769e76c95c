"""Device benchmark helpers: the package's timing utilities (mixprec.kernels.timing)."""

from mixprec.kernels.timing import Clock, capture, env_info, summarize, time_fn, time_graph, write_json  # noqa: F401


def run_parts(parts, out: dict, clock: Clock, path) -> None:
    """Run ``(name, fn)`` parts in order; a part that raises is recorded (``<name>_error``) and the
    others still run; the JSON at ``path`` is rewritten after each part and at the end."""
    import traceback

    try:
        for name, part in parts:
            try:
                part()
            except Exception as exc:  # keep what the other parts measured
                traceback.print_exc()
                out[f"{name}_error"] = repr(exc)[:600]
            out[f"{name}_done_s"] = clock.elapsed()
            write_json(path, out)
    finally:
        out["elapsed_s"] = clock.elapsed()
        write_json(path, out)
