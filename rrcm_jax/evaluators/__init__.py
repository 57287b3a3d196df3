"""Evaluators in big_vision's shape: `Evaluator(predict_fn, ...).run(params)` yields
(name, value) pairs, one per metric, computed over a finite split on the device.

accuracy: clean and noisy top-1 accuracy of a classifier at model-space noise
levels (every example exactly once, its noise keyed by its index in the split).
knn: weighted k-NN accuracy of an encoder's features on a held-out split, clean
and at model-space noise levels (a representation monitor for pre-training).
"""
