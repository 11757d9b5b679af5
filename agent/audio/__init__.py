"""Sound in, speech segments out: the audio I/O edge (`sources`: microphone, file), mono and
resampling (`resample`) and the VAD segmenter (`vad`, webrtcvad) that cuts utterances out."""
