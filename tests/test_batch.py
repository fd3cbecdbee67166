"""``voxtral batch``: corpus transcription to JSONL, in-process and on a local Ray cluster, with the tiny model.

Every result is compared with the offline per-file :meth:`Model.transcribe` of the same file.  The Ray tests
start a 2-CPU cluster on this machine and skip when Ray is not installed.
"""

from __future__ import annotations

import json
import os
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from voxtral_realtime.batch import BatchOptions, list_inputs, result_record, run_batch
from voxtral_realtime.cli import main
from voxtral_realtime.errors import VoxtralError

CORPUS_FILES = 200


def _write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 files of 0.3 to 1 s (short, so that the whole corpus fits the CI time budget)."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(7)
    for i in range(CORPUS_FILES):
        samples = rng.standard_normal(int(16000 * rng.uniform(0.3, 1.0))) * 0.1
        _write_wav(folder / f"clip{i:03d}.wav", samples)
    return folder


@pytest.fixture(scope="module")
def expected(corpus: Path, tiny_short) -> dict[str, dict]:
    """The record each file must get: its offline, one-file-at-a-time transcription."""
    return {str(p): result_record(str(p), tiny_short.transcribe(p)) for p in sorted(corpus.glob("*.wav"))}


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("broken") / "corrupt.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEthis is not audio" * 10)
    return path


def _records(output: Path) -> list[dict]:
    return [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]


def _options(checkpoints, **overrides) -> BatchOptions:
    return BatchOptions(model=checkpoints["short"].mistral_dir, device="cpu", dtype="f32", **overrides)


def _no_model():
    raise AssertionError("the model was loaded although there was nothing to do")


# -- inputs -------------------------------------------------------------------------------------------------------


