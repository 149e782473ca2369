"""Reports: detection leaderboard tables and plots, the mitigation board and FB-Mem study tables, the
speed report, and the static HTML report over ``results/``.

May import: ``bench.run`` (run folders, leaderboards), ``bench.measure``, ``bench.core``; never
``baselines/`` or ``tasks/``.
"""
