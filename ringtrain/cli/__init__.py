"""Layer 5, the `ringtrain` command: `main` parses arguments and loads only the module of the
subcommand it runs; one module per command (`node`, `demo`, `peers`, `keygen`, `allreduce_demo`).

May import: anything in ringtrain (benchmarks and lab only lazily, through `main`).
"""
