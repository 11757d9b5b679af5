"""No training/serving skew: the daemon and training compute identical features."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf

from agent.audio.resample import Resampler
from agent.audio.sources import AudioBlock, FileSource
from agent.config import VadConfig
from agent.decision import Policy
from agent.features import FeatureParams, extract, extract_batch
from agent.model import ModelRunner
from agent.pipeline import Pipeline
from agent.resources import default_model_dir, demo_audio, demo_truth
from agent.training.dataset import load_audio


def test_training_and_serving_features_agree(tmp_path):
    """Training reads a clip with dataset.load_audio + extract_batch; the daemon reads it with a
    FileSource, conditions it in the pipeline and calls extract. Same numbers."""
    x, sr = sf.read(str(demo_audio()), dtype="float32")
    u = json.loads(demo_truth().read_text())["utterances"][0]
    clip = x[int(u["start"] * sr):int(u["end"] * sr)]
    for rate in (8000, 16000, 44100):
        path = tmp_path / f"c{rate}.wav"
        r = Resampler(8000, rate)
        sf.write(str(path), np.concatenate([r.process(clip), r.flush()]), rate, subtype="FLOAT")
        train_vec = extract_batch([load_audio(path, 8000)])[0]
        model = ModelRunner(default_model_dir())
        p = Pipeline(VadConfig(), model, Policy("full", 0.0))
        pcm = [p.condition(block) for block in FileSource(path, block_ms=30)]
        pcm.append(p.flush_conditioning())
        serve_vec = extract(np.concatenate(pcm), model.manifest.features)
        np.testing.assert_allclose(serve_vec, train_vec, atol=1e-5)


def test_features_are_gain_and_padding_robust():
    x, sr = sf.read(str(demo_audio()), dtype="float32")
    u = json.loads(demo_truth().read_text())["utterances"][2]
    clip = x[int(u["start"] * sr):int(u["end"] * sr)]
    p = FeatureParams()
    a = extract(clip, p)
    b = extract(clip * 0.1, p)   # 20 dB quieter
    np.testing.assert_allclose(a, b, atol=1e-3)
    assert a.shape == (p.dim,) and a.dtype == np.float32


def test_pipeline_feeds_the_model_the_same_vector_as_offline_extraction():
    """The vector the pipeline computes for an utterance equals extract() on that audio."""
    model = ModelRunner(default_model_dir())
    seen = []

    class Spy:
        def on_block(self, *a):
            pass

        def on_outcome(self, o):
            seen.append(o)

    p = Pipeline(VadConfig(), model, Policy("full", 0.0))
    p.observers.append(Spy())
    for block in FileSource(demo_audio()):
        p.feed(AudioBlock(block.samples, block.rate))
    p.finish()
    assert seen
    for o in seen:
        offline = model.predict(extract(o.utterance.audio, model.manifest.features)[None])[0]
        np.testing.assert_allclose(o.probabilities, offline, atol=1e-6)
