"""The one training skeleton that both tasks plug into, and its pieces.

* :mod:`.skeleton`: :func:`~.skeleton.train_task`, a run from start to end, and the
  :class:`~.skeleton.Task` hooks a task fills in (video prediction:
  :mod:`applications.conv_tt_lstm.prediction`; early recognition:
  :mod:`applications.conv_tt_lstm.recognition.task`).
* :mod:`.config`: the sectioned configuration, ``section.field=value`` overrides, and the
  ``run`` / ``optim`` fields the skeleton reads.
* :mod:`.batches`: training batches by global step (exact resume).
* :mod:`.distributed`: torchrun / DistributedDataParallel set-up, devices, threads, reductions.
* :mod:`.checkpoints`: training state with every random stream, the run folder, resume.
* :mod:`.logging`: tqdm on rank 0, TensorBoard scalars and images, a JSONL log.
* :mod:`.loop`: one optimiser step (:func:`~.loop.optimizer_step`) with the non-finite stop.
* :mod:`.schedules`: learning rate and scheduled sampling by step and validation round.
"""
