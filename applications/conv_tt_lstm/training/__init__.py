"""A small, task-independent training engine.

* :mod:`.precision`: autocast and gradient scaling for fp32 / bf16 / fp16.
* :mod:`.distributed`: torchrun / DistributedDataParallel set-up, rank-0 helpers, reductions.
* :mod:`.checkpoints`: atomic training checkpoints with exact resume (RNG states included).
* :mod:`.logging`: tqdm on rank 0, TensorBoard scalars and images, a JSONL log.
* :mod:`.loop`: one optimiser step (:func:`~.loop.optimizer_step`) with non-finite checks.
* :mod:`.execution`: CPU threads and the optional ``torch.compile`` of the cells.

Video prediction (``applications.conv_tt_lstm.train``) and activity recognition use it the
same way: build the model, an optimiser, a :class:`~.precision.Precision` and a
:class:`~.distributed.DistContext`, and call the pieces from their own readable loop.
"""
