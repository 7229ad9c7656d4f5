"""The tools: ``spml`` commands that are not pipeline stages (docs/README's command table).

* :mod:`.bench`, :mod:`.bench_loader`, :mod:`.bench_parallel`, :mod:`.bench_prepare`: ``spml bench step | loader
  | parallel | prepare``, timings of the training step, the input pipeline, whole trainings side by side and
  the ``prepare`` stage;
* :mod:`.input_bench`, :mod:`.coco_like`: ``spml bench input``, the paper-scale input path on real-format JPEG
  files (COCO-like, generated), ours against an official-style loader;
* :mod:`.grid`, :mod:`.grid_job`: ``spml grid submit | status | collect``, one cluster job per grid cell;
* :mod:`.compare_regimes`: ``spml compare-regimes``, two or more runs tables side by side;
* :mod:`.check_lock`: ``spml check-lock``, is the committed dvc.lock fresh;
* :mod:`.verify`: ``spml verify``, re-train cells of a committed table and check them bit for bit;
* :mod:`.tiny_repo`: a tiny git copy of this repository, for the tools' own timings and for the tests.

A tool sits on top, beside ``stages/``: it uses the library (``pipeline/``) and runs stages only through the
``spml`` command, never by importing ``stages``, and nothing in the library imports a tool. No output of the
pipeline depends on this package, so no DVC stage tracks it.

This module imports nothing: a grid job on a cluster node unpickles :mod:`.grid_job` (plain Python) and
imports only that.
"""
