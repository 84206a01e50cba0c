"""An evaluator group: one model held across several devices with DeepSpeed.

- `group.py`: the driver side, `ShardedEvaluatorGroup`, an evaluator (the contract of
  `prunetune.evaluators.contract`) that places N rank actors in one placement group,
  forwards each evaluation to all of them, and breaks for good when a rank dies or hangs.
- `rank.py`: `ShardRank`, the Ray actor on one device: joins the torch.distributed group,
  holds its part of the model, scores its share of the windows.
- `holding.py`: the interface of the ways a rank holds the model; `zero3.py` (ZeRO-3
  partitioned parameters, windows split over ranks), `tp.py` (transformers' tensor-parallel
  plan, each rank loading only its slices) and `autotp.py` (DeepSpeed AutoTP slices of a
  model loaded whole) implement it; in both tensor-parallel modes every rank runs every
  window.
"""
