"""Swapping the model under a running pipeline, between two blocks, on the same audio clock.

The same rate: model and policy are replaced, nothing else moves. Another rate (a rollout from
an 8 kHz model to a 16 kHz one): the old pipeline is finished first — its resampler drained and
the utterance in progress decided by the old model, as at the end of a stream — and a new
pipeline at the new rate starts at the same audio time, with the same observers and the VAD's
noise floor carried over, so windows and the clock continue without a jump.
"""

from __future__ import annotations

from agent.recognition.decision import Decision, Policy
from agent.recognition.model import ModelRunner
from agent.recognition.pipeline import Pipeline


def retarget(p: Pipeline, model: ModelRunner | None, policy: Policy
             ) -> tuple[Pipeline, list[Decision]]:
    """(the pipeline to use from now on, decisions the switch produced)."""
    rate = model.manifest.sample_rate if model is not None else p.rate
    if rate == p.rate:
        p.model, p.policy = model, policy
        return p, []
    decisions = p.finish()
    clock_s = p.clock_s
    new = Pipeline(p.segmenter.cfg, model, policy)
    new.segmenter.skip(round(clock_s * new.rate))
    new.segmenter.noise_floor_db = p.segmenter.noise_floor_db
    new.observers = p.observers
    new.dropped_frames = p.dropped_frames * new.rate // p.rate
    return new, decisions
