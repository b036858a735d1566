"""Training: one loop (:mod:`pipeline.training.loop`) and a small task per trained model."""
