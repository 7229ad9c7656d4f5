"""The GPU/long-run side of training, kept out of :mod:`pipeline.train` so the loop stays short.

Nothing here knows a method or a model. One module per concern, imported by its own name (this package
re-exports nothing, so an import line says which concern a name comes from):

* :mod:`~pipeline.runtime.distributed`: DDP (``torchrun``) context, collectives, and the seeded
  :class:`~pipeline.runtime.distributed.EpochSampler` that shards one permutation over the ranks;
* :mod:`~pipeline.runtime.optim`: mixed precision (autocast dtype), the LR schedule, the weight EMA;
* :mod:`~pipeline.runtime.checkpoint`: resume checkpoints (the :class:`~pipeline.runtime.checkpoint.Checkpoint`
  object, its fingerprint, atomic files, RNG states);
* :mod:`~pipeline.runtime.host`: host memory (a preloaded jemalloc/tcmalloc, else glibc malloc) and CPU threads.
"""
