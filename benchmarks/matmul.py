r"""The machine's matrix-multiply rate: the yardstick of every other benchmark.

  python -m benchmarks.matmul [--sizes 1024,2048] [--dtypes float32,bfloat16] [--quick]

A jitted square matmul `a @ b` (n × n, random normal operands, not zeros),
dispatched a few times back to back and timed to completion, best of several
rounds: 2 n³ FLOP per product. The other benchmarks call `matmul_rate` in
their own process right before (and between) their own measurements and
state their achieved FLOP/s as a fraction of it. bfloat16 is measured on
accelerators (on CPU XLA emulates it and the figure says nothing useful).
Writes benchmarks/results/matmul.json.
"""
import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks import report, timing

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Square sizes that fill the machine: a 1024-2048 product keeps two CPU cores
# busy for tens of milliseconds; an H100 needs 8192 (1.1 TFLOP) per product.
CPU_SIZES = (1024, 2048)
GPU_SIZES = (8192,)


def default_sizes():
  return CPU_SIZES if jax.default_backend() == "cpu" else GPU_SIZES


@functools.lru_cache(maxsize=None)
def _product_fn(size, dtype_name, calls):
  """(jitted product, operands) with `calls` products dispatched per timed call."""
  dtype = DTYPES[dtype_name]
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
  product = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=dtype))
  product(a, b).block_until_ready()

  def run():
    out = [product(a, b) for _ in range(calls)]   # asynchronous dispatch, one wait
    jax.block_until_ready(out)
  return run


def calls_per_timing(size):
  """Products per timed call: enough that dispatch overhead is negligible."""
  if jax.default_backend() == "cpu":
    return max(1, (2048 // size) ** 2)
  return max(10, (8192 // size) ** 3 * 10)


def product_timer(size, dtype="float32"):
  """(blocking callable, FLOPs per call) for interleaving with other timings."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
  calls = calls_per_timing(size)
  return _product_fn(size, dtype, calls), 2.0 * size ** 3 * calls


def matmul_rate(dtype="float32", sizes=None, repeats=5):
  """Best FLOP/s of a jitted square matmul over `sizes` (default: per backend)."""
  best = 0.0
  for size in sizes or default_sizes():
    fn, flops = product_timer(size, dtype)
    best = max(best, flops / timing.best_seconds(fn, repeats))
  return best


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default=None, help="comma-separated square sizes")
  parser.add_argument("--dtypes", default=None, help="float32,bfloat16 (default per backend)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results)")
  args = parser.parse_args(argv)
  sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(default_sizes())
  dtypes = args.dtypes.split(",") if args.dtypes else (
      ["float32"] if jax.default_backend() == "cpu" else ["float32", "bfloat16"])
  if args.quick:
    sizes, args.repeats = [128, 256], 2
  rows = []
  for dtype in dtypes:
    for size in sizes:
      rate = matmul_rate(dtype, [size], args.repeats)
      rows.append(dict(dtype=dtype, size=size, gflops=rate / 1e9,
                       load_average=report.load_average()))
  print(report.format_table(rows, [("dtype", "dtype", "{}"), ("size", "n", "{}"),
                                       ("gflops", "GFLOP/s", "{:.1f}"),
                                       ("load_average", "load", "{:.2f}")]))
  path = report.write_results("matmul", dict(rows=rows), args.out)
  print(f"wrote {path}")
  return rows


if __name__ == "__main__":
  main()
