"""The pretrained front end is taken only from the pinned wheel, and only when every hash
matches; anything else is refused with one line naming the file and the fix."""

from __future__ import annotations

import zipfile

import pytest

from agent.errors import AgentError
from agent.training import pretrained as P


@pytest.fixture(scope="module")
def fetched():
    """The real pinned wheel, downloaded by pip into the cache (or reused from it)."""
    try:
        return P.fetch()
    except AgentError as e:  # no network and no cached wheel (CI fetches it first: .ci/run)
        if "pip download" not in str(e):
            raise
        pytest.skip(f"the pinned wheel cannot be fetched here: {e}")


def one_line_refusal(fn, *args, match: str) -> str:
    with pytest.raises(AgentError, match=match) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def fake_wheel(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_a_wheel_with_the_wrong_hash_is_refused_before_anything_is_extracted(tmp_path):
    fake_wheel(tmp_path / P.WHEEL, {f.member: b"x" for f in P.FILES})
    msg = one_line_refusal(P.fetch, tmp_path, match="sha256")
    assert P.WHEEL in msg and "fetch again" in msg
    assert not (tmp_path / f"{P.PACKAGE}-{P.VERSION}").exists()


def test_a_tampered_member_is_refused(tmp_path):
    """Even inside a wheel that got past the wheel check, each file is checked on its own."""
    wheel = tmp_path / "w.whl"
    fake_wheel(wheel, {f.member: b"tampered" for f in P.FILES})
    msg = one_line_refusal(P.extract, wheel, tmp_path / "out", match="sha256")
    assert "melspectrogram.onnx" in msg and "refusing" in msg
    assert not (tmp_path / "out" / "melspectrogram.onnx").exists()


def test_a_wheel_lacking_a_member_is_refused(tmp_path):
    wheel = tmp_path / "w.whl"
    fake_wheel(wheel, {"something/else.py": b""})
    one_line_refusal(P.extract, wheel, tmp_path / "out", match="lacks")


def test_fetch_verifies_the_real_wheel_and_a_tampered_extracted_file_is_refused(tmp_path,
                                                                                fetched):
    """The real pinned wheel (downloaded by pip into the cache, or reused from it)."""
    d = fetched
    for f in P.FILES:
        assert (d / f.name).stat().st_size == f.size
        if f.sha256:
            assert P.sha256_file(d / f.name) == f.sha256
    copy = tmp_path / "x"
    copy.mkdir()
    for f in P.FILES:
        data = (d / f.name).read_bytes()
        (copy / f.name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]) if f.sha256 else data)
    one_line_refusal(P.verify_extracted, copy, match="sha256")


def test_notice_states_provenance_both_licences_and_the_pins():
    """The repository's NOTICE and the bundled model's are the text the export writes."""
    from agent.resources import default_model_dir
    from agent.training.modeldir import notice_text
    from tests.conftest import ROOT

    text = notice_text()
    assert (ROOT / "NOTICE").read_text() == text
    assert (default_model_dir() / "NOTICE").read_text() == text
    for needle in ("Lin", "2020", "speech_embedding", "Apache", "CC BY-NC-SA 4.0",
                   f"{P.PACKAGE}=={P.VERSION}", P.WHEEL_SHA256, *[f.sha256 for f in P.FILES
                                                               if f.sha256]):
        assert needle in text, needle


def test_the_streaming_graph_is_derived_only_from_the_expected_layout(tmp_path, fetched):
    """derive_streaming checks the pinned graph's layout and the result's equality; a graph
    that is not the embedding network (here the melspectrogram graph) is refused in one line."""
    pytest.importorskip("onnx", reason="deriving the streaming graph needs onnx (train extra)")
    d = fetched
    assert P.streaming_gap(d / "embedding_model.onnx", d / "embedding_stream.onnx") <= 1e-5
    msg = one_line_refusal(P.derive_streaming, d / "melspectrogram.onnx",
                           tmp_path / "x.onnx", match="layout")
    assert "fetch again" in msg and not (tmp_path / "x.onnx").exists()