def test_inputs_from_folder_glob_and_manifests(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.wav", "a.flac", "sub/c.mp3", "notes.txt", ".hidden.wav"):
        (tmp_path / name).write_bytes(b"x")
    folder = [str(tmp_path / n) for n in ("a.flac", "b.wav", "sub/c.mp3")]
    assert list_inputs(tmp_path) == folder
    assert list_inputs(str(tmp_path / "*.wav")) == [str(tmp_path / "b.wav")]
    assert list_inputs(str(tmp_path / "**" / "*.mp3")) == [str(tmp_path / "sub/c.mp3")]

    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text('"b.wav"\n\n{"path": "sub/c.mp3", "speaker": 3}\n{"url": "s3://bucket/x.wav"}\n"b.wav"\n'
                     '{"audio_filepath": "a.flac", "duration": 1.5, "text": "hi"}\n')
    assert list_inputs(jsonl) == [str(tmp_path / "b.wav"), str(tmp_path / "sub/c.mp3"), "s3://bucket/x.wav",
                                  str(tmp_path / "a.flac")]
    with_header = tmp_path / "with_header.csv"
    with_header.write_text("speaker,path\n1,a.flac\n2,/abs/d.wav\n")
    assert list_inputs(with_header) == [str(tmp_path / "a.flac"), "/abs/d.wav"]
    no_header = tmp_path / "no_header.csv"
    no_header.write_text("b.wav,1\nhttps://host/e.ogg,2\n")
    assert list_inputs(no_header) == [str(tmp_path / "b.wav"), "https://host/e.ogg"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('"a.wav"\n{"speaker": 1}\n')
    with pytest.raises(VoxtralError, match="bad.jsonl:2"):
        list_inputs(bad)
    with pytest.raises(VoxtralError, match="no such file"):
        list_inputs(tmp_path / "missing")



def test_work_is_ordered_missing_then_longest_first_then_urls(tmp_path: Path) -> None:
    from voxtral_realtime.batch import longest_first

    for name, size in (("short.wav", 10), ("long.wav", 1000), ("mid.wav", 100)):
        (tmp_path / name).write_bytes(b"x" * size)
    named = {n: str(tmp_path / n) for n in ("short.wav", "long.wav", "mid.wav", "gone.wav")}
    paths = ["s3://b/1.wav", named["short.wav"], named["long.wav"], "https://h/2.wav", named["gone.wav"],
             named["mid.wav"]]
    assert longest_first(paths) == [named["gone.wav"], named["long.wav"], named["mid.wav"], named["short.wav"],
                                    "s3://b/1.wav", "https://h/2.wav"]

# -- in-process ---------------------------------------------------------------------------------------------------


def test_local_batch_equals_offline_records_errors_and_resumes(tmp_path, corpus, expected, broken, tiny_short,
                                                               checkpoints) -> None:
    good = sorted(expected)[:30]
    missing = str(tmp_path / "gone.wav")
    output = tmp_path / "out.jsonl"
    stats = run_batch([good[0], str(broken), *good[1:], missing], output, _options(checkpoints, streams_per_worker=8),
                      load_model=lambda: tiny_short)
    records = {r["path"]: r for r in _records(output)}
    assert len(records) == len(_records(output)) == 32
    assert {p: records[p] for p in good} == {p: expected[p] for p in good}
    for path in (str(broken), missing):
        assert records[path]["error"] and records[path]["text"] is None
    assert (stats.done, stats.failed, stats.skipped) == (32, 2, 0)
    assert stats.audio_seconds == pytest.approx(sum(expected[p]["duration"] for p in good))

    # a rerun is a no-op: nothing written, the model not even loaded
    before = output.read_bytes()
    again = run_batch(good, output, _options(checkpoints), load_model=_no_model)
    assert (again.done, again.skipped) == (0, len(good)) and output.read_bytes() == before

    # a run killed mid-write: 10 whole lines and half of the 11th survive; the rerun completes every file once
    lines = before.decode().splitlines(keepends=True)
    output.write_text("".join(lines[:10]) + lines[10][: len(lines[10]) // 2], encoding="utf-8")
    resumed = run_batch([str(broken), *good, missing], output, _options(checkpoints, streams_per_worker=8),
                        load_model=lambda: tiny_short)
    assert resumed.skipped == 10 and resumed.done == 22
    final = _records(output)
    assert sorted(r["path"] for r in final) == sorted([*good, str(broken), missing])
    assert {r["path"]: r for r in final if r["error"] is None} == {p: expected[p] for p in good}

    # --retry-errors redoes only the failures, and the newest line for a path is the one that counts
    retried = run_batch([str(broken), *good], output, _options(checkpoints, retry_errors=True),
                        load_model=lambda: tiny_short)
    assert (retried.done, retried.failed, retried.skipped) == (1, 1, len(good))




def test_a_group_shares_its_decoder_steps_closing_silence_included(expected, tiny_short) -> None:
    from voxtral_realtime.audio import load_audio
    from voxtral_realtime.batch import GroupTranscriber

    chosen = sorted(expected)[:16]
    transcriber = GroupTranscriber(tiny_short, streams=16)
    records = transcriber.transcribe([(p, load_audio(p)) for p in chosen])
    assert records == [expected[p] for p in chosen]
    engine = transcriber.engine
    # one file at a time would take a decoder call per row; even the closing steps (delay + 11 per file) are
    # shared, so 16 files need about as many calls as the longest one has steps
    assert engine.decode_calls * 8 < engine.decode_rows, (engine.decode_calls, engine.decode_rows)


def test_a_file_failing_in_the_engine_is_recorded_and_its_group_still_done(expected, tiny_short) -> None:
    from voxtral_realtime.audio import load_audio
    from voxtral_realtime.batch import GroupTranscriber

    first, second = sorted(expected)[:2]
    not_samples = np.array(["not", "audio"])  # fails inside the session, after decoding
    transcriber = GroupTranscriber(tiny_short, streams=4)
    records = transcriber.transcribe([(first, load_audio(first)), ("bad", not_samples), (second, load_audio(second))])
    assert [r["path"] for r in records] == [first, "bad", second]
    assert records[0] == expected[first] and records[2] == expected[second]
    assert records[1]["error"].startswith("ValueError") and records[1]["text"] is None
    assert transcriber.engine.free_slots == 4  # the abandoned sessions gave their rows back


def test_an_engine_failure_in_a_group_is_retried_file_by_file(expected, tiny_short, monkeypatch) -> None:
    from voxtral_realtime.audio import load_audio
    from voxtral_realtime.batch import GroupTranscriber

    chosen = sorted(expected)[:4]
    transcriber = GroupTranscriber(tiny_short, streams=4)
    real_run, calls = transcriber.engine.run, []

    def run_failing_once() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        real_run()

    monkeypatch.setattr(transcriber.engine, "run", run_failing_once)
    records = transcriber.transcribe([(p, load_audio(p)) for p in chosen])
    # the group was redone file by file, after the failure, with the same engine
    assert records == [expected[p] for p in chosen] and transcriber.engine.free_slots == 4
    assert len(calls) > 4


def test_manifest_of_urls_is_read_through_fsspec(tmp_path, expected, tiny_short, checkpoints) -> None:
    import fsspec

    memory = fsspec.filesystem("memory")
    chosen = sorted(expected)[:3]
    urls = [f"memory://corpus/{Path(p).name}" for p in chosen]
    for path, url in zip(chosen, urls):
        memory.pipe(url, Path(path).read_bytes())
    memory.pipe("memory://corpus/list.jsonl", "".join(json.dumps({"url": u}) + "\n" for u in urls).encode())
    output = tmp_path / "out.jsonl"
    stats = run_batch("memory://corpus/list.jsonl", output, _options(checkpoints), load_model=lambda: tiny_short)
    assert stats.failed == 0
    assert {r["path"]: r for r in _records(output)} == {u: {**expected[p], "path": u} for p, u in zip(chosen, urls)}

def test_cli_batch_writes_jsonl_and_reports_throughput(tmp_path, corpus, expected, broken, checkpoints,
                                                       capsys) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    chosen = sorted(expected)[:3]
    for path in chosen:
        (folder / Path(path).name).write_bytes(Path(path).read_bytes())
    (folder / "corrupt.wav").write_bytes(broken.read_bytes())
    output = tmp_path / "results" / "out.jsonl"
    argv = ["batch", str(folder), "--output", str(output), "--model", str(checkpoints["short"].mistral_dir),
            "--device", "cpu", "--dtype", "f32", "--no-progress"]
    assert main(argv) == 1  # a file failed: the exit status says so, the others are done
    records = {Path(r["path"]).name: r for r in _records(output)}
    assert records["corrupt.wav"]["error"]
    for path in chosen:
        assert {**records[Path(path).name], "path": path} == expected[path]
    err = capsys.readouterr().err
    assert "4 files transcribed (1 failed)" in err and "files/s" in err and "audio hours per wall hour" in err
    assert "first error: " in err and "corrupt.wav" in err
    assert main(argv) == 0  # the rerun has nothing to do
    assert "0 files transcribed (0 failed), 4 already done" in capsys.readouterr().err


def test_ray_address_without_ray_is_a_clear_error(tmp_path, corpus, checkpoints, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(VoxtralError, match=r"pip install 'ray\[data\]'"):
        run_batch(str(corpus), tmp_path / "out.jsonl", _options(checkpoints, ray_address="auto"))


def test_random_weights_run_in_process_only(tmp_path, corpus, capsys) -> None:
    from voxtral_realtime.cli import main

    code = main(["batch", str(corpus), "--output", str(tmp_path / "out.jsonl"), "--random-weights",
                 "--ray-address", "auto", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "--random-weights runs in this process" in err and "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()


# -- Ray ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # the fault-injecting actor class lives in this test module, which Ray's workers cannot import
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


def _ray_options(checkpoints, **overrides) -> BatchOptions:
    # two actors at half a CPU each leave one of the two CPUs to the decoding tasks
    settings = {"ray_address": "auto", "workers": 2, "cpus_per_worker": 0.5, "streams_per_worker": 16}
    return _options(checkpoints, **{**settings, **overrides})


def test_ray_batch_of_200_files_equals_offline(ray_cluster, tmp_path, corpus, expected, broken,
                                               checkpoints) -> None:
    output = tmp_path / "out.jsonl"
    inputs = [*sorted(expected), str(broken)]
    stats = run_batch(inputs, output, _ray_options(checkpoints))
    records = _records(output)
    assert len(records) == len(inputs) and stats.done == len(inputs) and stats.failed == 1
    by_path = {r["path"]: r for r in records}
    assert by_path.pop(str(broken))["error"]
    assert by_path == expected

    before = output.read_bytes()
    again = run_batch(inputs, output, _ray_options(checkpoints))
    assert (again.done, again.skipped) == (0, len(inputs)) and output.read_bytes() == before


def _make_dying_transcriber(marker: Path, after_files: int):
    from voxtral_realtime.batch import RayTranscriber

    class DyingTranscriber(RayTranscriber):
        """Kills its own process once, mid-run, after transcribing ``after_files`` files but before returning
        the batch that reached that count (the batch's work is lost with it and must be redone)."""

        files_seen = 0

        def __call__(self, batch):
            records = super().__call__(batch)
            self.files_seen += len(batch["path"])
            if self.files_seen >= after_files:
                try:  # exactly one actor of the run dies, exactly once (the restarted one must live)
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    return records
                os._exit(1)
            return records

    return DyingTranscriber


def test_ray_worker_killed_mid_run_loses_no_file(ray_cluster, tmp_path, expected, checkpoints) -> None:
    marker = tmp_path / "died"
    inputs = sorted(expected)[:96]
    output = tmp_path / "out.jsonl"
    options = _ray_options(checkpoints, ray_transcriber=_make_dying_transcriber(marker, after_files=24))
    stats = run_batch(inputs, output, options)
    assert marker.exists(), "the fault was not injected"
    records = _records(output)
    assert sorted(r["path"] for r in records) == inputs  # each file exactly once
    assert {r["path"]: r for r in records} == {p: expected[p] for p in inputs}
    assert stats.done == len(inputs) and stats.failed == 0



def _make_always_dying_transcriber():
    from voxtral_realtime.batch import RayTranscriber

    class AlwaysDyingTranscriber(RayTranscriber):
        """A file that kills the worker process every time (a crashing decoder library, say)."""

        def __call__(self, batch):
            os._exit(1)

    return AlwaysDyingTranscriber


def test_ray_run_that_keeps_killing_its_actor_stops_with_a_clear_error(ray_cluster, tmp_path, expected,
                                                                      checkpoints, monkeypatch) -> None:
    import voxtral_realtime.batch

    monkeypatch.setattr(voxtral_realtime.batch, "ACTOR_TASK_RETRIES", 1)  # each retry restarts the actor: slow
    output = tmp_path / "out.jsonl"
    options = _ray_options(checkpoints, workers=1, ray_transcriber=_make_always_dying_transcriber())
    with pytest.raises(VoxtralError, match="run the same command again to resume"):
        run_batch(sorted(expected)[:2], output, options)
