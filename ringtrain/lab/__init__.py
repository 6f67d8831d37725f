"""Lab tools, not the core: emulated LANs of network namespaces (`netns`) and CPU budgets
through cgroups (`cpu_budget`). Used by benchmarks and tests; the core never imports them.

May import: `ringtrain.errors` and the standard library.
"""
