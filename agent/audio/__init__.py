"""Audio I/O edge (sources) and the stream conditioning that follows it (mono, resampling)."""
