"""The only code that turns a model and a split into numbers: the test protocol of the evaluate stage and the
per-step validation of training run the same functions, exact and independent of the number of ranks.

- :mod:`~pipeline.evaluation.features`: the FID extractor, real features of a split or of image folders;
- :mod:`~pipeline.evaluation.generator`: generated features, FID/KID/precision/recall/coverage, diversity;
- :mod:`~pipeline.evaluation.segmenter`: confusion matrices over a split, IoU, mIoU, pixel accuracy.

Every rank must call them; every rank gets the metrics, rank 0 alone the plot data.
"""
