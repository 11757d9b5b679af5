"""Offline model building (the `train` extra: scikit-learn, skl2onnx). Never imported by the
daemon; it shares the daemon's front end (`agent.recognition.frontend`) so there is no skew."""
