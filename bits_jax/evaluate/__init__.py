"""Evaluation of frozen BITS encoders.

Modules (import the one you need; none is imported here, so that e.g. the
training loop does not pull in matplotlib):
  features:  run a jitted apply_fn over an eval iterator, gather on host.
  knn:       weighted k-NN classification (DINO protocol), blocked/sharded.
  linear:    linear probe with a small learning-rate sweep.
  retrieval: packed binary codes, Hamming search, mAP / precision@k.
  codes:     statistics of the teacher's binary message.
  plots:     PNG figures of those statistics and a clu writer helper.
  dense:     patch-level k-NN segmentation probe.
"""
