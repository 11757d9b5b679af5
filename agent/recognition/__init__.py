"""Recognition: one utterance in, one decision out.

The shared front end (frozen speech embedding), the model bundle and its ONNX sessions, the
decision rule (thresholds, addressing, wake phrase) and the pure pipeline that runs the audio
path on one clock: source blocks -> resample -> VAD -> front end -> model -> decision.
"""
